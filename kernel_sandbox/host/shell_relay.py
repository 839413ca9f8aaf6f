"""The host-side shell relay: every client's requests reach the kernel through the host, seen.

Clients connect their DEALER sockets to a ROUTER of the relay's; a DEALER of the relay's
connects to the kernel's ROUTER. That is ZeroMQ's standard broker: the ROUTER prefixes each
request with the client's routing id, the kernel sends the reply back with it, and the ROUTER
routes it to that client, so identities (and so jupyter_client) are unchanged::

    clients DEALER --ipc--> ROUTER [relay] DEALER --ipc--> kernel ROUTER
                                  |
                         capture (in/out) --inproc--> observer thread --> ExecutionAudit

The forwarding loop is pyzmq's ``monitored_queue`` (C, without the GIL), which also sends a
copy of each message, prefixed ``in`` (from a client) or ``out`` (from the kernel), to a
capture socket; a second thread hands the copies to the observer (the audit's parser). The
capture is a PUSH socket: when the observer falls behind, forwarding waits for it, so no
request goes unrecorded (the backlog is bounded by ``CAPTURE_HWM`` messages).

The relay connects to a host-only hard link of the kernel's socket (made by the provisioner
after checking it is the kernel's socket), never to a path in the directory the kernel writes.
It follows restarts by itself (the DEALER reconnects to the path). Each relay has a ZeroMQ
context of its own, so that :meth:`ShellRelay.close` can end the C loop (context term).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.devices import monitored_queue

from kernel_sandbox.host.relay import link_socket, unlink_socket

__all__ = ["CAPTURE_HWM", "ShellRelay"]

CAPTURE_HWM = 10_000  # captured messages waiting for the observer before forwarding waits
RECONNECT_IVL = 5  # ms between attempts to reach the kernel's socket (start, restart)
DRAIN = 0.01  # seconds the observer must be quiet before a close ends it

Observer = Callable[[bytes, Sequence[Any]], None]


class ShellRelay:
    """Relay one kernel's shell channel (see the module docstring).

    Args:
        kernel_path: the host-only link to the kernel's ROUTER socket (it may appear later).
        client_path: where to bind the clients' side (a host-only directory).
        observe: called in the relay's observer thread with (b"in" | b"out", frames).
        name: the kernel, in thread names and log lines.
        log: a logger.
        routing_id: the kernel-side DEALER's routing id; a kernel's shell and stdin relays
            share one, because ipykernel sends ``input_request`` on stdin to the routing path
            the shell request came by (the relay's id, then the client's).
    """

    def __init__(
        self,
        kernel_path: str,
        client_path: str,
        observe: Observer,
        name: str,
        log: Any,
        routing_id: bytes | None = None,
    ):
        self.kernel_path, self.client_path = kernel_path, client_path
        self.routing_id = routing_id
        self.observe, self.name, self.log = observe, name, log
        self.observed = 0
        self._context: zmq.Context | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Bind the clients' socket (clients may connect when this returns), connect to the
        kernel's and start forwarding.

        Raises:
            zmq.ZMQError: the client path cannot be bound.
        """
        unlink_socket(self.client_path)
        context = zmq.Context(io_threads=1)
        front = context.socket(zmq.ROUTER)
        back = context.socket(zmq.DEALER)
        capture = context.socket(zmq.PUSH)
        watch = context.socket(zmq.PULL)
        address = f"inproc://shell-capture-{id(self)}"
        try:
            for sock in (front, back, capture, watch):
                sock.setsockopt(zmq.LINGER, 0)
            # as ipykernel's own ROUTER: a client reconnecting with the routing id (session)
            # of one still connected (km.client() shares the manager's session) takes it over
            front.setsockopt(zmq.ROUTER_HANDOVER, 1)
            capture.setsockopt(zmq.SNDHWM, CAPTURE_HWM)
            watch.setsockopt(zmq.RCVHWM, CAPTURE_HWM)
            if self.routing_id:
                back.setsockopt(zmq.ROUTING_ID, self.routing_id)
            back.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)
            back.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
            front.bind(f"ipc://{self.client_path}")
            watch.bind(address)
            capture.connect(address)
            back.connect(f"ipc://{self.kernel_path}")
        except BaseException:
            for sock in (front, back, capture, watch):
                sock.close(linger=0)
            context.term()
            raise
        self._context = context
        self._threads = [
            threading.Thread(
                target=self._forward,
                args=(front, back, capture),
                name=f"kernel-sandbox-shell-{self.name}",
                daemon=True,
            ),
            threading.Thread(
                target=self._watch,
                args=(watch,),
                name=f"kernel-sandbox-shell-audit-{self.name}",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()

    def expose(self, path: str) -> None:
        """Make ``path`` (same file system, host-only directory) a hard link to the relay's
        socket, replacing whatever is there atomically.

        Raises:
            OSError: the link could not be made.
        """
        link_socket(self.client_path, path)

    def close(self) -> None:
        """Let the observer finish what was captured, stop forwarding, release the sockets
        (idempotent, never raises)."""
        context, self._context = self._context, None
        if context is None:
            return
        deadline = time.monotonic() + 1.0
        seen = -1
        while seen != self.observed and time.monotonic() < deadline:
            seen = self.observed
            time.sleep(DRAIN)
        context.term()  # the loops get ETERM, close their sockets, then term returns
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._threads = []
        unlink_socket(self.client_path)

    # -- the relay's threads ------------------------------------------------------------------

    def _forward(self, front: zmq.Socket, back: zmq.Socket, capture: zmq.Socket) -> None:
        try:
            monitored_queue(front, back, capture, b"in", b"out")
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            self.log.warning("kernel %s: the shell relay stopped: %s", self.name, exc)
        finally:
            for sock in (front, back, capture):
                sock.close(linger=0)

    def _watch(self, watch: zmq.Socket) -> None:
        try:
            while True:
                frames = watch.recv_multipart()  # copies: cheaper than Frames when small
                try:
                    self.observe(frames[0], frames[1:])
                except Exception as exc:  # an observer's bug must not stop forwarding
                    self.log.error("kernel %s: shell audit failed: %s", self.name, exc)
                self.observed += 1
        except zmq.ContextTerminated:
            pass
        finally:
            watch.close(linger=0)

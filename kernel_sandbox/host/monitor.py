"""A host-side watch over one running sandbox: its idle time and operator stop requests.

The provisioner starts one :class:`KernelMonitor` per running container. It follows the
kernel's IOPub status messages (and remembers the last cell a client ran, so that a notice
about the kernel's end can be shown in it: :mod:`.notices`). It asks the provisioner to end
the kernel when

- the policy's ``idle_timeout`` has passed with the kernel idle: no message on its IOPub
  channel (every execution, output and status change is one) and no cell running, whatever
  clients are connected; or
- an operator ran ``kernel-sandbox stop KERNEL_ID``, which leaves a request file in the
  host-only part of the kernel's runtime directory (the kernel cannot see or write it).

It only watches: how the kernel is ended (through its manager, so Jupyter Server forgets it
instead of restarting it) is the provisioner's business. Everything here runs in one daemon
thread; ``close`` stops it and releases its socket.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

__all__ = ["STOP_REQUEST", "KernelMonitor", "request_stop"]

STOP_REQUEST = "stop-request"
_DELIMITER = b"<IDS|MSG>"
# Longest a closing monitor with an IOPub socket takes to notice (and the longest close waits).
POLL_SLICE = 0.1
# Larger header, parent header or content frames of a status message are not parsed.
MAX_FRAME = 65536


def request_stop(runtime_dir: Path, who: str) -> None:
    """Ask the owner of the kernel in ``runtime_dir`` to end it (``kernel-sandbox stop``)."""
    (runtime_dir / STOP_REQUEST).write_text(json.dumps({"by": who, "time": time.time()}))


def execution_state(frames: list[bytes]) -> str | None:
    """The ``execution_state`` of a status message (None for any other message)."""
    return status_of(frames)[0]


def status_of(frames: list[bytes]) -> tuple[str | None, dict[str, Any] | None]:
    """A status message's ``execution_state`` and, when it is about an ``execute_request``,
    that request's header (the cell a client ran); ``(None, None)`` for any other message.

    Kernel-chosen frames larger than MAX_FRAME are not parsed.
    """
    try:
        at = frames.index(_DELIMITER)
        header, parent, content = frames[at + 2], frames[at + 3], frames[at + 5]
        if max(len(header), len(parent), len(content)) > MAX_FRAME:
            return None, None
        if json.loads(header).get("msg_type") != "status":
            return None, None
        state = json.loads(content).get("execution_state")
        request = json.loads(parent)
    except (ValueError, IndexError, AttributeError):
        return None, None
    if not isinstance(state, str):
        return None, None
    if not isinstance(request, dict) or request.get("msg_type") != "execute_request":
        request = None
    return state, request


class KernelMonitor:
    """Watch one kernel; call ``on_end(reason)`` once when it should end.

    Args:
        runtime_dir: the kernel's host-only runtime directory (where stop requests appear);
            None for a kernel without one (a pod: ``kernel-sandbox stop`` deletes it).
        iopub_url: the kernel's IOPub address (``ipc://...``, or ``tcp://...`` for a pod);
            None disables idle tracking and :attr:`request`.
        idle_timeout: seconds of idleness before the kernel ends; 0 never.
        on_end: called from the monitor's thread with a one-line reason.
        interval: seconds between checks.
        clock: monotonic clock, injectable for tests.
        curve_serverkey: the kernel's CurveZMQ public key (Z85), for a kernel whose sockets
            are Curve servers (a pod's): the monitor connects as a Curve client.
    """

    def __init__(
        self,
        runtime_dir: Path | None,
        iopub_url: str | None,
        idle_timeout: float,
        on_end: Callable[[str], None],
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        curve_serverkey: str | None = None,
    ):
        self.stop_file = runtime_dir / STOP_REQUEST if runtime_dir is not None else None
        self.curve_serverkey = curve_serverkey
        self.iopub_url = iopub_url
        self.idle_timeout = idle_timeout
        self.on_end = on_end
        self.interval = min(interval, idle_timeout / 2) if idle_timeout > 0 else interval
        self.clock = clock
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        # the header of the last execute_request the kernel began (a notice names its cell)
        self.request: dict[str, Any] | None = None
        self.busy = False

    def start(self) -> None:
        if self.stop_file is not None:  # a request for an earlier container is spent
            self.stop_file.unlink(missing_ok=True)
        self._thread = threading.Thread(
            target=self._run, name="kernel-sandbox-monitor", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop watching (idempotent); the thread releases its socket within POLL_SLICE."""
        self._closing.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * POLL_SLICE)

    def _run(self) -> None:
        socket: zmq.Socket | None = None
        if self.iopub_url:
            socket = zmq.Context.instance().socket(zmq.SUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            if self.curve_serverkey:
                public, secret = zmq.curve_keypair()
                socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
                socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
                socket.setsockopt(zmq.CURVE_SERVERKEY, self.curve_serverkey.encode("ascii"))
            socket.connect(self.iopub_url)
        try:
            reason = self._watch(socket)
        finally:
            if socket is not None:
                socket.close()
        if reason is not None and not self._closing.is_set():
            self.on_end(reason)

    def _watch(self, socket: zmq.Socket | None) -> str | None:
        last_activity, busy = self.clock(), False
        while not self._closing.is_set():
            if socket is None:
                self._closing.wait(self.interval)
            elif socket.poll(int(POLL_SLICE * 1000)):
                while True:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_activity = self.clock()
                    state, request = status_of(frames)
                    if state in ("busy", "idle"):
                        busy = self.busy = state == "busy"
                    if state == "busy" and request is not None:
                        self.request = request
            if self.stop_file is not None and self.stop_file.exists():
                return "stopped by an operator (kernel-sandbox stop)"
            idle_for = self.clock() - last_activity
            if (
                socket is not None
                and self.idle_timeout > 0
                and not busy
                and idle_for >= self.idle_timeout
            ):
                return (
                    f"idle for {idle_for:.0f}s (the policy's idle_timeout is "
                    f"{self.idle_timeout:.0f}s)"
                )
        return None

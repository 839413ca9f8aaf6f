"""A pod kernel's sockets for the service's caller: ipc sockets only the caller may connect to,
relayed by the service to the pod over CurveZMQ.

With ``backend: kubernetes`` the service's provisioner reaches the kernel over TCP at its
Service's address, encrypted with the kernel's Curve key pair (:mod:`kernel_sandbox.kube`).
The caller gets none of that: no Curve key, no network reach to the pod (its NetworkPolicy
admits the service alone). It gets ipc sockets in a directory of the service's runtime root,
as for a container, chowned to it (mode 0600), and the kernel's HMAC key::

    caller DEALER/SUB --ipc--> relay [service] --tcp+curve--> pod (ROUTER/XPUB)

One relay per channel, each a pyzmq device in a thread of its own (without the GIL): shell and
control are ``monitored_queue`` with every message handed to the kernel's
:class:`~kernel_sandbox.audit.executions.ExecutionAudit`, as the container path's audit relay
does; IOPub is XPUB/XSUB (verbose, so each client's subscription reaches the kernel and it
welcomes each); stdin and heartbeat are ROUTER/DEALER queues. Every queue holds at most
``iopub_hwm`` messages, and a caller's frames are bounded by ``iopub_max_message``. The
kernel's are not: the container relay's per-message bound, rate limit and drop notices are not
applied to pods (libzmq drops a connection that breaks ``MAXMSGSIZE`` for good when it is the
connecting side, as the relay is toward the pod), so a pod's large outputs pass through the
service's memory whole, up to ``iopub_hwm`` of them per caller socket. The relays' kernel side
connects as a Curve client with a key pair of the service's own and one routing id for shell,
control and stdin (ipykernel sends ``input_request`` on stdin to the identity a shell request
came from). A kernel restart is a new pod behind the same Service address: the relays
reconnect by themselves.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from zmq.devices import monitored_queue

__all__ = ["CHANNEL_PORTS", "PodRelays", "audit_observer", "sweep_service_pods"]

# The "ports" of the caller's ipc connection info: only suffixes of the socket paths.
CHANNEL_PORTS = {
    "shell_port": 1,
    "iopub_port": 2,
    "stdin_port": 3,
    "control_port": 4,
    "hb_port": 5,
}
AUDITED = ("shell_port", "control_port")
RECONNECT_IVL = 20  # ms between attempts to reach the pod (its start, a restart)

Observer = Callable[[str, bytes, Any], None]


class PodRelays:
    """The five relays of one pod kernel, and the caller's connection info.

    Args:
        directory: a new directory for the caller's sockets (short: unix paths are limited).
        client: the caller's (uid, gid): the sockets are theirs alone.
        observe: called with (channel, b"in" | b"out", frames) for shell and control traffic.
        name: the kernel, in thread names and log lines.
        log: a logger.
        max_message: the largest message frame a caller may send (``iopub_max_message``): a
            larger one drops its connection (the caller's socket reconnects).
        hwm: messages queued per socket and peer (``iopub_hwm``).
    """

    def __init__(
        self,
        directory: str,
        client: tuple[int, int],
        observe: Observer | None,
        name: str,
        log: Any,
        max_message: int = 64 * 1024**2,
        hwm: int = 1000,
    ):
        self.directory, self.client = Path(directory), client
        self.observe, self.name, self.log = observe, name, log
        self.max_message, self.hwm = max_message, hwm
        self.address = ""
        self._context: zmq.Context | None = None
        self._threads: list[threading.Thread] = []
        self._routing_id = secrets.token_bytes(8)

    @property
    def prefix(self) -> str:
        return str(self.directory / "c")

    def connection_info(self, kernel_info: dict[str, Any]) -> dict[str, Any]:
        """What the caller gets: ipc paths and the HMAC key; no Curve key, no address."""
        key = kernel_info["key"]
        return {
            "transport": "ipc",
            "ip": self.prefix,
            **CHANNEL_PORTS,
            "key": key.decode() if isinstance(key, bytes) else key,
            "signature_scheme": kernel_info.get("signature_scheme", "hmac-sha256"),
            "kernel_name": kernel_info.get("kernel_name", ""),
        }

    def start(self, address: str, kernel_info: dict[str, Any]) -> None:
        """Bind the caller's sockets (made the caller's before anyone can reach them) and
        relay each to the kernel's port at ``address``; again after a change of address.

        Raises:
            zmq.ZMQError, OSError: a socket cannot be bound or given to the caller.
        """
        if self._context is not None and address == self.address:
            return
        self.close(keep_directory=True)
        self.directory.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)  # nobody reaches a socket before it is the caller's
        server_key = str(kernel_info["curve_publickey"]).encode()
        public, secret = zmq.curve_keypair()
        context = zmq.Context(io_threads=1)
        plan = []
        try:
            for channel, port in CHANNEL_PORTS.items():
                front_type, back_type = (
                    (zmq.XPUB, zmq.XSUB) if channel == "iopub_port" else (zmq.ROUTER, zmq.DEALER)
                )
                front, back = context.socket(front_type), context.socket(back_type)
                plan.append((channel, front, back))
                for sock in (front, back):
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDHWM, self.hwm)
                    sock.setsockopt(zmq.RCVHWM, self.hwm)
                # a caller's frame over the bound drops its connection (the caller's socket
                # reconnects); not on the kernel's side: libzmq would not reconnect after it
                front.setsockopt(zmq.MAXMSGSIZE, self.max_message)
                if channel == "iopub_port":
                    front.setsockopt(zmq.XPUB_VERBOSE, 1)
                else:
                    front.setsockopt(zmq.ROUTER_HANDOVER, 1)
                    if channel != "hb_port":
                        back.setsockopt(zmq.ROUTING_ID, self._routing_id)
                back.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL)
                back.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
                back.curve_serverkey = server_key
                back.curve_publickey, back.curve_secretkey = public, secret
                path = f"{self.prefix}-{port}"
                if os.path.lexists(path):
                    os.unlink(path)
                front.bind(f"ipc://{path}")
                os.chown(path, *self.client)
                os.chmod(path, 0o600)
                back.connect(f"tcp://{address}:{int(kernel_info[channel])}")
        except BaseException:
            for _, front, back in plan:
                front.close(linger=0)
                back.close(linger=0)
            context.term()
            raise
        os.chmod(self.directory, 0o711)  # searchable, not listable: the sockets are the caller's
        self._context, self.address = context, address
        for channel, front, back in plan:
            thread = threading.Thread(
                target=self._forward,
                args=(context, channel, front, back),
                name=f"kernel-sandbox-pod-{channel.removesuffix('_port')}-{self.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _forward(self, context: zmq.Context, channel: str, front: Any, back: Any) -> None:
        capture = watch = None
        watcher = None
        try:
            if channel in AUDITED and self.observe is not None:
                where = f"inproc://pod-audit-{channel}-{id(self)}"
                watch = context.socket(zmq.PULL)
                watch.bind(where)
                capture = context.socket(zmq.PUSH)
                capture.connect(where)
                observe = functools.partial(self.observe, channel.removesuffix("_port"))
                watcher = threading.Thread(target=self._watch, args=(watch, observe), daemon=True)
                watcher.start()
                monitored_queue(front, back, capture, b"in", b"out")
            else:
                zmq.proxy(front, back)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            self.log.warning("kernel %s: the %s relay stopped: %s", self.name, channel, exc)
        finally:
            for sock in (front, back, capture):
                if sock is not None:
                    sock.close(linger=0)

    def _watch(self, watch: Any, observe: Callable[[bytes, Any], None]) -> None:
        try:
            while True:
                frames = watch.recv_multipart()
                try:
                    observe(frames[0], frames[1:])
                except Exception as exc:  # an observer's bug must not stop forwarding
                    self.log.error("kernel %s: shell audit failed: %s", self.name, exc)
        except zmq.ContextTerminated:
            pass
        finally:
            watch.close(linger=0)

    def close(self, keep_directory: bool = False) -> None:
        """Stop relaying, remove the caller's sockets (and the directory). Never raises."""
        context, self._context = self._context, None
        if context is not None:
            context.term()
            for thread in self._threads:
                thread.join(timeout=5)
        self._threads = []
        if not keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def audit_observer(prov: Any) -> Observer | None:
    """The kernel's execution audit (as the container path's shell relay records it), or
    None when the operator turned it off."""
    if not prov.audit_executions:
        return None
    from kernel_sandbox.audit.executions import ExecutionAudit
    from kernel_sandbox.provisioner.auditing import _context, _trail

    executions = ExecutionAudit(
        _trail(prov), prov.kernel_id or "", _context(prov), prov.audit_code_limit
    )
    return lambda channel, direction, frames: executions.observe(direction, frames, channel)


async def sweep_service_pods(conf: dict[str, Any], keep: frozenset[str], log: Any) -> None:
    """Delete the kernel pods of an earlier run of the service that it did not adopt (the
    direct-mode sweeps leave the service's pods alone), in the namespace of the service's
    settings ``conf``. Never raises (logged)."""
    from kernel_sandbox.kube.api import KubeApi
    from kernel_sandbox.kube.reap import sweep

    api = KubeApi(
        conf["kube_namespace"],
        conf.get("kube_config", ""),
        conf.get("kube_context", ""),
        None,
        10.0,
    )
    try:
        report = await sweep(api, service=True, keep=keep)
        if report:
            log.info("service: reaped kernel pods no record adopted: %s", report.pods)
    except Exception as exc:
        log.warning("service: sweep of kernel pods failed: %s", exc)
    finally:
        api.close()

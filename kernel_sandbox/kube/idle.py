"""``idle_timeout`` for a kernel in a pod: the Docker path's host-side monitor, over Curve.

The owner watches the pod's IOPub as it watches a container's
(:class:`~kernel_sandbox.host.monitor.KernelMonitor`: no message and no cell running for
``idle_timeout`` seconds), connecting where its clients do (the Service, or the pod) as one
more CurveZMQ client. When it fires, the clients are told why before the pod goes, in the cell
they ran last, as on the Docker path (:func:`~kernel_sandbox.host.notices.stopped_notice`). A
container's notice is published by the owner on the dead kernel's IOPub path; a pod's IOPub is
the kernel's own socket in the pod, which nothing else can bind, so the owner asks the kernel
to publish it (:func:`tell_in_pod`: a silent ``execute_request`` whose code sends the notice
through the kernel's own session, parented to the last cell), then the pod is deleted. Like
the Docker path's notice it is cosmetic: a kernel that does not answer is ended all the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import zmq
from jupyter_client.session import Session

from kernel_sandbox.host.monitor import KernelMonitor
from kernel_sandbox.host.notices import DELIVERY, Notice, stopped_notice

if TYPE_CHECKING:
    from kernel_sandbox.kube.kernel import KubeKernel

__all__ = ["end_idle", "pod_monitor", "tell_in_pod"]

# Run in the kernel: publish one IOPub message through the kernel's own session and socket,
# parented to the last cell a client ran (as the Docker path's notice is).
_PUBLISH = """\
def _kernel_sandbox_notice(msg_type, content, parent):
    kernel = get_ipython().kernel
    kernel.session.send(kernel.iopub_socket, msg_type, content, parent=parent or None,
                        ident=kernel._topic(msg_type))
_kernel_sandbox_notice({msg_type!r}, __import__('json').loads({content!r}),
                       __import__('json').loads({parent!r}))
del _kernel_sandbox_notice
"""


def pod_monitor(
    info: Mapping[str, Any], address: str, idle_timeout: float, on_end: Callable[[str], None]
) -> KernelMonitor:
    """A started monitor of the kernel's IOPub at ``address`` (its Service's or its pod's)."""
    monitor = KernelMonitor(
        None,
        f"tcp://{address}:{info['iopub_port']}",
        idle_timeout,
        on_end,
        curve_serverkey=str(info["curve_publickey"]),
    )
    monitor.start()
    return monitor


def tell_in_pod(
    info: Mapping[str, Any],
    address: str,
    notice: Notice,
    parent: Mapping[str, Any] | None,
    timeout: float = 5.0,
) -> bool:
    """Have the kernel at ``address`` publish ``notice`` on its IOPub, parented to ``parent``
    (a header). Blocking; True when the kernel answered within ``timeout`` seconds."""
    key = info["key"]
    session = Session(
        key=key if isinstance(key, bytes) else str(key).encode(),
        signature_scheme=info.get("signature_scheme", "hmac-sha256"),
        username="kernel-sandbox",
    )
    code = _PUBLISH.format(
        msg_type=notice.msg_type,
        content=json.dumps(notice.content),
        parent=json.dumps({"header": dict(parent)} if parent else {}, default=str),
    )
    content = {
        "code": code,
        "silent": True,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": False,
    }
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = str(info["curve_publickey"]).encode("ascii")
        sock.connect(f"tcp://{address}:{info['shell_port']}")
        sent = session.send(sock, "execute_request", content) or {}
        msg_id = sent.get("header", {}).get("msg_id")
        deadline = timeout * 1000
        while sock.poll(int(deadline)):
            _, reply = session.recv(sock)
            if reply is not None and reply["parent_header"].get("msg_id") == msg_id:
                return bool(reply["content"].get("status") == "ok")
            deadline = 100  # an unrelated reply: look once more, briefly
        return False
    finally:
        sock.close(0)


def end_idle(kernel: KubeKernel, reason: str) -> None:
    """The monitor of ``kernel`` fired (in its thread): tell the clients in their last cell,
    then have the provisioner end the kernel as it ends an idle container
    (``DockerSandboxProvisioner._end_from_monitor``). Never raises."""
    prov = kernel.prov
    notice = stopped_notice(reason)
    prov.notice = notice
    parent = kernel.monitor.request if kernel.monitor is not None else None
    if kernel.info is not None and kernel.address:
        try:
            told = tell_in_pod(kernel.info, kernel.address, notice, parent)
            prov.log.info(
                "kernel %s: %s its clients why it ends: %s",
                prov.kernel_id,
                "told" if told else "could not tell (no answer)",
                notice.text,
            )
            if told:
                time.sleep(DELIVERY)  # the notice on its way before the pod goes
        except Exception as exc:  # cosmetic: the kernel ends either way
            prov.log.warning(
                "kernel %s: could not tell its clients why it ends: %s", prov.kernel_id, exc
            )
    prov._end_from_monitor(reason)

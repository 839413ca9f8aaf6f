"""Say in the notebook why a sandboxed kernel ended, when the host knows and the kernel cannot.

A kernel killed for using more memory than its sandbox allows, or ended by ``idle_timeout`` or
``kernel-sandbox stop``, cannot explain itself: clients only see a kernel that "appears to have
died". The host knows why (Docker's ``OOMKilled``, the monitor's reason), and it holds the
kernel's session key. Once the container has ended, nothing is bound at the kernel's IOPub
socket (``<runtime dir>/s/k-<iopub port>``), and every client still subscribed there (Jupyter
Server's websockets, nbclient, ``jupyter console``, the server's activity tracker) keeps
reconnecting to that path. :func:`publish` binds an XPUB socket there, waits until they have
subscribed again, sends one message signed with the session key, and releases the path before
the next container binds it. The message carries the parent header of the cell that was
running, so JupyterLab shows it in that cell's output.

Cosmetic, never a security signal: the kernel holds the same key, so a client cannot tell
this message from one the kernel forged. It is only ever sent when the container is no longer
running (no process of the sandbox can then touch the shared directory).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
from jupyter_client.session import Session

from kernel_sandbox.policy.values import format_size

__all__ = ["DELIVERY", "Notice", "memory_notice", "publish", "stopped_notice"]

# How long publish waits for the first subscriber, then for the others to follow. A client's
# SUB socket retries a vanished ipc peer every 100 ms (ZeroMQ's reconnect_ivl default).
FIRST_SUBSCRIBER = 1.0
SETTLE = 0.3
LINGER_MS = 1000
# How long the caller should let its own event loop run after a send before reporting the
# kernel dead: a client on that loop (nbclient) stops reading IOPub once it learns.
DELIVERY = 0.3
TOPIC = b"kernel-sandbox.notice"


@dataclass(frozen=True)
class Notice:
    """One message for the user: an IOPub ``error`` (a cell failed) or ``stream`` (stderr)."""

    msg_type: str  # "error" or "stream"
    content: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the same, as one plain line or two, for logs and error messages


def memory_notice(limit: int) -> Notice:
    """The kernel's container was killed for exceeding its memory limit of ``limit`` bytes."""
    size = format_size(limit)
    headline = (
        f"The kernel ran out of memory: it used more than its sandbox's memory limit "
        f"({size}) and was stopped. Its variables are gone."
    )
    fix = (
        "To raise the limit, set the policy key memory_limit: in the kernelspec "
        "(kernel-sandbox install --memory-limit 4g ...) or in Jupyter config "
        '(c.DockerSandboxProvisioner.memory_limit = "4g"), within the operator\'s ceilings; '
        "or work on less data at a time."
    )
    red = "\x1b[0;31m"
    reset = "\x1b[0m"
    content = {
        "ename": "KernelOutOfMemory",
        "evalue": f"the kernel used more than its memory limit ({size}) and was stopped",
        "traceback": [f"{red}KernelOutOfMemory{reset}: {headline}", fix],
    }
    return Notice("error", content, f"{headline} {fix}")


def stopped_notice(reason: str) -> Notice:
    """The host ended the kernel (``reason`` as the monitor words it: idle, operator stop)."""
    text = (
        f"kernel-sandbox: this kernel was shut down: {reason}. Its variables are gone; "
        "start a new kernel (or reconnect the notebook to one) to go on.\n"
    )
    return Notice("stream", {"name": "stderr", "text": text}, text.strip())


def publish(
    path: str,
    key: bytes,
    signature_scheme: str,
    notice: Notice,
    parent: Mapping[str, Any] | None = None,
    first_subscriber: float = FIRST_SUBSCRIBER,
    settle: float = SETTLE,
) -> int:
    """Send ``notice`` to the clients of a dead kernel's IOPub socket at ``path`` (ipc).

    Blocking (at most ``first_subscriber + settle`` seconds plus the linger): run it in a
    worker thread. The caller makes sure no container of the kernel runs.

    Returns:
        How many subscriptions arrived (0: nobody was listening, nothing was sent).

    Raises:
        zmq.ZMQError: the path could not be bound.
    """
    session = Session(key=key, signature_scheme=signature_scheme, username="kernel-sandbox")
    socket: zmq.Socket = zmq.Context.instance().socket(zmq.XPUB)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # one message per subscriber, not per topic
    try:
        socket.bind(f"ipc://{path}")  # ZeroMQ removes the dead kernel's socket file first
        subscribers = 0
        deadline = time.monotonic() + first_subscriber
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not socket.poll(int(left * 1000)):
                break
            if socket.recv()[:1] == b"\x01":  # a subscription (b"\x00...": unsubscription)
                if subscribers == 0:
                    deadline = time.monotonic() + settle
                subscribers += 1
        if subscribers:
            session.send(
                socket,
                notice.msg_type,
                notice.content,
                parent=dict(parent or {}),
                ident=TOPIC,
            )
        return subscribers
    finally:
        socket.close()  # lingers until sent, then removes its socket file

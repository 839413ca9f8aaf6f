"""Runs INSIDE the sandbox: no limit on the kernel's own IOPub send queue.

ipykernel's IOPub socket keeps ZeroMQ's default send high-water mark, 1,000 messages, past
which it silently drops messages. The only reader of that socket is the host-side IOPub
relay, a thread of the owner's process: when that process is busy (other threads holding the
interpreter lock for 0.2-0.5 s) a burst of output outgrows the queue and loses its tail,
``status: idle`` included, and every client then waits forever (measured: 10 of 15 bursts of
1,000 flushed lines under a busy owner). So the queue gets no limit (``SNDHWM`` 0): what the
relay has not read yet waits in the kernel's memory, which its cgroup bounds; a kernel that
outruns its relay for long (over ``iopub_rate``) runs out of its own memory and is seen to die
of it, instead of losing output. Nothing here is a security boundary: the kernel can undo it
and only loses its own output.

libzmq (4.2 and later) applies a changed ``SNDHWM`` to the pipes of peers already connected,
and ZeroMQ sockets are not thread-safe, so the option is set from the IOPub thread's loop.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["IOPUB_SNDHWM", "unbound_iopub_queue"]

IOPUB_SNDHWM = 0  # no limit: the kernel's memory limit is the bound
WAIT = 5.0  # seconds to wait for the IOPub thread to apply it


def unbound_iopub_queue(kernel: Any, hwm: int = IOPUB_SNDHWM) -> bool:
    """Set the send high-water mark of ``kernel``'s IOPub socket (an ipykernel Kernel) to
    ``hwm``, on its IOPub thread; return whether it was applied."""
    import zmq

    thread = getattr(kernel, "iopub_thread", None)
    socket: Any = getattr(thread, "socket", None)
    if thread is None or not hasattr(socket, "setsockopt") or not hasattr(thread, "schedule"):
        return False  # not an ipykernel we know: leave it as it is
    done = threading.Event()
    applied: list[bool] = []

    def apply() -> None:
        try:
            socket.setsockopt(zmq.SNDHWM, hwm)
            applied.append(True)
        finally:
            done.set()

    thread.schedule(apply)  # runs at once if the thread is not running
    done.wait(WAIT)
    return bool(applied)

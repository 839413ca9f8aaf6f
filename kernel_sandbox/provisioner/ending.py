"""Ending a served kernel in a Jupyter Server so that JupyterLab says why.

JupyterLab (4.x) shows a kernel's ``reason`` in a dialog when its websocket closes and the
kernel's model (``GET /api/kernels/ID``) says ``execution_state: "dead"``. A kernel that Jupyter
Server just shuts down is gone from that API by then (404), so the notebook shows only "No
Kernel" and a cell that finished long before (an idle cull) never shows the sandbox's notice.
So when the sandbox service has ended a kernel for a reason (``idle_timeout``, an operator's
stop), the server's kernel is first marked dead with the notice as its reason and its
``ready`` future failed with it (a client's reconnect is then refused with that reason, and
JupyterLab, on a refused reconnect, fetches the model and shows the reason), its websocket
connections are closed, and the kernel is shut down a few seconds later, as the server's own
culler would (no restart), and its resources cleaned (jupyter_client forgets a kernel whose
``ready`` failed without cleaning it; the service cleans what it ended in any case).

The connections are found through the restart callbacks each one registers on the kernel
manager (jupyter_server's ``ZMQChannelsWebsocketConnection.on_restart_failed``); a server
without them just shuts the kernel down as before.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

__all__ = ["KernelEnded", "close_connections", "end_with_reason"]

SETTLE = 1.0  # seconds for the notice already on its way to reach the websockets
# Not 1000/1001 (a normal closure, after which JupyterLab just shows "disconnected"): a client
# reconnects, is refused (the kernel's ready future failed) and then fetches the model.
CLOSE_CODE = 4000
GRACE = 10.0  # seconds the clients have to reconnect and fetch the dead kernel's model


class KernelEnded(Exception):
    """Why the kernel ended, as a reconnecting client is told."""


def close_connections(manager: Any) -> int:
    """Close the websocket connections of ``manager``'s kernel; how many were closed."""
    restarter = getattr(manager, "_restarter", None)
    callbacks = getattr(restarter, "callbacks", None) or {}
    closed = 0
    for callback in list(callbacks.get("dead", ())):
        connection = getattr(callback, "__self__", None)
        handler = getattr(connection, "websocket_handler", None)
        close = getattr(handler, "close", None)
        if callable(close):
            try:
                close(CLOSE_CODE, "kernel-sandbox: the kernel was shut down")
                closed += 1
            except Exception:  # a connection that is going anyway
                pass
    return closed


async def end_with_reason(
    multi: Any, kernel_id: str, manager: Any, reason: str, log: Any, grace: float = GRACE
) -> None:
    """Mark the kernel dead with ``reason``, close its connections, shut it down (never
    raises: a failure to tell is logged, the shutdown still happens)."""
    try:
        stop_restarter = getattr(manager, "stop_restarter", None)
        if callable(stop_restarter):
            stop_restarter()  # its end is not a death to restart from
        manager.execution_state = "dead"
        manager.reason = reason
        if hasattr(manager, "_ready"):  # jupyter_client's: the websocket handler awaits it
            ended = asyncio.get_running_loop().create_future()
            ended.set_exception(KernelEnded(reason))
            ended.exception()  # retrieved: not logged as never retrieved
            manager._ready = ended
        await asyncio.sleep(SETTLE)
        if close_connections(manager):
            await asyncio.sleep(grace)
    except Exception as exc:
        log.warning("kernel %s: could not tell its clients why it ended: %s", kernel_id, exc)
    try:
        await multi.shutdown_kernel(kernel_id)
    except Exception as exc:  # already gone
        log.warning("kernel %s: shutdown after its end: %s", kernel_id, exc)
    try:  # a kernel whose ready future failed is forgotten without its cleanup: do it
        cleaned = manager.cleanup_resources(restart=False)
        if inspect.isawaitable(cleaned):
            await cleaned
    except Exception as exc:
        log.warning("kernel %s: cleanup after its end: %s", kernel_id, exc)

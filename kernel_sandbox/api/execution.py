"""One execution in a kernel, as the Python API runs it: with a timeout that interrupts, then
restarts, its IOPub messages gathered into a :class:`RunResult`; and a silent evaluation.

Functions of the kernel's manager and client (jupyter_client's async ones), so that the
sandbox object keeps only its lifecycle and its policy.
"""

from __future__ import annotations

import queue
import time
from dataclasses import replace
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from kernel_sandbox.api.results import ExecutionError, Outputs, RunResult

__all__ = ["evaluate", "execute"]

POLL = 0.5  # seconds between liveness checks while waiting for a kernel's messages
REPLY_WAIT = 10.0  # seconds for the shell reply once the execution is idle


async def execute(
    km: AsyncKernelManager,
    kc: Any,
    code: str,
    timeout: float | None,
    grace: float,
    start_timeout: float,
) -> tuple[RunResult, bool]:
    """Run ``code``; return its result, and whether the kernel died meanwhile.

    Past ``timeout`` the kernel is interrupted; if the execution has not ended ``grace``
    seconds later, the kernel is restarted (and waited for, ``start_timeout``).
    """
    started = time.monotonic()
    msg_id = kc.execute(code, allow_stdin=False)
    outputs = Outputs()
    deadline = started + timeout if timeout is not None else None
    state = await _collect(km, kc, msg_id, outputs, deadline)
    timed_out = restarted = False
    if state == "deadline":
        timed_out = True
        await km.interrupt_kernel()
        state = await _collect(km, kc, msg_id, outputs, time.monotonic() + grace)
        if state == "deadline":
            restarted = True
            await km.restart_kernel(now=True)
            await kc.wait_for_ready(timeout=start_timeout)
    reply = await _reply(kc, msg_id, REPLY_WAIT) if state == "idle" else {}
    error = outputs.error
    if error is None and reply.get("status") == "error":
        error = ExecutionError(
            str(reply.get("ename", "")),
            str(reply.get("evalue", "")),
            list(reply.get("traceback", [])),
        )
    if timed_out:
        what = f"the code ran longer than its timeout ({timeout:g}s) and was interrupted"
        if restarted:
            what += "; it did not stop, so the kernel was restarted: its variables are gone"
        error = ExecutionError("TimeoutError", what, error.traceback if error else [])
    result = outputs.result(
        execution_count=reply.get("execution_count", outputs.execution_count),
        timed_out=timed_out,
        restarted=restarted,
        duration=time.monotonic() - started,
    )
    return replace(result, error=error), state == "died"


async def evaluate(kc: Any, expression: str, timeout: float) -> dict[str, Any] | None:
    """Evaluate ``expression`` as a user expression of a silent execution (no history, no
    outputs, no IPython input transformations); its value as the reply carries it
    (``status``, ``data`` or ``ename``/``evalue``), or None if no reply came in time."""
    msg_id = kc.execute("", silent=True, store_history=False, user_expressions={"v": expression})
    reply = await _reply(kc, msg_id, timeout)
    return dict(reply.get("user_expressions", {}).get("v", {})) if reply else None


async def _collect(
    km: AsyncKernelManager, kc: Any, msg_id: str, outputs: Outputs, deadline: float | None
) -> str:
    """Read IOPub until this execution is idle ("idle"), ``deadline`` passes ("deadline")
    or the kernel dies ("died")."""
    while True:
        wait = POLL if deadline is None else min(POLL, deadline - time.monotonic())
        if wait <= 0:
            return "deadline"
        try:
            msg = await kc.get_iopub_msg(timeout=wait)
        except queue.Empty:
            if not await km.is_alive():
                await _drain(kc, msg_id, outputs)
                return "died"
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if outputs.add(msg):
            return "idle"


async def _drain(kc: Any, msg_id: str, outputs: Outputs) -> None:
    """Take what is already queued (a dead kernel's notice comes last)."""
    while True:
        try:
            msg = await kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            return
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            outputs.add(msg)


async def _reply(kc: Any, msg_id: str, timeout: float) -> dict[str, Any]:
    """The shell reply to ``msg_id`` (replies to abandoned requests are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            return dict(msg["content"])
    return {}

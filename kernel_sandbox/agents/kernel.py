"""One agent session's sandboxed kernel: start, run code, interrupt, restart, shut down.

The kernel is started the way every other client starts one, through jupyter_client's
``AsyncKernelManager`` and the kernelspec's provisioner (``docker-sandbox``), with the Jupyter
config ``kernel-sandbox run`` uses (:func:`kernel_sandbox.batch.config.kernel_config`): there
is no second path to the engine, and the kernelspec and profile are the operator's.

:meth:`SandboxKernel.run` waits for an execution's end (the kernel going idle), and meanwhile
reports progress, interrupts the kernel when the call's time is up, and notices a kernel that
died (out of memory, killed): the provisioner's notice then says why.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from kernel_sandbox.agents.outputs import Outputs

__all__ = ["Busy", "KernelGone", "RunResult", "SandboxKernel"]

PROGRESS_EVERY = 2.0  # seconds between progress reports of a long run
POLL_EVERY = 1.0  # seconds between checks that the kernel still runs
INTERRUPT_GRACE = 20.0  # seconds a run may take to stop after an interrupt
log = logging.getLogger(__name__)

Progress = Callable[[float, str], Awaitable[None]]


class KernelGone(RuntimeError):
    """The session's kernel is not running (it died, or failed to start); restart it."""


class Busy(RuntimeError):
    """Another run is still in progress in this session's kernel."""


@dataclass
class RunResult:
    """How one execution ended: ``ok``, ``error`` (the code raised), ``timeout`` (interrupted
    when its time was up), ``died`` (the kernel ended) or ``restarted`` (during the run)."""

    status: str
    outputs: Outputs = field(default_factory=Outputs)
    execution_count: int | None = None
    seconds: float = 0.0
    note: str = ""


class SandboxKernel:
    """The kernel of one MCP session (``kernel_name`` started with ``config`` in ``cwd``)."""

    def __init__(
        self, kernel_name: str, config: Config, cwd: str | None, startup_timeout: float
    ) -> None:
        self.kernel_name, self.config, self.cwd = kernel_name, config, cwd
        self.startup_timeout = startup_timeout
        self.km: AsyncKernelManager | None = None
        self.kc: Any = None
        self._start_lock = asyncio.Lock()
        self._running = False
        self._generation = 0  # bumped at each restart: a run of an older one has ended
        self._closed = False
        self._dead = False  # seen ended (by a run or alive()); until the next restart

    # -- what it is -------------------------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        return self.km.kernel_id if self.km else None

    @property
    def container_name(self) -> str | None:
        provisioner = self.km.provisioner if self.km else None
        return getattr(provisioner, "container_name", None)

    @property
    def provisioner(self) -> Any:
        return self.km.provisioner if self.km else None

    async def alive(self) -> bool:
        """Whether the kernel's container runs (asks the engine)."""
        alive = self.km is not None and bool(await self.km.is_alive())
        self._dead = self.km is not None and not alive
        return alive

    async def death_reason(self) -> str:
        """Why the kernel is not running, for the agent."""
        if self.km is None:
            return "the kernel has not started"
        text = str(getattr(getattr(self.provisioner, "notice", None), "text", "") or "")
        if text:
            return text
        code = None
        if self.km.provisioner is not None:
            try:
                code = await self.km.provisioner.poll()
            except Exception:  # an engine gone: the reason below is all there is
                code = None
        return (
            f"the kernel's sandbox ended (exit status {code})"
            if code is not None
            else ("the kernel's sandbox ended")
        )

    # -- life -------------------------------------------------------------------------------

    async def ensure_started(self) -> None:
        """Start the kernel if this session has none yet (once; concurrent callers wait)."""
        async with self._start_lock:
            if self._closed:
                raise KernelGone("this session has ended")
            if self.km is not None:
                return
            km = AsyncKernelManager(kernel_name=self.kernel_name, config=self.config)
            try:
                await km.start_kernel(cwd=self.cwd)
                self.km = km
                await self._connect()
            except BaseException:
                self.km = None
                await _quietly(km.shutdown_kernel(now=True))
                raise
            log.info(
                "kernel %s started for an MCP session (container %s)",
                km.kernel_id,
                self.container_name,
            )

    async def _connect(self) -> None:
        assert self.km is not None
        if self.kc is not None:
            self.kc.stop_channels()
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=self.startup_timeout)

    async def interrupt(self) -> None:
        await self._require_alive()
        assert self.km is not None
        await self.km.interrupt_kernel()

    async def restart(self) -> None:
        """A fresh kernel in a fresh container (variables gone); also brings a dead one back."""
        await self.ensure_started()
        assert self.km is not None
        self._generation += 1
        await self.km.restart_kernel(now=True)
        self._dead = False
        await self._connect()

    async def shutdown(self) -> None:
        """Stop the kernel and remove its container (never raises)."""
        self._closed = True
        async with self._start_lock:
            km, self.km = self.km, None
            if self.kc is not None:
                self.kc.stop_channels()
                self.kc = None
            if km is not None:
                await _quietly(km.shutdown_kernel(now=True))
                log.info("kernel %s shut down: its MCP session ended", km.kernel_id)

    async def _require_alive(self) -> None:
        await self.ensure_started()
        if not await self.alive():
            raise KernelGone(
                f"the kernel is not running: {await self.death_reason()}. Call restart_kernel "
                "for a fresh one (its variables are gone)."
            )

    # -- running code -----------------------------------------------------------------------

    async def run(self, code: str, timeout: float, progress: Progress | None = None) -> RunResult:
        """Execute ``code``; interrupt it after ``timeout`` seconds.

        Raises:
            Busy: another run has not ended yet.
            KernelGone: the kernel is not running.
        """
        if self._running:
            raise Busy(
                "another run is still in progress in this kernel; wait for it, or call "
                "interrupt_kernel"
            )
        self._running = True
        try:
            await self.ensure_started()
            if self._dead:  # else the run's own polling finds a kernel that ended since
                await self._require_alive()
            return await self._run(code, timeout, progress)
        finally:
            self._running = False

    async def _run(self, code: str, timeout: float, progress: Progress | None) -> RunResult:
        assert self.km is not None and self.kc is not None
        kc, generation = self.kc, self._generation
        started = time.monotonic()
        result = RunResult("ok")
        msg_id = kc.execute(code, store_history=True, allow_stdin=False)
        interrupted_at: float | None = None
        next_poll, next_progress = started + POLL_EVERY, started
        try:
            while True:
                now = time.monotonic()
                if self._generation != generation:
                    result.status, result.note = "restarted", "the kernel was restarted"
                    break
                if interrupted_at is None and now - started > timeout:
                    await self.km.interrupt_kernel()
                    interrupted_at = now
                    result.status = "timeout"
                    result.note = f"interrupted: the run took longer than {timeout:g} s"
                if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                    result.note += (
                        f"; it did not stop within {INTERRUPT_GRACE:g} s of the interrupt. "
                        "Call restart_kernel to get a kernel that answers"
                    )
                    break
                if now >= next_poll:
                    next_poll = now + POLL_EVERY
                    if not await self.alive():
                        await self._drain(kc, msg_id, result.outputs, 2.0)
                        result.status = "died"
                        result.note = (
                            f"the kernel died: {await self.death_reason()}. Call restart_kernel "
                            "for a fresh one (its variables are gone)."
                        )
                        break
                if progress is not None and now >= next_progress + PROGRESS_EVERY:
                    next_progress = now
                    await progress(now - started, _progress_note(result.outputs))
                try:
                    msg = await kc.get_iopub_msg(timeout=0.5)
                except queue.Empty:
                    continue
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["header"]["msg_type"] == "status":
                    if msg["content"].get("execution_state") == "idle":
                        break
                    continue
                result.outputs.add_message(msg)
        except asyncio.CancelledError:
            # The client gave up on the call: do not leave the code running in its name.
            await asyncio.shield(_quietly(self.km.interrupt_kernel()))
            raise
        if result.status in ("ok", "timeout"):
            reply = await self._reply(kc, msg_id)
            if reply is not None:
                result.execution_count = reply.get("execution_count")
                if result.status == "ok" and reply.get("status") != "ok":
                    result.status = "error"
            elif result.status == "ok" and result.outputs.error is not None:
                result.status = "error"
        result.seconds = time.monotonic() - started
        return result

    async def _reply(self, kc: Any, msg_id: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                msg = await kc.get_shell_msg(timeout=1)
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return dict(msg["content"])
        return None

    async def _drain(self, kc: Any, msg_id: str, outputs: Outputs, seconds: float) -> None:
        """Collect what is still on IOPub for ``msg_id`` (a dead kernel's notice)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = await kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                if msg["header"]["msg_type"] != "status":
                    outputs.add_message(msg)


def _progress_note(outputs: Outputs) -> str:
    lines = "".join(p for p in outputs.parts if isinstance(p, str)).splitlines()
    last = lines[-1][:200] if lines else ""
    return f"still running; last output: {last}" if last else "still running"


async def _quietly(step: Awaitable[Any]) -> None:
    try:
        await step
    except Exception as exc:  # cleanup must not raise into the session's teardown
        log.warning("kernel cleanup step failed: %s", exc)

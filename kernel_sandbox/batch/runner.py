"""The batch engine behind ``kernel-sandbox run``: every notebook in its own fresh kernel.

Built on nbclient: each notebook gets a new ``AsyncKernelManager`` (so, with the default
``python3-sandbox`` kernelspec, a new container), its cells run through nbclient's own cell
execution, and the kernel is shut down in ``finally`` whatever happened: a failing cell, a
hang past ``timeout``, a kernel that died, or a cancelled run. ``jobs`` notebooks run at
once in one event loop.

Results are plain data (:class:`NotebookResult`); a caller watches them change through the
``on_change`` callback and turns them into a display, a JUnit report and an exit code.
A setup error (engine down, image missing, unknown kernelspec or profile) would hit every
notebook, so the first one stops the batch: notebooks not yet started are skipped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import ensure_async

from kernel_sandbox.batch.config import kernel_config, load_jupyter_config, preflight
from kernel_sandbox.batch.failures import SETUP_ERRORS, START_FAILURES, death, is_setup_error
from kernel_sandbox.batch.metadata import (
    load_parameters,
    record_sandbox,
    sandbox_of,
    settings_of,
)
from kernel_sandbox.batch.notebooks import CellMap, discover, inject_parameters, parse_value
from kernel_sandbox.batch.options import RunOptions, default_jobs
from kernel_sandbox.batch.results import (
    NotebookResult,
    Status,
    fail,
    fail_in_cell,
    stream_output,
    write_csv,
    write_junit,
)
from kernel_sandbox.errors import KernelspecError, KernelStartError, SandboxError

if TYPE_CHECKING:
    from nbclient import NotebookClient

# nbformat and nbclient are imported where they are used: nbformat's JSON schema support
# takes seconds to import, which every other `kernel-sandbox` command would pay.

__all__ = [
    "SETUP_ERRORS",
    "BatchRunner",
    "NotebookResult",
    "RunOptions",
    "Status",
    "default_jobs",
    "discover",
    "inject_parameters",
    "kernel_config",
    "load_jupyter_config",
    "load_parameters",
    "parse_value",
    "preflight",
    "write_csv",
    "write_junit",
]

# -- running --------------------------------------------------------------------------------


class _NotebookTimeout(Exception):
    """The whole notebook ran past its limit (--notebook-timeout)."""


@dataclass
class _Run:
    """One notebook's kernel manager (a new one per start attempt) and where it is."""

    km: AsyncKernelManager
    cell_timeout: int | None = None
    notebook_timeout: int | None = None  # the cells together, from the first one's start
    cells: CellMap = field(default_factory=lambda: CellMap(()))
    index: int | None = None  # the cell running, as an index into the executed notebook
    cut_short: bool = False  # the running cell's limit is what is left of notebook_timeout

    def label(self) -> str:
        return self.cells.label(self.index) if self.index is not None else ""


def _tried(what: str, result: NotebookResult) -> str:
    """``what``, saying how many starts were tried when --retries gave more than one."""
    if not result.retries:
        return what
    return f"{what} (the kernel failed to start {len(result.retries) + 1} times: --retries)"


def _is_code(cell: Any, skip_tag: str) -> bool:
    return (
        cell.cell_type == "code"
        and bool(cell.source.strip())
        and skip_tag not in cell.get("metadata", {}).get("tags", [])
    )


class BatchRunner:
    """Run notebooks, ``options.jobs`` at a time, each in a fresh kernel.

    ``kernel_manager_factory`` is injectable (it gets ``kernel_name`` and ``config``);
    ``on_change`` is called with a result each time its status or cell counter moves.
    """

    def __init__(
        self,
        notebooks: Iterable[tuple[Path, str]],
        options: RunOptions,
        on_change: Callable[[NotebookResult], None] | None = None,
        kernel_manager_factory: Callable[..., AsyncKernelManager] = AsyncKernelManager,
    ):
        self.options = options
        self.results = [
            NotebookResult(path=path, name=name, output=self._output_path(path, name))
            for path, name in notebooks
        ]
        self.on_change = on_change or (lambda result: None)
        self._km_factory = kernel_manager_factory
        self.setup_error: SandboxError | None = None

    def _output_path(self, path: Path, name: str) -> Path | None:
        if self.options.inplace:
            return path
        if self.options.output_dir is not None:
            return self.options.output_dir / name
        return None

    async def run(self) -> list[NotebookResult]:
        """Run every notebook; on cancellation, shut down the running kernels first."""
        gate = asyncio.Semaphore(max(1, self.options.jobs))
        tasks = [asyncio.ensure_future(self._run_one(r, gate)) for r in self.results]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)  # each one's finally shuts its kernel down
            raise
        return self.results

    def _changed(self, result: NotebookResult) -> None:
        if result.status.done and result.started is not None:
            result.duration = time.monotonic() - result.started
        self.on_change(result)

    async def _run_one(self, result: NotebookResult, gate: asyncio.Semaphore) -> None:
        import nbformat

        await gate.acquire()
        held = True

        def free_slot() -> None:  # the next notebook may start while this kernel shuts down
            nonlocal held
            if held:
                held = False
                gate.release()

        try:
            if self.setup_error is not None:
                result.status, result.summary = Status.SKIPPED, "not run: setup error"
                self._changed(result)
                return
            result.started = time.monotonic()
            try:
                nb = nbformat.read(result.path, as_version=4)
            except Exception as exc:  # any unreadable file is this notebook's failure only
                fail(result, Status.FAILED, type(exc).__name__, f"cannot read the notebook: {exc}")
                self._changed(result)
                return
            try:
                await self._execute(result, nb, free_slot)
            finally:
                self._write(result, nb)
                self._changed(result)
        finally:
            free_slot()

    async def _execute(
        self, result: NotebookResult, nb: Any, free_slot: Callable[[], None]
    ) -> None:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

        options = self.options
        try:
            settings = settings_of(nb)
        except ValueError as exc:
            fail(result, Status.FAILED, "MetadataError", str(exc))
            return
        if settings.skip:
            result.status, result.summary = Status.SKIPPED, settings.skip
            return
        cell_timeout = options.timeout if settings.timeout is None else settings.timeout or None
        whole = settings.notebook_timeout
        notebook_timeout = options.notebook_timeout if whole is None else whole or None
        km = self._km_factory(kernel_name=options.kernel, config=options.config)
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=options.kernel,
            timeout=cell_timeout,
            startup_timeout=options.startup_timeout,
            allow_errors=options.allow_errors,
            resources={"metadata": {"path": str(result.path.parent)}},
        )
        run = _Run(km=km, cell_timeout=cell_timeout, notebook_timeout=notebook_timeout)
        graceful = False
        try:
            try:
                spec = km.kernel_spec
            except NoSuchKernel as exc:
                raise KernelspecError(
                    f"no kernelspec named {options.kernel!r}; run `kernel-sandbox install`"
                ) from exc
            language = ((spec.language if spec is not None else "") or "python").lower()
            try:
                injected = inject_parameters(nb, options.parameters, language)
            except ValueError as exc:
                fail(result, Status.FAILED, "ParameterError", str(exc))
                return
            skip_tag = client.skip_cells_with_tag
            code = tuple(
                i for i, c in enumerate(nb.cells) if _is_code(c, skip_tag) and i != injected
            )
            run.cells = CellMap(code, injected)
            result.cells = len(code)
            try:
                await self._run_cells(result, nb, client, run)
            except CellTimeoutError:
                if run.cut_short:
                    raise _NotebookTimeout from None
                raise
            result.status = Status.PASSED
            graceful = True
        except _NotebookTimeout:
            by = "its metadata" if whole else "--notebook-timeout"
            fail_in_cell(
                result,
                nb,
                run.index,
                run.label(),
                Status.TIMED_OUT,
                "NotebookTimeout",
                f"the notebook ran past {notebook_timeout}s ({by})",
            )
        except CellTimeoutError:
            by = "its metadata" if settings.timeout else "--timeout"
            fail_in_cell(
                result,
                nb,
                run.index,
                run.label(),
                Status.TIMED_OUT,
                "CellTimeoutError",
                f"no reply within {cell_timeout}s ({by})",
            )
        except CellExecutionError as exc:
            what = f"{exc.ename}: {exc.evalue}"
            fail_in_cell(result, nb, run.index, run.label(), Status.FAILED, exc.ename, what)
        except DeadKernelError:
            error_type, what = await death(run.km)
            fail_in_cell(result, nb, run.index, run.label(), Status.FAILED, error_type, what)
        except Exception as exc:  # setup errors, start failures, and anything unforeseen
            self._failed_outside_cells(result, exc)
        finally:
            free_slot()
            await self._shutdown(client, run.km, graceful)
            result.stdout = stream_output(nb)

    def _failed_outside_cells(self, result: NotebookResult, exc: Exception) -> None:
        if is_setup_error(exc):
            assert isinstance(exc, SandboxError)
            result.setup_error = exc
            if self.setup_error is None:
                self.setup_error = exc
            what = str(exc)
            if isinstance(exc, KernelStartError):  # the engine refused the container
                what += (
                    f"; check the policy of {self.options.kernel}: "
                    f"`kernel-sandbox policy show {self.options.kernel}`"
                )
            fail(result, Status.ERROR, type(exc).__name__, what)
        elif isinstance(exc, KernelStartError):
            fail(result, Status.FAILED, "KernelStartError", _tried(str(exc), result))
        elif isinstance(exc, TimeoutError):  # wait_for_ready
            what = (
                f"the kernel was not ready within {self.options.startup_timeout}s "
                f"(--startup-timeout): {exc}"
            )
            fail(result, Status.TIMED_OUT, "StartupTimeout", _tried(what, result))
        else:  # a kernel that died while starting, and anything unforeseen
            fail(result, Status.FAILED, type(exc).__name__, _tried(str(exc) or repr(exc), result))

    async def _run_cells(
        self, result: NotebookResult, nb: Any, client: NotebookClient, run: _Run
    ) -> None:
        """Start the kernel (retrying a failed start), record the sandbox, run the cells."""
        result.status = Status.STARTING
        self._changed(result)
        await self._start(result, client, run)
        result.status = Status.RUNNING
        self._changed(result)
        client.reset_execution_trackers()
        assert client.kc is not None
        reply = await client.async_wait_for_reply(await ensure_async(client.kc.kernel_info()))
        if reply is not None and "language_info" in reply["content"]:
            nb.metadata["language_info"] = reply["content"]["language_info"]
        await record_sandbox(nb, self.options.kernel, run.km)
        result.sandbox = sandbox_of(nb, run.km)
        deadline = time.monotonic() + (run.notebook_timeout or 0)
        for index, cell in enumerate(nb.cells):
            run.index = index
            if run.notebook_timeout and cell.cell_type == "code":
                # what is left of the notebook's time limits the cell: nbclient's own timeout
                # then stops it cleanly, as it does for --timeout
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _NotebookTimeout
                run.cut_short = run.cell_timeout is None or left < run.cell_timeout
                client.timeout = max(1, math.ceil(left)) if run.cut_short else run.cell_timeout
            if cell.cell_type == "code":
                if index in run.cells.code:
                    result.cell += 1
                result.where, result.cell_started = run.label(), time.monotonic()
                self._changed(result)
            await client.async_execute_cell(
                cell, index, execution_count=client.code_cells_executed + 1
            )
        client.set_widgets_metadata()

    async def _start(self, result: NotebookResult, client: NotebookClient, run: _Run) -> None:
        """Start the kernel; a kernel that failed to start gets ``options.retries`` more tries,
        each in a new kernel (never a cell that failed: that is the notebook's)."""
        while True:
            try:
                await client.async_start_new_kernel()
                await client.async_start_new_kernel_client()
                return
            except START_FAILURES as exc:
                if len(result.retries) >= self.options.retries or is_setup_error(exc):
                    raise
                result.retries.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                self._changed(result)
                await self._shutdown(client, run.km, graceful=False)
                options = self.options
                run.km = self._km_factory(kernel_name=options.kernel, config=options.config)
                client.km = run.km

    async def _shutdown(
        self, client: NotebookClient, km: AsyncKernelManager, graceful: bool
    ) -> None:
        """Stop the channels and the kernel; never raise (the result matters more)."""
        try:
            if client.kc is not None:
                client.kc.stop_channels()
                client.kc = None
            if km.has_kernel:
                await km.shutdown_kernel(now=not graceful)
        except Exception as exc:
            client.log.warning("kernel-sandbox run: shutting down the kernel failed: %s", exc)
            try:
                await km.cleanup_resources()
            except Exception:
                pass

    def _write(self, result: NotebookResult, nb: Any) -> None:
        if result.output is None or result.status in (Status.ERROR, Status.SKIPPED):
            return
        import nbformat

        try:
            result.output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, result.output)
        except OSError as exc:
            if result.ok:
                fail(
                    result,
                    Status.FAILED,
                    type(exc).__name__,
                    f"cannot write the executed notebook: {exc}",
                )
            else:
                result.summary += f" (and cannot write the executed notebook: {exc})"

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
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import ensure_async

from kernel_sandbox.batch.config import kernel_config, load_jupyter_config, preflight
from kernel_sandbox.batch.notebooks import discover, inject_parameters, parse_value
from kernel_sandbox.batch.options import RunOptions, default_jobs
from kernel_sandbox.batch.results import (
    NotebookResult,
    Status,
    fail,
    fail_in_cell,
    stream_output,
    write_junit,
)
from kernel_sandbox.errors import (
    EngineUnavailable,
    ImageMissing,
    KernelspecError,
    KernelStartError,
    PolicyError,
    RuntimeUnavailable,
    SandboxError,
)
from kernel_sandbox.inside.contract import EXIT_KILLED

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
    "parse_value",
    "preflight",
    "write_junit",
]

PROVISIONER_NAME = "docker-sandbox"
# Errors that do not depend on the notebook: the first one stops the batch (exit 2).
SETUP_ERRORS: tuple[type[BaseException], ...] = (
    EngineUnavailable,
    ImageMissing,
    RuntimeUnavailable,
    PolicyError,
    KernelspecError,
)


# -- running --------------------------------------------------------------------------------


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
        km = self._km_factory(kernel_name=options.kernel, config=options.config)
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=options.kernel,
            timeout=options.timeout,
            startup_timeout=options.startup_timeout,
            allow_errors=options.allow_errors,
            resources={"metadata": {"path": str(result.path.parent)}},
        )
        index: int | None = None
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
                inject_parameters(nb, options.parameters, language)
            except ValueError as exc:
                fail(result, Status.FAILED, "ParameterError", str(exc))
                return
            code = {i for i, c in enumerate(nb.cells) if _is_code(c, client.skip_cells_with_tag)}
            result.cells = len(code)
            result.status = Status.STARTING
            self._changed(result)
            await client.async_start_new_kernel()
            await client.async_start_new_kernel_client()
            result.status = Status.RUNNING
            self._changed(result)
            client.reset_execution_trackers()
            assert client.kc is not None
            reply = await client.async_wait_for_reply(await ensure_async(client.kc.kernel_info()))
            if reply is not None and "language_info" in reply["content"]:
                nb.metadata["language_info"] = reply["content"]["language_info"]
            for index, cell in enumerate(nb.cells):
                if index in code:
                    result.cell += 1
                    self._changed(result)
                await client.async_execute_cell(
                    cell, index, execution_count=client.code_cells_executed + 1
                )
            client.set_widgets_metadata()
            result.status = Status.PASSED
            graceful = True
        except SETUP_ERRORS as exc:
            assert isinstance(exc, SandboxError)
            result.setup_error = exc
            if self.setup_error is None:
                self.setup_error = exc
            fail(result, Status.ERROR, type(exc).__name__, str(exc))
        except CellTimeoutError:
            fail_in_cell(
                result,
                nb,
                index,
                Status.TIMED_OUT,
                "CellTimeoutError",
                f"no reply within {options.timeout}s (--timeout)",
            )
        except CellExecutionError as exc:
            fail_in_cell(result, nb, index, Status.FAILED, exc.ename, f"{exc.ename}: {exc.evalue}")
        except DeadKernelError:
            status = await self._exit_status(km)
            fail_in_cell(
                result, nb, index, Status.FAILED, "DeadKernelError", f"the kernel died{status}"
            )
        except KernelStartError as exc:
            fail(result, Status.FAILED, "KernelStartError", str(exc))
        except TimeoutError as exc:  # wait_for_ready
            fail(
                result,
                Status.TIMED_OUT,
                "StartupTimeout",
                f"the kernel was not ready within {options.startup_timeout}s "
                f"(--startup-timeout): {exc}",
            )
        except Exception as exc:  # a kernel that died while starting, and anything unforeseen
            fail(result, Status.FAILED, type(exc).__name__, str(exc) or repr(exc))
        finally:
            free_slot()
            await self._shutdown(client, km, graceful)
            result.stdout = stream_output(nb)

    async def _exit_status(self, km: AsyncKernelManager) -> str:
        try:
            code = await km.provisioner.poll() if km.provisioner is not None else None
        except Exception:
            return ""
        if code is None:
            return ""
        notice = getattr(km.provisioner, "notice", None)  # why, when the host knows
        if notice is not None:
            return f" with exit status {code}: {notice.text}"
        hint = " (killed: out of memory or SIGKILL)" if code == EXIT_KILLED else ""
        return f" with exit status {code}{hint}"

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

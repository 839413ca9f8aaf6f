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
import enum
import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import ensure_async
from traitlets.config import Config

from kernel_sandbox.batch.config import kernel_config, load_jupyter_config, preflight
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
    "exit_code",
    "inject_parameters",
    "kernel_config",
    "load_jupyter_config",
    "parse_value",
    "preflight",
    "write_junit",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROVISIONER_NAME = "docker-sandbox"
# Errors that do not depend on the notebook: the first one stops the batch (exit 2).
SETUP_ERRORS: tuple[type[BaseException], ...] = (
    EngineUnavailable,
    ImageMissing,
    RuntimeUnavailable,
    PolicyError,
    KernelspecError,
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def default_jobs() -> int:
    """Notebooks at once by default: one per CPU, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


class Status(str, enum.Enum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    TIMED_OUT = "timed out"
    ERROR = "setup error"
    SKIPPED = "skipped"

    @property
    def done(self) -> bool:
        return self not in (Status.QUEUED, Status.STARTING, Status.RUNNING)


@dataclass
class NotebookResult:
    """One notebook's run, updated in place while it runs."""

    path: Path  # the source notebook
    name: str  # how reports name it (relative to the folder it was found in)
    output: Path | None = None  # where the executed notebook is written, if anywhere
    status: Status = Status.QUEUED
    cell: int = 0  # code cells started so far
    cells: int = 0  # code cells to run
    started: float | None = None
    duration: float = 0.0
    failed_cell: int | None = None  # index of the failing cell in the notebook
    summary: str = ""  # one line: what went wrong
    details: str = ""  # the failing cell's source and its traceback
    error_type: str = ""
    stdout: str = ""  # stream output of all cells, for the report
    setup_error: SandboxError | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.PASSED


@dataclass(frozen=True)
class RunOptions:
    kernel: str = "python3-sandbox"
    profile: str | None = None
    jobs: int = field(default_factory=default_jobs)
    timeout: int | None = 600  # per cell; None: no limit
    startup_timeout: int = 60
    allow_errors: bool = False
    parameters: Mapping[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None
    inplace: bool = False
    config: Config = field(default_factory=Config)  # Jupyter config for the kernel managers


# -- finding notebooks ----------------------------------------------------------------------


def discover(inputs: Sequence[Path], output_dir: Path | None = None) -> list[tuple[Path, str]]:
    """Notebooks named or found (recursively) under ``inputs``: (path, report name) pairs.

    Hidden folders (``.ipynb_checkpoints``) and the output folder are skipped.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input file is not a notebook, a folder holds none, or two notebooks
            would be written to the same output path.
    """
    found: dict[Path, str] = {}
    skip = output_dir.resolve() if output_dir else None
    for given in inputs:
        if not given.exists():
            raise FileNotFoundError(f"no such notebook or folder: {given}")
        if given.is_file():
            if given.suffix != ".ipynb":
                raise ValueError(f"not a notebook (.ipynb): {given}")
            found.setdefault(given.resolve(), given.name)
            continue
        inside = []
        for path in sorted(given.rglob("*.ipynb")):
            relative = path.relative_to(given)
            if any(part.startswith(".") for part in relative.parts[:-1]):
                continue
            if skip is not None and skip in path.resolve().parents:
                continue
            inside.append((path.resolve(), relative.as_posix()))
        if not inside:
            raise ValueError(f"no notebooks under {given}")
        for path, name in inside:
            found.setdefault(path, name)
    names: dict[str, Path] = {}
    for path, name in found.items():
        if name in names:
            raise ValueError(
                f"two notebooks would be reported and written as {name}: {names[name]} and "
                f"{path}; pass their common parent folder instead"
            )
        names[name] = path
    return list(found.items())


# -- parameters -----------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value as papermill reads it: bool, None, int, float, else text."""
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def inject_parameters(nb: Any, parameters: Mapping[str, Any], language: str = "python") -> None:
    """Insert papermill's ``injected-parameters`` cell after the cell tagged ``parameters``.

    As papermill does: an earlier injected cell is replaced, and without a ``parameters``
    cell the new one goes first.

    Raises:
        ValueError: the kernel's language is not Python and papermill is not installed.
    """
    if not parameters:
        return
    import nbformat

    if language == "python":
        source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    else:
        try:
            from papermill.translators import translate_parameters
        except ImportError:
            raise ValueError(
                f"parameters for a {language} kernel need papermill: pip install papermill"
            ) from None
        source = translate_parameters(language, language, dict(parameters), "Parameters")
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    if (nb.nbformat, nb.nbformat_minor) < (4, 5):
        cell.pop("id", None)  # cell ids only exist from nbformat 4.5 on

    def tagged(tag: str) -> list[int]:
        return [i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]

    old = tagged("injected-parameters")
    if old:
        nb.cells[old[0]] = cell
        for index in reversed(old[1:]):
            del nb.cells[index]
        return
    anchor = tagged("parameters")
    nb.cells.insert(anchor[0] + 1 if anchor else 0, cell)


# -- running --------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


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
                self._fail(
                    result, Status.FAILED, type(exc).__name__, f"cannot read the notebook: {exc}"
                )
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
                language = (km.kernel_spec.language or "python").lower()
            except NoSuchKernel as exc:
                raise KernelspecError(
                    f"no kernelspec named {options.kernel!r}; run `kernel-sandbox install`"
                ) from exc
            try:
                inject_parameters(nb, options.parameters, language)
            except ValueError as exc:
                self._fail(result, Status.FAILED, "ParameterError", str(exc))
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
            self._fail(result, Status.ERROR, type(exc).__name__, str(exc))
        except CellTimeoutError:
            self._fail_in_cell(
                result,
                nb,
                index,
                Status.TIMED_OUT,
                "CellTimeoutError",
                f"no reply within {options.timeout}s (--timeout)",
            )
        except CellExecutionError as exc:
            self._fail_in_cell(
                result, nb, index, Status.FAILED, exc.ename, f"{exc.ename}: {exc.evalue}"
            )
        except DeadKernelError:
            status = await self._exit_status(km)
            self._fail_in_cell(
                result, nb, index, Status.FAILED, "DeadKernelError", f"the kernel died{status}"
            )
        except KernelStartError as exc:
            self._fail(result, Status.FAILED, "KernelStartError", str(exc))
        except TimeoutError as exc:  # wait_for_ready
            self._fail(
                result,
                Status.TIMED_OUT,
                "StartupTimeout",
                f"the kernel was not ready within {options.startup_timeout}s "
                f"(--startup-timeout): {exc}",
            )
        except Exception as exc:  # a kernel that died while starting, and anything unforeseen
            self._fail(result, Status.FAILED, type(exc).__name__, str(exc) or repr(exc))
        finally:
            free_slot()
            await self._shutdown(client, km, graceful)
            result.stdout = _streams(nb)

    async def _exit_status(self, km: AsyncKernelManager) -> str:
        try:
            code = await km.provisioner.poll() if km.provisioner is not None else None
        except Exception:
            return ""
        if code is None:
            return ""
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

    def _fail(
        self,
        result: NotebookResult,
        status: Status,
        error_type: str,
        summary: str,
        details: str = "",
    ) -> None:
        result.status, result.error_type, result.summary = status, error_type, summary
        result.details = _plain(details or summary)

    def _fail_in_cell(
        self,
        result: NotebookResult,
        nb: Any,
        index: int | None,
        status: Status,
        error_type: str,
        what: str,
    ) -> None:
        if index is None:
            self._fail(result, status, error_type, what)
            return
        cell = nb.cells[index]
        result.failed_cell = index
        where = f"cell {index + 1} (code cell {result.cell} of {result.cells})"
        traceback = "\n".join(
            "\n".join(out.get("traceback", []))
            for out in cell.get("outputs", [])
            if out.get("output_type") == "error"
        )
        details = f"{where}:\n{cell.source}\n{'-' * 40}\n{traceback or what}"
        self._fail(result, status, error_type, f"{where}: {what}", details)

    def _write(self, result: NotebookResult, nb: Any) -> None:
        if result.output is None or result.status in (Status.ERROR, Status.SKIPPED):
            return
        import nbformat

        try:
            result.output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, result.output)
        except OSError as exc:
            if result.ok:
                self._fail(
                    result,
                    Status.FAILED,
                    type(exc).__name__,
                    f"cannot write the executed notebook: {exc}",
                )
            else:
                result.summary += f" (and cannot write the executed notebook: {exc})"


def _streams(nb: Any, limit: int = 64_000) -> str:
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    return text if len(text) <= limit else text[:limit] + "\n[... truncated]"


def exit_code(results: Sequence[NotebookResult], setup_error: BaseException | None = None) -> int:
    """0 all passed, 2 a setup error, else 1 (a notebook failed or timed out)."""
    if setup_error is not None or any(r.status is Status.ERROR for r in results):
        return EXIT_USAGE
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


# -- JUnit report ---------------------------------------------------------------------------


def _shown_path(path: Path) -> str:
    """Relative to the working directory when below it (as CI annotations expect)."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("", _plain(text))


def write_junit(
    results: Sequence[NotebookResult], path: Path, properties: Mapping[str, str] | None = None
) -> None:
    """One ``testcase`` per notebook in the JUnit XML that CI systems display.

    A failed or timed-out notebook has a ``failure`` (message: the failing cell and the
    error; text: the cell's source and traceback); a setup error is an ``error``; a
    notebook not run is ``skipped``. Stream output goes to ``system-out``.
    """
    counts = {
        "tests": len(results),
        "failures": sum(r.status in (Status.FAILED, Status.TIMED_OUT) for r in results),
        "errors": sum(r.status is Status.ERROR for r in results),
        "skipped": sum(r.status is Status.SKIPPED for r in results),
    }
    total = sum(r.duration for r in results)
    attrs = {k: str(v) for k, v in counts.items()} | {"time": f"{total:.3f}"}
    root = ET.Element("testsuites", {"name": "kernel-sandbox run", **attrs})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": "kernel-sandbox run",
            **attrs,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
        },
    )
    if properties:
        props = ET.SubElement(suite, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", {"name": key, "value": _xml_text(str(value))})
    for result in results:
        folder = Path(result.name).parent.as_posix()
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": "notebooks"
                if folder == "."
                else f"notebooks.{folder.replace('/', '.')}",
                "name": result.name,
                "file": _shown_path(result.path),
                "time": f"{result.duration:.3f}",
            },
        )
        if result.status in (Status.FAILED, Status.TIMED_OUT):
            element = ET.SubElement(
                case,
                "failure",
                {
                    "type": result.error_type or result.status.value,
                    "message": _xml_text(f"{result.status.value}: {result.summary}"),
                },
            )
            element.text = _xml_text(result.details)
        elif result.status is Status.ERROR:
            element = ET.SubElement(
                case,
                "error",
                {
                    "type": result.error_type,
                    "message": _xml_text(result.summary),
                },
            )
            element.text = _xml_text(result.details)
        elif result.status is Status.SKIPPED:
            ET.SubElement(case, "skipped", {"message": _xml_text(result.summary)})
        if result.stdout:
            ET.SubElement(case, "system-out").text = _xml_text(result.stdout)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)

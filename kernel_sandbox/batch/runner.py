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
from traitlets.config import Config

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


# -- before anything starts -----------------------------------------------------------------


async def preflight(options: RunOptions) -> None:
    """Check what every notebook needs before starting any: kernelspec, policy, engine, image.

    Raises:
        KernelspecError: no such kernelspec.
        PolicyError: unknown profile or bad policy, or ``profile`` with a kernelspec that is
            not sandboxed or pins another profile.
        EngineUnavailable, ImageMissing: the engine or the kernel image is not there.
    """
    from kernel_sandbox.engine.backend import DockerBackend
    from kernel_sandbox.kernelspec import find_kernelspec
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

    spec = find_kernelspec(options.kernel)
    provisioner_info = (spec.metadata or {}).get("kernel_provisioner") or {}
    if provisioner_info.get("provisioner_name") != PROVISIONER_NAME:
        if options.profile:
            raise PolicyError(
                f"--profile needs a sandboxed kernelspec; {options.kernel} does not use the "
                f"{PROVISIONER_NAME} provisioner"
            )
        return
    spec_config = dict(provisioner_info.get("config") or {})
    pinned = spec_config.get("profile")
    if options.profile and pinned and pinned != options.profile:
        raise PolicyError(
            f"kernelspec {options.kernel} pins profile {pinned!r}, which --profile "
            f"{options.profile} cannot override; drop --profile or use a kernelspec without a "
            "pinned profile (python3-sandbox)"
        )
    provisioner = DockerSandboxProvisioner(
        kernel_id="preflight", kernel_spec=spec, config=options.config, **spec_config
    )
    policy = provisioner.policy  # PolicyError for an unknown profile or a bad value
    backend = DockerBackend()
    try:
        await backend.ping()
        if await backend.image_labels(policy.image) is None:
            raise ImageMissing(
                f"image {policy.image} is not on the Docker engine; build it with "
                "`kernel-sandbox image build` (or set the policy's image to one that exists)"
            )
        if policy.runtime != "runc" and policy.runtime not in await backend.runtimes():
            raise RuntimeUnavailable(
                f"the Docker engine has no OCI runtime {policy.runtime!r}, which the policy "
                f"of {options.kernel} asks for; register it in /etc/docker/daemon.json "
                "(setup.sh does) or pick another profile"
            )
    finally:
        backend.close()


def load_jupyter_config() -> Config:
    """The ``jupyter_config.{json,py}`` files every Jupyter application reads, merged."""
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.loader import (
        ConfigFileNotFound,
        JSONFileConfigLoader,
        PyFileConfigLoader,
    )

    config = Config()
    for directory in reversed(jupyter_config_path()):  # lowest priority first
        for loader in (JSONFileConfigLoader, PyFileConfigLoader):
            suffix = "json" if loader is JSONFileConfigLoader else "py"
            try:
                config.merge(loader(f"jupyter_config.{suffix}", path=directory).load_config())
            except ConfigFileNotFound:
                pass
    return config


def kernel_config(
    profile: str | None, startup_timeout: float, base: Config | None = None
) -> Config:
    """Jupyter config for the kernel managers: ``base`` plus the profile and start timeout.

    The provisioner reads ``DockerSandboxProvisioner.profile`` unless the kernelspec pins a
    profile itself (:func:`preflight` refuses that combination).
    """
    config = Config()
    config.merge(base or Config())
    if profile:
        config.DockerSandboxProvisioner.profile = profile
    config.DockerSandboxProvisioner.launch_timeout = float(startup_timeout)
    return config


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

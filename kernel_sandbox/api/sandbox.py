"""``AsyncSandbox``: one sandboxed kernel for a program (an agent), run code, move files.

Built on jupyter_client's ``AsyncKernelManager`` and the ``docker-sandbox`` provisioner, as
JupyterLab and nbclient are: a kernelspec (``python3-sandbox`` by default) says how to start
the kernel, and the keyword arguments (``profile``, any policy key) are laid over that
kernelspec's provisioner config, where the kernelspec's own settings are (so they win over
Jupyter config, and the operator's ceilings still cap them). There is no other path to the
engine. The blocking twin is :class:`kernel_sandbox.api.sync.Sandbox`.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.kernelspec import NoSuchKernel as NoSuchKernelspec
from jupyter_client.manager import AsyncKernelManager
from traitlets import Dict

from kernel_sandbox.api.execution import evaluate, execute
from kernel_sandbox.api.files import (
    CHUNK,
    check_transfer,
    read_expression,
    relative_path,
    write_expressions,
)
from kernel_sandbox.api.results import ExecutionError, RunResult
from kernel_sandbox.errors import KernelspecError, PolicyError, SandboxClosed
from kernel_sandbox.policy.keys import KEYS, validate

__all__ = ["DEFAULT", "AsyncSandbox"]

PROVISIONER = "docker-sandbox"
DEFAULT_KERNELSPEC = "python3-sandbox"
# Sentinel: "use the sandbox's default timeout" (None means no timeout).
DEFAULT: Any = object()
TRANSFER_TIMEOUT = 60.0  # seconds one chunk of a file transfer may take (at least)


class _SpecsWithOverrides(KernelSpecManager):
    """Hands out kernelspecs with the sandbox's settings laid over their provisioner config."""

    overrides = Dict()

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        try:
            spec = super().get_kernel_spec(kernel_name)
        except NoSuchKernelspec as exc:
            raise KernelspecError(
                f"no kernelspec {kernel_name!r}: install it with `kernel-sandbox install"
                f"{'' if kernel_name == DEFAULT_KERNELSPEC else ' --name ' + kernel_name}` "
                f"(found: {', '.join(sorted(self.find_kernel_specs())) or 'none'})"
            ) from exc
        metadata = copy.deepcopy(spec.metadata or {})
        stanza = metadata.get("kernel_provisioner") or {}
        if stanza.get("provisioner_name") != PROVISIONER:
            raise KernelspecError(
                f"kernelspec {kernel_name!r} does not start a sandboxed kernel (its provisioner "
                f"is {stanza.get('provisioner_name') or 'the local one'}, not {PROVISIONER}); "
                "name one that does, e.g. python3-sandbox"
            )
        stanza["config"] = {**(stanza.get("config") or {}), **self.overrides}
        metadata["kernel_provisioner"] = stanza
        spec.metadata = metadata
        return spec


def _check_timeout(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return float(value)


def _overrides(profile: str | None, policy: dict[str, Any]) -> dict[str, Any]:
    """The provisioner config the arguments ask for, each value checked by the policy table.

    Raises:
        PolicyError: an unknown key or a bad value, naming it.
    """
    if profile is not None and (not isinstance(profile, str) or not profile.strip()):
        raise PolicyError(f"profile must be a profile's name (e.g. 'analyst'), not {profile!r}")
    unknown = sorted(set(policy) - set(KEYS))
    if unknown:
        raise PolicyError(
            f"unknown policy key {', '.join(map(repr, unknown))}; known keys: profile, "
            f"{', '.join(sorted(KEYS))} (docs/configuration.md)"
        )
    for key, value in policy.items():
        validate(key, value)  # raises PolicyError naming the key and what it accepts
    return {**({"profile": profile} if profile is not None else {}), **policy}


class AsyncSandbox:
    """One sandboxed kernel: ``async with AsyncSandbox(profile="untrusted") as sb:``.

    Args:
        profile: the policy profile (strict, analyst, educator, ci, untrusted, or one of the
            operator's); default: the kernelspec's.
        kernelspec: a kernelspec that uses the docker-sandbox provisioner.
        cwd: the host folder mounted as the workspace (the kernel's working directory, how
            the policy's ``workspace`` mode says); default: the current directory.
        timeout: default seconds a :meth:`run` may take before the kernel is interrupted
            (None: no limit).
        start_timeout: seconds the kernel may take to become ready.
        interrupt_grace: seconds an interrupted run has to stop before the kernel is
            restarted.
        config: a traitlets ``Config`` for the kernel manager and the provisioner (as
            Jupyter config files would give).
        **policy: policy keys (``memory_limit="2g"``, ``network="allowlist"``, ...), laid
            over the kernelspec's; the operator's ceilings still apply.

    Raises:
        PolicyError: an unknown policy key or a bad value (nothing is started).
        ValueError: a bad timeout.
    """

    def __init__(
        self,
        profile: str | None = None,
        *,
        kernelspec: str = DEFAULT_KERNELSPEC,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = 60.0,
        start_timeout: float = 120.0,
        interrupt_grace: float = 10.0,
        config: Any = None,
        **policy: Any,
    ):
        if not isinstance(kernelspec, str) or not kernelspec:
            raise ValueError(f"kernelspec must be a kernelspec's name, not {kernelspec!r}")
        self._overrides = _overrides(profile, policy)
        self._kernelspec = kernelspec
        self._cwd = str(Path(cwd if cwd is not None else os.getcwd()).resolve())
        if not os.path.isdir(self._cwd):
            raise ValueError(f"cwd {self._cwd} is not a folder")
        self.timeout = _check_timeout("timeout", timeout)
        self._start_timeout = _check_timeout("start_timeout", start_timeout) or 120.0
        self._grace = _check_timeout("interrupt_grace", interrupt_grace) or 10.0
        self._config = config
        self._km: AsyncKernelManager | None = None
        self._kc: Any = None
        self._dead: str | None = None  # why the kernel is gone, once it died
        self._lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> AsyncSandbox:
        """Start the kernel's container and wait until the kernel answers (idempotent).

        Raises:
            KernelspecError, PolicyError, KernelStartError, ImageMissing, EngineUnavailable:
                from the provisioner, with what to do; nothing is left running.
        """
        if self._km is not None:
            return self
        specs = _SpecsWithOverrides(overrides=self._overrides)
        kwargs: dict[str, Any] = {"kernel_name": self._kernelspec, "kernel_spec_manager": specs}
        if self._config is not None:
            kwargs["config"] = self._config
        km = AsyncKernelManager(**kwargs)
        try:
            await km.start_kernel(cwd=self._cwd)
            kc = km.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=self._start_timeout)
            except BaseException:
                kc.stop_channels()
                raise
        except BaseException:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
            else:
                await km.cleanup_resources()
            raise
        self._km, self._kc, self._dead = km, kc, None
        return self

    async def close(self) -> None:
        """Shut the kernel down and remove its container (idempotent, never raises for a
        kernel that is already gone)."""
        km, kc = self._km, self._kc
        self._km = self._kc = None
        if kc is not None:
            kc.stop_channels()
        if km is not None:
            try:
                await km.shutdown_kernel(now=True)
            except Exception:  # the container may be gone already; the provisioner logged it
                await km.cleanup_resources()

    async def restart(self) -> None:
        """A fresh kernel in a new container (variables are lost), e.g. after one died."""
        km = self._require(alive=False)
        await km.restart_kernel(now=True)
        await self._kc.wait_for_ready(timeout=self._start_timeout)
        self._dead = None

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what it is -----------------------------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        return self._km.kernel_id if self._km is not None else None

    @property
    def container_name(self) -> str | None:
        """The Docker container the kernel runs in now (None when not started, or when a
        sandbox service runs it)."""
        provisioner = self._km.provisioner if self._km is not None else None
        return getattr(provisioner, "container_name", None)

    @property
    def policy(self) -> Any:
        """The effective :class:`~kernel_sandbox.policy.SandboxPolicy` (once started)."""
        return self._provisioner().policy

    @property
    def profile(self) -> str:
        """The profile the policy started from."""
        provisioner = self._provisioner()
        spec_config = self._km.kernel_spec.metadata["kernel_provisioner"]["config"]  # type: ignore[union-attr]
        return str(spec_config.get("profile") or provisioner.profile)

    @property
    def cwd(self) -> str:
        """The host folder the sandbox was started in (its workspace, if the policy mounts it)."""
        return self._cwd

    @property
    def is_running(self) -> bool:
        return self._km is not None and self._dead is None

    def _provisioner(self) -> Any:
        if self._km is None or self._km.provisioner is None:
            raise SandboxClosed("the sandbox is not started: use it in `with` or call start()")
        return self._km.provisioner

    def _require(self, alive: bool = True) -> AsyncKernelManager:
        if self._km is None:
            raise SandboxClosed(
                "the sandbox is not running: use it in `with Sandbox(...) as sb:` (or `async "
                "with AsyncSandbox(...)`), or call start() first"
            )
        if alive and self._dead is not None:
            raise SandboxClosed(f"the sandbox's kernel died ({self._dead}): call restart()")
        return self._km

    # -- running code -----------------------------------------------------------------------

    async def run(self, code: str, *, timeout: float | None = DEFAULT) -> RunResult:
        """Run ``code`` in the kernel; return what it printed, displayed and raised.

        An error in the code is in ``result.error`` (``raise_for_error()`` raises it). A run
        longer than ``timeout`` seconds (default: the sandbox's) is interrupted and reported
        (``timed_out``); if the interrupt does not stop it within ``interrupt_grace``, the
        kernel is restarted (``restarted``). Runs in one sandbox happen one at a time.

        Raises:
            TypeError: ``code`` is not a string.
            SandboxClosed: the sandbox is not started, or its kernel died before.
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a string of Python, not {type(code).__name__}")
        limit = self.timeout if timeout is DEFAULT else _check_timeout("timeout", timeout)
        async with self._lock:
            km = self._require()
            result, died = await execute(
                km, self._kc, code, limit, self._grace, self._start_timeout
            )
            return replace(result, error=self._death(result.error)) if died else result

    def _death(self, error: ExecutionError | None) -> ExecutionError:
        """The error for a kernel that died while running: the host's notice if it knows why
        (out of memory, stopped), else the exit status."""
        notice = getattr(self._provisioner(), "notice", None)
        if error is not None and notice is not None and error.name == notice.content.get("ename"):
            self._dead = error.value
            return error
        why = notice.text if notice is not None else "the kernel's container ended"
        self._dead = why
        return ExecutionError("KernelDied", why, error.traceback if error else [])

    # -- files --------------------------------------------------------------------------------

    async def upload(self, path: str, data: bytes | str | IO[Any]) -> None:
        """Write ``data`` (bytes, text as UTF-8, or a file object) to ``path`` in the
        workspace, as the kernel would (its uid, in its folder). Parent folders are made.

        Raises:
            TransferRefused: the policy's workspace is not read-write.
            ValueError: ``path`` is absolute or leaves the workspace.
            OSError: the kernel could not write it (the kernel's error, e.g. PermissionError).
        """
        target = relative_path(path)
        if hasattr(data, "read"):
            data = data.read()
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, str or a file object, not {type(data).__name__}")
        check_transfer("upload", self.policy.workspace, self.profile, self._cwd)
        async with self._lock:
            self._require()
            for expression in write_expressions(target, bytes(data)):
                self._value(await self._silent(expression), f"upload to {target}")

    async def download(self, path: str) -> bytes:
        """The content of ``path`` in the workspace, read by the kernel.

        Raises:
            TransferRefused: the policy mounts no workspace.
            ValueError: ``path`` is absolute or leaves the workspace.
            FileNotFoundError, PermissionError, OSError: the kernel's error reading it.
        """
        target = relative_path(path)
        check_transfer("download", self.policy.workspace, self.profile, self._cwd)
        parts: list[bytes] = []
        async with self._lock:
            self._require()
            offset = 0
            while True:
                value = self._value(
                    await self._silent(read_expression(target, offset)), f"download of {target}"
                )
                chunk = base64.b64decode(ast.literal_eval(value))
                parts.append(chunk)
                offset += len(chunk)
                if len(chunk) < CHUNK:
                    return b"".join(parts)

    async def _silent(self, expression: str) -> dict[str, Any]:
        """Evaluate ``expression`` in the kernel without history or outputs."""
        value = await evaluate(self._kc, expression, max(TRANSFER_TIMEOUT, self.timeout or 0))
        if value is None:
            raise SandboxClosed("the sandbox's kernel did not answer a file transfer")
        return value

    @staticmethod
    def _value(value: dict[str, Any], what: str) -> str:
        """The text of an expression's value, or the kernel's error as an OSError."""
        if value.get("status") != "ok":
            raise _os_error(value, what)
        return str(value.get("data", {}).get("text/plain", ""))


def _os_error(content: dict[str, Any], what: str) -> OSError:
    """The kernel's error for a file operation, as the matching builtin OSError."""
    name, value = str(content.get("ename", "")), str(content.get("evalue", ""))
    kinds: dict[str, type[OSError]] = {
        "FileNotFoundError": FileNotFoundError,
        "PermissionError": PermissionError,
        "IsADirectoryError": IsADirectoryError,
        "NotADirectoryError": NotADirectoryError,
        "FileExistsError": FileExistsError,
    }
    return kinds.get(name, OSError)(f"{what} failed in the sandbox: {name}: {value}")

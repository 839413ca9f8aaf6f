"""Why a notebook's kernel failed, in words a CI log reader can act on.

Three questions the runner asks when something goes wrong: is it a setup error (stops the
batch, exit 2), a kernel that failed to start (worth a retry), or a kernel that died while
a cell ran (and if it was killed for memory, what its limit was and how to raise it).
"""

from __future__ import annotations

from typing import Any

from kernel_sandbox.errors import (
    EngineUnavailable,
    ImageMissing,
    KernelspecError,
    KernelStartError,
    PolicyError,
    RuntimeUnavailable,
)
from kernel_sandbox.inside.contract import EXIT_KILLED

__all__ = ["SETUP_ERRORS", "START_FAILURES", "death", "is_setup_error"]

# Errors that do not depend on the notebook: the first one stops the batch (exit 2).
SETUP_ERRORS: tuple[type[BaseException], ...] = (
    EngineUnavailable,
    ImageMissing,
    RuntimeUnavailable,
    PolicyError,
    KernelspecError,
)
# A kernel that did not come up: the container ended or hung while starting, or the kernel
# died before answering (nbclient's RuntimeError). Retried with --retries.
START_FAILURES: tuple[type[BaseException], ...] = (KernelStartError, TimeoutError, RuntimeError)


def is_setup_error(exc: BaseException) -> bool:
    """True for an error no notebook causes: :data:`SETUP_ERRORS`, and a container the
    engine refused to create for its configuration (an HTTP 4xx, e.g. a ``cpu_limit`` above
    the host's CPUs), which every notebook would hit alike."""
    if isinstance(exc, SETUP_ERRORS):
        return True
    if isinstance(exc, KernelStartError):
        import docker.errors

        cause = exc.__cause__
        return isinstance(cause, docker.errors.APIError) and bool(cause.is_client_error())
    return False


def _size(value: int) -> str:
    from kernel_sandbox.policy.values import format_size

    return format_size(value)


def _memory_limit(provisioner: Any) -> str | None:
    try:
        return _size(provisioner.policy.memory_limit)
    except Exception:  # not our provisioner, or through the service: no policy here
        return None


RAISE_MEMORY = (
    "raise it with the policy key memory_limit: in the kernelspec "
    "(kernel-sandbox install --memory-limit 4g), in Jupyter config "
    '(c.DockerSandboxProvisioner.memory_limit = "4g"), or with a profile that has more '
    "(--profile analyst: 4g)"
)


async def death(km: Any) -> tuple[str, str]:
    """(error type, what happened) for a kernel that died while a cell ran; never raises."""
    provisioner = getattr(km, "provisioner", None)
    try:
        code = await provisioner.poll() if provisioner is not None else None
    except Exception:
        code = None
    if code is None:
        return "DeadKernelError", "the kernel died"
    notice = getattr(provisioner, "notice", None)  # why, when the host knows
    out_of_memory = notice is not None and notice.content.get("ename") == "KernelOutOfMemory"
    if out_of_memory or code == EXIT_KILLED:
        limit = _memory_limit(provisioner)
        within = f" of {limit}" if limit else ""
        if out_of_memory:
            return (
                "KernelOutOfMemory",
                f"the kernel was killed: out of memory (exit status {code}); it used more than "
                f"its memory_limit{within}; {RAISE_MEMORY}",
            )
        return (
            "DeadKernelError",
            f"the kernel was killed (exit status {code}: SIGKILL, or out of memory: its "
            f"memory_limit is {limit or 'unknown'}; {RAISE_MEMORY})",
        )
    if notice is not None:
        return "DeadKernelError", f"the kernel died with exit status {code}: {notice.text}"
    return "DeadKernelError", f"the kernel died with exit status {code}"

"""Every error kernel-sandbox raises, in one tree.

::

    SandboxError                        base of everything below
    ├── PolicyError (ValueError)        a policy key or value is wrong; nothing was started
    ├── EngineUnavailable (ConnectionError)
    │                                   the container engine does not answer
    ├── ImageMissing (LookupError)      the kernel image is not on the engine
    ├── RuntimeUnavailable (LookupError)
    │                                   the policy names an OCI runtime the engine lacks
    ├── KernelStartError (RuntimeError) the container ended or hung while the kernel started
    ├── ImageBuildError (RuntimeError)  building the base or kernel image failed
    └── KernelspecError (LookupError)   a kernelspec is missing or cannot be installed

Each message says what happened and what to do about it, in one or two lines, so that
Jupyter Server, nbclient and the CLI can show it as it is. Engine errors
(``docker.errors``) are translated into these in :mod:`kernel_sandbox.engine.backend` only.
"""

from __future__ import annotations

__all__ = [
    "EngineUnavailable",
    "ImageBuildError",
    "ImageMissing",
    "KernelStartError",
    "KernelspecError",
    "PolicyError",
    "RuntimeUnavailable",
    "SandboxError",
]


class SandboxError(Exception):
    """Base class of every error raised by kernel-sandbox."""


class PolicyError(SandboxError, ValueError):
    """A policy key or value is invalid; raised before any container is created."""


class EngineUnavailable(SandboxError, ConnectionError):
    """The Docker engine cannot be reached."""


class ImageMissing(SandboxError, LookupError):
    """The image a policy names is not present on the engine."""


class RuntimeUnavailable(SandboxError, LookupError):
    """The OCI runtime a policy names is not registered with the engine."""


class KernelStartError(SandboxError, RuntimeError):
    """The kernel's container exited (or never became ready) during start."""


class ImageBuildError(SandboxError, RuntimeError):
    """Building an image failed."""


class KernelspecError(SandboxError, LookupError):
    """A kernelspec cannot be found or installed."""

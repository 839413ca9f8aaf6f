"""Every error kernel-sandbox raises, in one tree.

::

    SandboxError                        base of everything below
    ├── PolicyError (ValueError)        a policy key or value is wrong; nothing was started
    │   └── NotMountable                a folder no sandbox may see (the mount rules refuse it)
    ├── TargetError (ValueError)        an egress host, port, pattern or address is malformed
    ├── EngineUnavailable (ConnectionError)
    │                                   the container engine does not answer
    ├── EngineError (RuntimeError)      the engine refused or failed a request (.status_code)
    ├── ImageMissing (LookupError)      the kernel image is not on the engine
    ├── RuntimeUnavailable (LookupError)
    │                                   the policy names an OCI runtime the engine lacks
    ├── KernelStartError (RuntimeError) the container ended or hung while the kernel started
    │   └── UidsExhausted               every uid of uid_range is held by a running sandbox
    ├── ImageBuildError (RuntimeError)  building the base or kernel image failed
    ├── KernelspecError (LookupError)   a kernelspec is missing or cannot be installed
    ├── TokenRefused (PermissionError)  a data token is unknown, another kernel's, expired or
    │                                   revoked (.code is the broker's protocol code)
    ├── TokenNotFound (LookupError)     no data token or kernel matches what was asked for
    ├── CredentialsError (PermissionError)
    │                                   the host's dataset credentials are unsafe or unreadable
    ├── EgressControlError (LookupError)
    │                                   no such kernel, nothing waiting for that target, or
    │                                   the kernel's egress proxy did not answer
    ├── LockdownError (RuntimeError)    a locked-down Jupyter Server cannot guarantee that
    │                                   everything it starts is sandboxed; it refuses to start
    ├── BadRequest (ValueError)         a request to the sandbox service is malformed
    ├── NoSuchKernel (LookupError)      the sandbox service has no such kernel of the caller
    ├── ServiceUnavailable (ConnectionError)
    │                                   the sandbox service's socket does not answer
    └── ServiceRefused (PermissionError)
                                        the sandbox service's policy file does not allow what
                                        a caller asked for (.rule names the rule that refused)
    ├── SandboxClosed (RuntimeError)    the Python API's sandbox is closed, or its kernel died
    ├── TransferRefused (PermissionError)
    │                                   a file upload/download the policy's workspace forbids
    ├── CellError (RuntimeError)        RunResult.raise_for_error(): the code raised (.result)
    └── CellTimeout (TimeoutError)      RunResult.raise_for_error(): the code ran too long and
                                        was interrupted (.result)

Each message says what happened and what to do about it, in one or two lines, so that
Jupyter Server, nbclient and the CLI can show it as it is. Engine errors
(``docker.errors``, ``requests.exceptions``) are translated into these in
:mod:`kernel_sandbox.engine.backend` only, with ``raise ... from``. The modules that raised
these before keep re-exporting them (``kernel_sandbox.broker.tokens.TokenRefused``, ...).

Not in this tree, on purpose: two protocol signals that never leave their module,
:class:`kernel_sandbox.broker.protocol.Refusal` (becomes an error reply to the kernel) and
:class:`kernel_sandbox.egress.http.Refused` (becomes an HTTP error response); and the data
client's own small tree for kernel users, :mod:`kernel_sandbox.inside.wire` (``DataError``),
which runs inside the container on the standard library only.
"""

from __future__ import annotations

__all__ = [
    "ApprovalError",
    "UnknownRequest",
    "CredentialsError",
    "EgressControlError",
    "EngineError",
    "EngineUnavailable",
    "ImageBuildError",
    "ImageMissing",
    "KernelStartError",
    "KernelspecError",
    "LockdownError",
    "PolicyError",
    "RuntimeUnavailable",
    "BadRequest",
    "CellError",
    "CellTimeout",
    "NoSuchKernel",
    "NotMountable",
    "SandboxClosed",
    "SandboxError",
    "ServiceRefused",
    "ServiceUnavailable",
    "TargetError",
    "TokenNotFound",
    "TokenRefused",
    "TransferRefused",
    "UidsExhausted",
]


class SandboxError(Exception):
    """Base class of every error raised by kernel-sandbox."""


class PolicyError(SandboxError, ValueError):
    """A policy key or value is invalid; raised before any container is created."""


class TargetError(SandboxError, ValueError):
    """A host, port, pattern or address that is not acceptable; the message says why."""


class EngineUnavailable(SandboxError, ConnectionError):
    """The Docker engine cannot be reached."""


class EngineError(SandboxError, RuntimeError):
    """The Docker engine refused or failed a request.

    ``status_code`` is the engine's HTTP status (404, 409, 500, ...), or None when the
    request failed before the engine answered (a malformed argument, a broken stream).
    """

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class ImageMissing(SandboxError, LookupError):
    """The image a policy names is not present on the engine."""


class RuntimeUnavailable(SandboxError, LookupError):
    """The OCI runtime a policy names is not registered with the engine."""


class KernelStartError(SandboxError, RuntimeError):
    """The kernel's container exited (or never became ready) during start."""


class UidsExhausted(KernelStartError):
    """Every uid of the provisioner's ``uid_range`` is claimed by a sandbox whose owner lives."""


class ImageBuildError(SandboxError, RuntimeError):
    """Building an image failed."""


class KernelspecError(SandboxError, LookupError):
    """A kernelspec cannot be found or installed."""


class TokenRefused(SandboxError, PermissionError):
    """A presented data token is unknown, another kernel's, expired or revoked.

    ``code`` is the broker's protocol error code: bad-token, wrong-kernel, expired, revoked.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TokenNotFound(SandboxError, LookupError):
    """No token or kernel matches what was asked for (``kernel-sandbox tokens revoke``)."""


class CredentialsError(SandboxError, PermissionError):
    """The host's credentials file (or keyring entry) is unsafe or unreadable."""


class EgressControlError(SandboxError, LookupError):
    """No such kernel, nothing waiting for that target, or the kernel's proxy did not answer."""


class ApprovalError(EgressControlError):
    """An egress decision that cannot be made (bad choice, a kernel not in this view)."""


class UnknownRequest(ApprovalError):
    """No such egress request is waiting (decided meanwhile, timed out, or never there)."""


class LockdownError(SandboxError, RuntimeError):
    """Lockdown is enabled but cannot hold (no sandboxed kernelspec, no engine, a manager
    replaced by another extension): the Jupyter Server refuses to start."""


class ServiceUnavailable(SandboxError, ConnectionError):
    """The sandbox service (``kernel-sandbox serve``) cannot be reached on its socket."""


class ServiceRefused(SandboxError, PermissionError):
    """The operator's policy file (kernel_sandbox.service.rules) does not allow a request.

    ``rule`` is the rule that refused, as the message names it: the file, the section and the
    key with its value (``/etc/kernel-sandbox/service.toml [group.students] max_kernels = 3``),
    or the built-in default.
    """

    def __init__(self, message: str, rule: str = ""):
        super().__init__(message)
        self.rule = rule


class BadRequest(SandboxError, ValueError):
    """A request to the sandbox service is not well formed (the reply says why)."""


class NoSuchKernel(SandboxError, LookupError):
    """The sandbox service has no kernel with that id for the caller (another user's kernel
    counts as none)."""


class NotMountable(PolicyError):
    """A folder no sandbox may see: a host path the mount rules refuse, a home as a whole."""


class SandboxClosed(SandboxError, RuntimeError):
    """The Python API's sandbox was closed (or never started), or its kernel died:
    ``Sandbox.restart()`` starts a new kernel, ``Sandbox.start()`` a closed sandbox again."""


class TransferRefused(SandboxError, PermissionError):
    """A file upload or download that the sandbox's policy does not allow (workspace 'ro'
    refuses uploads, 'none' both); the message names the policy and the fix."""


class CellError(SandboxError, RuntimeError):
    """The code a sandbox ran raised (``RunResult.raise_for_error()``); ``result`` holds the
    outputs and the error."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result


class CellTimeout(SandboxError, TimeoutError):
    """The code a sandbox ran outlived its timeout and was interrupted
    (``RunResult.raise_for_error()``); ``result`` holds what it printed until then."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result

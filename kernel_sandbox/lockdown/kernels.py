"""Only sandboxed kernels: the kernelspec manager lists and gives out only ``docker-sandbox``
kernelspecs, and the kernel manager maps or refuses every other name before a kernel exists.

Both are mixins laid over whatever classes the server is configured with
(:func:`locked_class`), so a site's own kernel manager keeps working. The kernel manager's
guard sits in ``pre_start_kernel``, the step of jupyter_client's ``MultiKernelManager``
through which every start passes: ``POST /api/kernels``, ``/api/sessions`` (create, and a
PATCH that changes the kernel), and any extension calling ``start_kernel``. A restart reuses
the kernel's own (sandboxed) kernelspec. The kernelspec manager's guard is the second wall:
code that builds a KernelManager from the server's kernelspec manager cannot get an
unsandboxed kernelspec from it either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from jupyter_client.kernelspec import KernelSpec, NoSuchKernel
from tornado import web

from kernel_sandbox.errors import PolicyError, SandboxError
from kernel_sandbox.kernelspec import PROVISIONER_NAME
from kernel_sandbox.lockdown.config import SandboxLockdown
from kernel_sandbox.policy.effective import is_sandboxed

# What jupyter_client accepts as a kernelspec name.
KERNEL_NAME = re.compile(r"[a-z0-9._-]+", re.IGNORECASE)

__all__ = [
    "LockedKernelManager",
    "LockedKernelSpecManager",
    "admit",
    "locked_class",
    "locked_session_handlers",
    "start_refused",
]


def locked_class(base: type, mixin: type, lockdown: SandboxLockdown) -> type:
    """``base`` with ``mixin`` in front, bound to this server's ``lockdown`` settings (a new
    class per server, so nothing is shared between servers in one process)."""
    if issubclass(base, mixin):
        return base
    return type(f"Locked{base.__name__}", (mixin, base), {"lockdown": lockdown})


class LockedKernelSpecManager:
    """Mixin for a ``KernelSpecManager``: unsandboxed kernelspecs do not exist."""

    lockdown: ClassVar[SandboxLockdown]

    def all_kernel_names(self) -> list[str]:
        """Every installed kernelspec name, sandboxed or not (for messages and ``doctor``)."""
        return sorted(super().find_kernel_specs())  # type: ignore[misc]

    def _sandboxed(self, name: str) -> bool:
        try:
            return is_sandboxed(super().get_kernel_spec(name))  # type: ignore[misc]
        except (NoSuchKernel, OSError, ValueError):  # a broken kernel.json is no kernel
            return False

    def find_kernel_specs(self) -> dict[str, str]:
        found: dict[str, str] = super().find_kernel_specs()  # type: ignore[misc]
        return {name: path for name, path in found.items() if self._sandboxed(name)}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec: KernelSpec = super().get_kernel_spec(kernel_name)  # type: ignore[misc]
        if not is_sandboxed(spec):
            raise NoSuchKernel(kernel_name)
        return spec

    def get_all_specs(self) -> dict[str, Any]:
        specs: dict[str, Any] = super().get_all_specs()  # type: ignore[misc]
        return {
            name: entry
            for name, entry in specs.items()
            if ((entry.get("spec") or {}).get("metadata") or {})
            .get("kernel_provisioner", {})
            .get("provisioner_name")
            == PROVISIONER_NAME
        }


def admit(lockdown: SandboxLockdown, specs: Any, name: str | None) -> str:
    """The kernelspec a start for ``name`` gets under ``lockdown``.

    ``specs`` is the server's (locked) kernelspec manager. No name means the server's
    default, which is ``map_to``.

    Raises:
        tornado.web.HTTPError: 403 (an unsandboxed kernelspec) or 404 (no such kernelspec)
            in refuse mode; the message names the kernels this server starts.
    """
    sandboxed = sorted(specs.find_kernel_specs())
    if not name:
        return lockdown.map_to
    if name in sandboxed:
        return name
    if lockdown.on_unsandboxed == "map":
        lockdown.log.info(
            "kernel-sandbox lockdown: kernel %r requested, starting sandboxed %r instead",
            name,
            lockdown.map_to,
        )
        return lockdown.map_to
    allowed = ", ".join(sandboxed) or "(none)"
    # Jupyter Server sends log_message as it is and tornado logs it as a format string: echo
    # the client's name only when it is a valid kernelspec name (no "%", no markup).
    shown = repr(name) if KERNEL_NAME.fullmatch(name) else "by that name"
    if name in specs.all_kernel_names():
        raise web.HTTPError(
            403,
            f"kernel {shown} is not sandboxed: this server starts only sandboxed kernels "
            f"({allowed}); ask for one of them",
            reason="Kernel not sandboxed",
        )
    raise web.HTTPError(
        404,
        f"no kernel {shown}: this server starts only sandboxed kernels ({allowed})",
        reason="No such kernel",
    )


class LockedKernelManager:
    """Mixin for the server's ``MappingKernelManager``: map or refuse before any start."""

    lockdown: ClassVar[SandboxLockdown]

    def pre_start_kernel(self, kernel_name: str | None, kwargs: Any) -> tuple[Any, str, str]:
        name = admit(self.lockdown, self.kernel_spec_manager, kernel_name)  # type: ignore[attr-defined]
        km, name, kernel_id = super().pre_start_kernel(name, kwargs)  # type: ignore[misc]
        if not is_sandboxed(km.kernel_spec):  # the kernelspec manager already refuses these
            raise web.HTTPError(403, "kernel not sandboxed", reason="Kernel not sandboxed")
        return km, name, kernel_id

    async def start_kernel(self, *args: Any, **kwargs: Any) -> str:
        """Start as the base does; a sandbox's refusal reaches the client with its reason.

        Without this, ``POST /api/kernels`` answers any error of a start with a bare 500
        "Unhandled error": a student whose kernel the operator's policy refuses would never
        learn which rule, or what to do.
        """
        try:
            return str(await super().start_kernel(*args, **kwargs))  # type: ignore[misc]
        except SandboxError as exc:
            raise start_refused(exc) from exc


def start_refused(exc: SandboxError) -> web.HTTPError:
    """The HTTP answer for a sandbox that could not start: the policy's or the operator's
    refusal is the client's to fix (400, 403), anything else is the server's (500)."""
    if isinstance(exc, PermissionError):
        status, reason = 403, "Kernel start refused"
    elif isinstance(exc, PolicyError):
        status, reason = 400, "Kernel policy refused"
    else:
        status, reason = 500, "Kernel start failed"
    return web.HTTPError(status, str(exc), reason=reason)


def _refusal(handler: Any, name: str | None) -> bool:
    """Answer ``handler``'s request with the 4xx a start of ``name`` would get; False when
    the start is admitted."""
    km = handler.kernel_manager
    if not isinstance(km, LockedKernelManager):
        return False
    try:
        admit(km.lockdown, km.kernel_spec_manager, name)  # type: ignore[attr-defined]
    except web.HTTPError as exc:
        handler.set_status(exc.status_code, exc.reason)
        handler.set_header("Content-Type", "application/json")
        handler.finish(json.dumps({"message": exc.log_message, "reason": exc.reason}))
        return True
    return False


def locked_session_handlers(handlers: Sequence[tuple[str, type]]) -> list[tuple[str, type]]:
    """The sessions API's handlers, answering a refused kernel with its 4xx.

    The stock handlers turn every error of a kernel start into a 500 (create) or 501 (PATCH
    to another kernel); these check the requested name first, only when the request would
    start a kernel, and answer as ``POST /api/kernels`` does. The rest is the stock code.
    """

    def root(base: type) -> type:
        class LockedSessionRootHandler(base):  # type: ignore[misc, valid-type]
            async def post(self) -> None:
                model = self.get_json_body() or {}
                kernel = model.get("kernel") or {}
                path = model.get("path") or (model.get("notebook") or {}).get("path")
                exists = bool(path) and await self.session_manager.session_exists(path=path)
                if not kernel.get("id") and not exists and _refusal(self, kernel.get("name")):
                    return
                await super().post()

        return LockedSessionRootHandler

    def single(base: type) -> type:
        class LockedSessionHandler(base):  # type: ignore[misc, valid-type]
            async def patch(self, session_id: str) -> None:
                kernel = (self.get_json_body() or {}).get("kernel") or {}
                if kernel.get("id") is None and kernel.get("name") is not None:
                    if _refusal(self, kernel["name"]):
                        return
                await super().patch(session_id)

        return LockedSessionHandler

    wrapped = []
    for pattern, handler in handlers:
        if handler.__name__ == "SessionRootHandler":
            wrapped.append((pattern, root(handler)))
        elif handler.__name__ == "SessionHandler":
            wrapped.append((pattern, single(handler)))
    return wrapped

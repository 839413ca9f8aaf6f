"""Sandboxed terminals: each terminal's shell runs in its own ephemeral container.

jupyter_server's terminals are terminado ptys on the host. This manager keeps terminado (its
websocket protocol, resizing, culling, JupyterLab's terminal unchanged) and changes only the
process in the pty: instead of a host shell it is ``docker start --attach --interactive`` of
a container created for this terminal, under the policy of the lockdown's ``map_to``
kernelspec, with the same hardening as a kernel (:mod:`kernel_sandbox.engine.container`):
no network, read-only root, no capabilities, the seccomp profile, the policy's limits, image
and workspace mode. Why the docker CLI rather than an SDK attach: terminado needs a real pty
whose fd it can poll; ``docker start -ai`` is the engine's own TTY client (raw mode, the
initial size, SIGWINCH -> resize) and attaches before the container starts, so no output is
lost. The container is created through the SDK (:class:`~kernel_sandbox.engine.backend.
DockerBackend`), so the options are the kernels' options, not a second copy as CLI flags.

Cleanup: closing a terminal (REST ``DELETE``, the culler, the server's shutdown) ends the
attach and removes the container and its runtime directory; a shell that exits ends its
container (``auto_remove``). If the server dies, the in-sandbox watchdog loses the lifeline
and ends the shell after ``orphan_timeout`` (as for kernels), and ``kernel-sandbox gc`` or
the next server's sweep removes what is left (the containers carry the owner labels).

Through the sandbox service (the same choice as kernels: ``map_to``'s provisioner has
``via_service``) this server has no engine access: the service creates the container under
its operator's rules and runs the attach, and this manager drives the pty master it sends
(:mod:`kernel_sandbox.lockdown.service_terminals`).
"""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from jupyter_server_terminals.terminalmanager import TerminalManager
from terminado.management import PtyWithClients
from tornado import web
from traitlets import Instance, default

from kernel_sandbox.engine.backend import DockerBackend, shared_backend
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.host.resources import KernelResources
from kernel_sandbox.lockdown.config import SandboxLockdown
from kernel_sandbox.lockdown.service_terminals import ServiceTerminal, open_service_terminal
from kernel_sandbox.policy import resolve_workspace
from kernel_sandbox.policy.effective import provisioner_for
from kernel_sandbox.provisioner.terminal import (
    DETACH_KEYS,
    attach_command,
    create_terminal_sandbox,
    own_identity,
    terminal_id,
)

__all__ = ["DETACH_KEYS", "SandboxTerminalManager", "run_blocking"]


def run_blocking(make: Any) -> Any:
    """Run the coroutine ``make()`` to its end from synchronous code that may be on a running
    event loop (terminado's ``new_terminal`` is synchronous)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class SandboxTerminalManager(TerminalManager):  # type: ignore[misc]
    """jupyter_server's terminal manager, with every shell in its own sandbox container."""

    lockdown: ClassVar[SandboxLockdown]

    backend = Instance(DockerBackend, help="The engine the terminal containers run on.")

    @default("backend")
    def _default_backend(self) -> DockerBackend:
        return shared_backend()

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._sandboxes: dict[str, KernelResources | ServiceTerminal] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # -- what a terminal gets -----------------------------------------------------------------

    def _provisioner(self) -> Any:
        """A provisioner for ``map_to`` under the server's config (nothing is started): the
        policy, kernel user, runtime root and watchdog timeout a kernel would get."""
        server: Any = self.parent
        spec = server.kernel_spec_manager.get_kernel_spec(self.lockdown.map_to)
        return provisioner_for(spec, server.config)

    def _workspace_for(self, cwd: str | None) -> str:
        """The terminal's directory: the one asked for when it lies in the server root (as a
        kernel's notebook directory does), else the root."""
        server: Any = self.parent
        root = os.path.realpath(os.path.expanduser(server.root_dir))
        wanted = os.path.realpath(cwd) if cwd else root
        if wanted == root or wanted.startswith(root.rstrip("/") + "/"):
            return wanted
        return root

    async def _create_sandbox(self, name: str, cwd: str | None) -> KernelResources:
        provisioner = self._provisioner()
        policy = provisioner.policy
        workspace = None
        if policy.workspace != "none":
            workspace = resolve_workspace(self._workspace_for(cwd))
        uid_range = provisioner.checked_uid_range() if os.getuid() == 0 else None
        identity = own_identity(policy, workspace, uid_range, self.lockdown.map_to)
        return await create_terminal_sandbox(
            provisioner,
            terminal_id(name),
            name,
            identity,
            list(self.lockdown.terminal_shell),
            self.term_settings.get("type", "xterm"),
            self.log,
            workspace=workspace,
            backend=self.backend,
        )

    # -- terminado's hooks ----------------------------------------------------------------------

    def new_terminal(self, **kwargs: Any) -> PtyWithClients:
        """A pty attached to a new sandbox container. Of the client's options only ``cwd``
        counts (terminado would otherwise run a ``shell_command`` the client sends)."""
        name = str(kwargs.get("name") or "")
        try:
            provisioner = self._provisioner()
            if provisioner.via_service is not None:
                return open_service_terminal(
                    provisioner,
                    name,
                    self._workspace_for(kwargs.get("cwd")),
                    self.term_settings.get("type", "xterm"),
                    list(self.lockdown.terminal_shell),
                    self.log,
                )
            resources = run_blocking(lambda: self._create_sandbox(name, kwargs.get("cwd")))
        except SandboxError as exc:
            # Jupyter Server sends log_message as it is; tornado formats it when it logs
            message = f"cannot start a sandboxed terminal: {exc}".replace("%", "%%")
            raise web.HTTPError(503, message) from exc
        argv = attach_command(self.lockdown.docker_command, str(resources.container_id))
        env = self.make_term_env(**{**self.term_settings, **{"cwd": None}})
        try:
            term = PtyWithClients(argv, env, "/")
        except BaseException:
            resources.close()
            raise
        term.sandbox = resources  # type: ignore[attr-defined]
        return term

    def new_named_terminal(self, **kwargs: Any) -> tuple[str, PtyWithClients]:
        name = kwargs.get("name")
        if not (
            isinstance(name, str) and re.fullmatch(r"\w+", name) and name not in self.terminals
        ):
            name = self._next_available_name()
        kwargs["name"] = name
        name, term = super().new_named_terminal(**kwargs)
        sandbox: KernelResources | ServiceTerminal = term.sandbox  # type: ignore[attr-defined]
        self._sandboxes[name] = sandbox
        self.log.info("terminal %s: shell in sandbox container %s", name, sandbox.container_name)
        return name, term

    async def _close_sandbox(self, name: str) -> None:
        resources = self._sandboxes.pop(name, None)
        if resources is None:
            return
        try:
            await resources.aclose()
        except Exception as exc:  # never raise into terminado's cleanup
            self.log.warning(
                "terminal %s: container %s left for gc: %s", name, resources.container_name, exc
            )

    async def terminate(self, name: str, force: bool = False) -> None:
        try:
            await super().terminate(name, force=force)
        finally:
            await self._close_sandbox(name)

    def on_eof(self, ptywclients: PtyWithClients) -> None:
        """The shell ended (or its attach did): remove what is left of its sandbox."""
        super().on_eof(ptywclients)
        name = ptywclients.term_name
        if name in self._sandboxes:
            task = asyncio.ensure_future(self._close_sandbox(name))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

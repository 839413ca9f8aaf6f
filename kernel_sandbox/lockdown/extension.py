"""The lockdown as a Jupyter Server extension: link (before the managers exist) and load
(after), each failing closed.

Link lays the guards over the server's configured classes (kernel manager, kernelspec
manager, terminal manager) and checks that lockdown can hold: the ``map_to`` kernelspec exists
and is sandboxed, its policy resolves, its image is on an engine that answers, the docker CLI
is there for terminals (or, through the sandbox service, that the service runs them), and the
server does not adopt kernels it did not start. Load checks
that the managers the server really built are the guarded ones (another extension may have
swapped a class after us) and sets the default kernel. Any failure ends the process with a
message and exit status 1: a locked-down server never falls back to host kernels. (An
exception would not do: Jupyter Server logs an extension's exceptions and starts anyway.)
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

from jupyter_server.utils import url_path_join

from kernel_sandbox.engine.backend import shared_backend
from kernel_sandbox.errors import LockdownError, SandboxError
from kernel_sandbox.lockdown.config import SandboxLockdown
from kernel_sandbox.lockdown.kernels import (
    LockedKernelManager,
    LockedKernelSpecManager,
    locked_class,
    locked_session_handlers,
)
from kernel_sandbox.lockdown.report import exposed_by_root
from kernel_sandbox.lockdown.terminals import SandboxTerminalManager, run_blocking
from kernel_sandbox.policy.effective import provisioner_for

__all__ = ["link", "load", "preflight"]

EXIT_REFUSED = 1
TERMINALS_APP = "jupyter_server_terminals"


def refuse(serverapp: Any, problem: str) -> None:
    """Stop the server before it serves anything."""
    message = f"kernel-sandbox lockdown: refusing to start: {problem}"
    serverapp.log.critical(message)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(EXIT_REFUSED)


def preflight(lockdown: SandboxLockdown, specs: Any, config: Any, docker_cli: str | None) -> str:
    """Check that lockdown can hold; return a one-line summary of what the server will start.

    ``specs`` is a locked kernelspec manager; ``docker_cli`` the terminals' CLI (None when
    terminals are off).

    Raises:
        LockdownError: naming what is missing and how to fix it.
    """
    sandboxed = sorted(specs.find_kernel_specs())
    if not sandboxed:
        raise LockdownError(
            "no sandboxed kernelspec is installed (none uses the docker-sandbox provisioner); "
            "install one with `kernel-sandbox install`, or disable lockdown with "
            "`kernel-sandbox lockdown disable`"
        )
    if lockdown.map_to not in sandboxed:
        raise LockdownError(
            f"c.SandboxLockdown.map_to is {lockdown.map_to!r}, which is not a sandboxed "
            f"kernelspec here; sandboxed: {', '.join(sandboxed)}. Set map_to to one of them or "
            f"install it with `kernel-sandbox install --name {lockdown.map_to}`"
        )
    spec = specs.get_kernel_spec(lockdown.map_to)
    try:
        provisioner = provisioner_for(spec, config)
        service = provisioner.via_service
        if service is not None:
            return _through_service(lockdown, service.socket_path, sandboxed, docker_cli)
        policy = provisioner.policy
    except SandboxError as exc:
        named = f"kernelspec {lockdown.map_to}: "  # a PolicyError names it already
        raise LockdownError(str(exc) if str(exc).startswith(named) else named + str(exc)) from exc
    backend = shared_backend()
    try:
        present = run_blocking(lambda: backend.image_exists(policy.image))
    except SandboxError as exc:
        raise LockdownError(str(exc)) from exc
    if not present:
        raise LockdownError(
            f"image {policy.image} (kernelspec {lockdown.map_to}) is not on the Docker engine; "
            "build it with `kernel-sandbox image build`"
        )
    if docker_cli is not None and shutil.which(docker_cli) is None:
        raise LockdownError(
            f"sandboxed terminals need the docker CLI ({docker_cli!r} is not on PATH); install "
            "it, or set c.SandboxLockdown.terminals = 'off'"
        )
    unsandboxed = sorted(set(specs.all_kernel_names()) - set(sandboxed))
    action = f"mapped to {lockdown.map_to}" if lockdown.on_unsandboxed == "map" else "refused"
    return (
        f"kernels: {', '.join(sandboxed)} (default {lockdown.map_to}); other names "
        f"({', '.join(unsandboxed) or 'none installed'}) {action}; "
        f"terminals: {lockdown.terminals}"
    )


def _through_service(
    lockdown: SandboxLockdown, socket_path: str, sandboxed: list[str], docker_cli: str | None
) -> str:
    """preflight for a server whose kernels start through the sandbox service: the service
    must answer (it checks policy and image at each start), and serve terminals when they are
    on (this server has no engine access: the service runs their sandboxes)."""
    from kernel_sandbox.service.client import ServiceClient

    try:
        hello = ServiceClient(socket_path, timeout=10).ask("hello")
    except SandboxError as exc:
        raise LockdownError(str(exc)) from exc
    if docker_cli is not None and not hello.get("terminals"):
        raise LockdownError(
            f"the sandbox service at {socket_path} does not run terminals (an older version); "
            "upgrade it, or set c.SandboxLockdown.terminals = 'off'"
        )
    terminals = "sandboxed, through the service" if docker_cli is not None else "off"
    return (
        f"kernels: {', '.join(sandboxed)} (default {lockdown.map_to}) through the sandbox "
        f"service at {socket_path} as {hello['caller']['name']}; terminals: {terminals}"
    )


def link(serverapp: Any) -> None:
    """Install the guarded classes and check lockdown can hold (before the managers exist)."""
    lockdown = SandboxLockdown(parent=serverapp, log=serverapp.log)
    if not hasattr(serverapp, "gateway_config"):
        # the kernel manager class's default depends on it; init_configurables makes the
        # same singleton later
        from jupyter_server.gateway.gateway_client import GatewayClient

        serverapp.gateway_config = GatewayClient.instance(parent=serverapp)
    if serverapp.gateway_config.gateway_enabled:
        refuse(
            serverapp,
            "the server sends its kernels to a gateway (GatewayClient.url is set): lockdown "
            "cannot vouch for kernels it does not start",
        )
    serverapp.kernel_manager_class = locked_class(
        serverapp.kernel_manager_class, LockedKernelManager, lockdown
    )
    serverapp.kernel_spec_manager_class = locked_class(
        serverapp.kernel_spec_manager_class, LockedKernelSpecManager, lockdown
    )
    if getattr(serverapp, "allow_external_kernels", False):
        refuse(
            serverapp,
            "ServerApp.allow_external_kernels is on: this server would adopt kernels it did "
            "not start, sandboxed or not. Turn it off.",
        )
    if lockdown.terminals == "off":
        serverapp.terminals_enabled = False
    else:
        terminals = type(
            "LockedSandboxTerminalManager", (SandboxTerminalManager,), {"lockdown": lockdown}
        )
        serverapp.config.TerminalsExtensionApp.terminal_manager_class = terminals
        for app in _extension_apps(serverapp, TERMINALS_APP):
            app.terminal_manager_class = terminals
    specs = serverapp.kernel_spec_manager_class(parent=serverapp)
    docker_cli = lockdown.docker_command if lockdown.terminals == "sandboxed" else None
    try:
        summary = preflight(lockdown, specs, serverapp.config, docker_cli)
    except LockdownError as exc:
        refuse(serverapp, str(exc))
    serverapp._sandbox_lockdown = lockdown
    serverapp.log.info("kernel-sandbox lockdown: on; %s", summary)
    exposed = exposed_by_root(serverapp.root_dir)
    if exposed:
        serverapp.log.warning(
            "kernel-sandbox lockdown: the server root %s contains %s: any client with the "
            "token can change what runs on the host through the contents API; serve a "
            "project folder instead (c.ServerApp.root_dir)",
            serverapp.root_dir,
            ", ".join(exposed),
        )


def _extension_apps(serverapp: Any, name: str) -> list[Any]:
    manager = getattr(serverapp, "extension_manager", None)
    if manager is None:
        return []
    return list(manager.extension_apps.get(name, ()))


def load(serverapp: Any) -> None:
    """Check the server really built the guarded managers; set the default kernel."""
    lockdown: SandboxLockdown | None = getattr(serverapp, "_sandbox_lockdown", None)
    if lockdown is None:  # linked by a server that did not call link (cannot happen)
        refuse(serverapp, "the extension was loaded without being linked")
        return
    km, ksm = serverapp.kernel_manager, serverapp.kernel_spec_manager
    if not isinstance(km, LockedKernelManager) or not isinstance(ksm, LockedKernelSpecManager):
        refuse(
            serverapp,
            f"the server's kernel manager ({type(km).__name__}) or kernelspec manager "
            f"({type(ksm).__name__}) is not the locked-down one: another extension replaced "
            "it. Disable that extension or lockdown.",
        )
    if km.kernel_spec_manager is not ksm:
        refuse(serverapp, "the kernel manager uses another kernelspec manager than the server")
    km.default_kernel_name = lockdown.map_to
    settings = serverapp.web_app.settings
    terminal_manager = settings.get("terminal_manager")
    if lockdown.terminals == "off":
        if settings.get("terminals_available") or terminal_manager is not None:
            refuse(serverapp, "terminals are still available although terminals = 'off'")
    elif terminal_manager is not None and not isinstance(terminal_manager, SandboxTerminalManager):
        refuse(
            serverapp,
            f"the terminal manager is {type(terminal_manager).__name__}, not the sandboxed "
            "one; set c.SandboxLockdown.terminals = 'off' or remove the other terminal manager",
        )
    from jupyter_server.services.sessions.handlers import default_handlers

    base_url = serverapp.web_app.settings["base_url"]
    handlers = [
        (url_path_join(base_url, pattern), handler)
        for pattern, handler in locked_session_handlers(default_handlers)
    ]
    serverapp.web_app.add_handlers(".*$", handlers)

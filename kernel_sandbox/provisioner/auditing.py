"""The provisioner's part in the audit: a kernel's shell relayed and recorded, its life noted.

Kept out of :mod:`~kernel_sandbox.provisioner.docker_provisioner` (which calls these at a few
points): who the records name, starting the shell relay with its
:class:`~kernel_sandbox.audit.executions.ExecutionAudit`, giving clients the relay's socket,
and the kernel's own events (start, interrupt, end). Whoever hosts the provisioner writes the
records: the user's process in direct mode, the sandbox service for its callers.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, cast

from kernel_sandbox.audit.executions import ExecutionAudit
from kernel_sandbox.audit.trail import AuditTrail, who

if TYPE_CHECKING:
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

__all__ = ["RELAYED", "client_label", "link_shell", "note", "note_signal", "start_shell_audit"]

# The channels a client's requests come in on, and stdin: ipykernel sends ``input_request``
# to the routing path of the shell request it answers (the relay's, then the client's), so
# the answer must come back through a relay with the same routing id (ShellRelay).
RELAYED = ("shell_port", "control_port", "stdin_port")


def client_label(prov: DockerSandboxProvisioner) -> str:
    """Which client drives the kernel, as far as this process can tell: the ``audit_client``
    trait, else the command (``kernel-sandbox run``, ``jupyter-lab``, ...) and the kernel
    manager's class."""
    if prov.audit_client:
        return prov.audit_client[:200]
    argv = sys.argv or [""]
    program = os.path.basename(argv[0]) or "python"
    if (program == "kernel-sandbox" or "/kernel_sandbox/cli/" in argv[0]) and len(argv) > 1:
        program = f"kernel-sandbox {argv[1]}"
    elif program == "__main__.py":  # python -m PACKAGE
        program = os.path.basename(os.path.dirname(argv[0])) or "python"
    elif program in ("-m", "-c") or program.startswith("python"):
        program = "python"
    manager = prov.parent
    multi = getattr(manager, "parent", None)
    kinds = [type(m).__name__ for m in (multi, manager) if m is not None]
    return f"{program} ({', '.join(kinds)})" if kinds else program


def _context(prov: DockerSandboxProvisioner) -> dict[str, Any]:
    """Who: the host user the kernel is started for (the service's caller, or this process's
    user) and the client label."""
    owner = prov.client_owner
    return {**who(owner[0] if owner is not None else None), "client": client_label(prov)}


def _trail(prov: DockerSandboxProvisioner) -> AuditTrail:
    return AuditTrail.shared(prov.audit_log, prov.log_max_bytes, prov.log_backups)


def start_shell_audit(prov: DockerSandboxProvisioner) -> None:
    """Start the kernel's shell relay and its execution audit (once: both outlive restarts,
    but a pooled kernel's relay, which moves with its sandbox)."""
    resources, info = prov.resources, prov.connection_info
    runtime_dir = resources.runtime_dir
    assert runtime_dir is not None
    if not prov.audit_executions or info["ip"] != runtime_dir.client_prefix:
        return  # no links (see _start_relay's warning): clients reach the kernel directly
    executions = resources.executions or ExecutionAudit(
        _trail(prov), prov.kernel_id or "", _context(prov), prov.audit_code_limit
    )
    for channel in RELAYED:  # ipykernel runs execute requests from control too
        port = int(cast(Any, info)[channel])
        resources.start_shell_relay(
            channel,
            str(runtime_dir.kernel_link(port)),
            str(runtime_dir.relay_socket(port)),
            executions,
        )


def link_shell(prov: DockerSandboxProvisioner, kernel_uid: int | None) -> bool:
    """Link the relays to the kernel's new shell and control sockets and give clients the
    relays'; False when they are not relayed (the caller links them for clients as usual).

    Raises:
        KernelStartError: the kernel's shell socket cannot be linked (see RuntimeDir).
    """
    resources, info = prov.resources, prov.connection_info
    runtime_dir = resources.runtime_dir
    if not resources.shell_relays or runtime_dir is None:
        return False
    for channel, relay in resources.shell_relays.items():
        port = int(cast(Any, info)[channel])
        runtime_dir.link_client_socket(port, kernel_uid, runtime_dir.kernel_link(port))
        relay.expose(str(runtime_dir.client_socket(port)))
    return True


def note(prov: DockerSandboxProvisioner, event: str, **fields: Any) -> None:
    """Record an event of the kernel's own (never raises)."""
    executions = prov._resources.executions if prov._resources is not None else None
    if executions is not None:
        executions.event(event, **fields)


def note_signal(prov: DockerSandboxProvisioner, signum: int) -> None:
    """An interrupt (SIGINT) or a kill, as the kernel's manager sends it."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = str(signum)
    note(prov, "interrupt" if signum == signal.SIGINT else "signal", signal=name)

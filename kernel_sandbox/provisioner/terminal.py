"""A terminal's sandbox: a container like a kernel's, whose process is a shell on a TTY.

Shared by the two places a terminal starts: a locked-down Jupyter Server with engine access
(:mod:`kernel_sandbox.lockdown.terminals`) and the sandbox service starting one for its caller
(:mod:`kernel_sandbox.service.terminals`). The container gets a kernel's options from the
provisioner's policy (:mod:`kernel_sandbox.engine.container`: no network, read-only root, no
capabilities, the seccomp profile, limits, image, workspace mode); only its command (the shell,
under the in-sandbox watchdog) and the TTY differ. It is created, not started: the caller
attaches first (``docker start --attach --interactive``), so no output is lost.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from kernel_sandbox.engine.backend import ContainerRequest
from kernel_sandbox.host.resources import KernelResources
from kernel_sandbox.host.uids import UidPool, UidRange
from kernel_sandbox.inside.contract import IMAGE_KIND_KERNEL, label
from kernel_sandbox.provisioner.container import (
    check_exposure,
    container_env,
    container_labels,
    with_watchdog,
)
from kernel_sandbox.provisioner.identity import Identity

__all__ = [
    "DETACH_KEYS",
    "attach_command",
    "create_terminal_sandbox",
    "own_identity",
    "terminal_id",
]

# The docker CLI's detach sequence, made one nobody types by accident (its default, ctrl-p
# ctrl-q, would hold back every ctrl-p: readline's previous-history).
DETACH_KEYS = "ctrl-^,ctrl-@,ctrl-_"


def terminal_id(name: str) -> str:
    """The id ``kernel-sandbox ps`` lists a terminal under (a terminal has no kernel id)."""
    return f"terminal-{name}-{uuid.uuid4().hex[:6]}"


def attach_command(docker: str, container_id: str) -> list[str]:
    """The docker CLI command that attaches a pty to the created container and starts it."""
    return [
        docker,
        "start",
        "--attach",
        "--interactive",
        f"--detach-keys={DETACH_KEYS}",
        container_id,
    ]


async def create_terminal_sandbox(
    provisioner: Any,
    sandbox_id: str,
    name: str,
    identity: Identity,
    shell: list[str],
    term: str,
    log: Any,
    workspace: str | None = None,
    workspace_path: str | None = None,
    backend: Any = None,
) -> KernelResources:
    """Create (not start) the container of terminal ``name`` under ``provisioner``'s policy.

    Args:
        provisioner: a DockerSandboxProvisioner (nothing started): policy, engine, runtime
            root, uid range, watchdog timeout and kernelspec come from it.
        identity: who the shell runs as (``pooled``: a uid of its own from uid_range).
        backend: the engine (default: the provisioner's).
        workspace: the host folder mounted as the workspace (None: none); ``workspace_path``
            where it appears inside when that is not its own path (a service's staged folder).

    Returns the terminal's resources (container, runtime directory, uid claim): close them to
    remove it all.

    Raises:
        SandboxError: the policy exposes a protected file, no uid is free, the engine refused.
    """
    policy = provisioner.policy
    spec_name = provisioner._spec_name
    check_exposure(
        policy,
        [provisioner.token_db, provisioner.audit_log, provisioner.data_credentials],
        spec_name,
    )
    backend = backend or provisioner.engine
    resources = KernelResources(sandbox_id, backend, log)
    try:
        if identity.pooled:
            pool = UidPool(UidRange.parse(provisioner.uid_range), provisioner.uid_claims)
            identity = identity.with_uid(await asyncio.to_thread(resources.claim_uid, pool))
        owner = (identity.uid, identity.gid)
        resources.open_runtime_dir(provisioner.runtime_root, owner, provisioner.runtime_dir_bytes())
        assert resources.runtime_dir is not None
        command = list(shell)
        image_labels = await backend.image_labels(policy.image) or {}
        if provisioner.orphan_timeout > 0 and image_labels.get(label("image")) == IMAGE_KIND_KERNEL:
            command = with_watchdog(command, provisioner.orphan_timeout)
        env = container_env({}, (), provisioner.kernel_spec.env or {}, policy.env, policy.cpu_limit)
        env["TERM"] = term
        labels = container_labels(
            sandbox_id, spec_name, provisioner.profile, str(resources.runtime_dir.path)
        )
        labels[label("terminal")] = name
        request = ContainerRequest(
            name=f"ks-{sandbox_id.replace('terminal-', 'term-')}",
            policy=policy,
            command=command,
            env=env,
            labels=labels,
            runtime_dir=str(resources.runtime_dir.shared),
            user=identity.user,
            workspace=workspace,
            workspace_path=workspace_path,
            host_dir=str(resources.runtime_dir.host_dir),
            terminal=True,
        )
        resources.container_id = await backend.create(request)
        resources.container_name = request.name
    except BaseException:
        await resources.aclose()
        raise
    return resources


def own_identity(policy: Any, workspace: str | None, uid_range: Any, spec: str) -> Identity:
    """The identity a direct-mode terminal runs as: the rule kernels follow."""
    from kernel_sandbox.provisioner.identity import decide_identity

    rw_workspace = workspace if policy.workspace == "rw" else None
    uid_range = uid_range if os.getuid() == 0 else None
    return decide_identity(policy, rw_workspace, uid_range, spec)

"""Which kernel starts a warm pool can serve, and the recipe a start's sandbox is made from.

A start is served from the pool (:mod:`kernel_sandbox.host.pool`) when its policy asks for one
(``pool_size`` above 0) and nothing about it needs the container to be made for it alone:

- the kernelspec runs ``PYTHON -m MODULE ...`` (the waiter imports MODULE, then runs it);
- the image is one ``kernel-sandbox image build`` made (it carries the waiter and watchdog);
- network 'none' (an allowlist's egress bridge and proxy are made per kernel);
- clients can reach the kernel's sockets through links (the handle needs them);
- in the sandbox service, no workspace folder (the caller's folder is staged per kernel).

Everything else a container is made from goes into the recipe, so a start only ever claims
a sandbox made exactly as its own cold start would have made it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kernel_sandbox.host.pool import PoolRecipe
from kernel_sandbox.host.uids import UidPool, UidRange
from kernel_sandbox.inside.contract import NETWORK_ENV, label
from kernel_sandbox.provisioner.container import container_env

if TYPE_CHECKING:
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner
    from kernel_sandbox.provisioner.identity import Identity

__all__ = ["kernel_module", "pool_recipe", "why_not_pooled"]


def kernel_module(argv: list[str]) -> tuple[str, str] | None:
    """(interpreter, module) of a ``PYTHON -m MODULE ...`` argv, else None."""
    if len(argv) >= 3 and os.path.basename(argv[0]).startswith("python") and argv[1] == "-m":
        return argv[0], argv[2]
    return None


def why_not_pooled(provisioner: DockerSandboxProvisioner, image_is_ours: bool) -> str | None:
    """Why this start cannot be served from a pool (None: it can)."""
    policy = provisioner.policy
    if policy.pool_size <= 0:
        return "pool_size is 0"
    if provisioner.client_owner is not None and provisioner.staged_workspace is not None:
        return "the sandbox service pools only kernels without a workspace folder"
    if policy.network != "none":
        return f"network {policy.network!r} (its egress is set up per kernel)"
    if kernel_module(list(provisioner.kernel_spec.argv)) is None:
        return "the kernelspec's argv is not `python -m MODULE ...`"
    if not image_is_ours:
        return f"image {policy.image} was not built by `kernel-sandbox image build`"
    if provisioner.orphan_timeout <= 0:
        return "orphan_timeout is 0 (pooled sandboxes need the watchdog)"
    return None


def pool_recipe(
    provisioner: DockerSandboxProvisioner,
    identity: Identity,
    workspace: str | None,
    workspace_path: str | None,
) -> PoolRecipe:
    """The recipe of this start's sandbox (see the module docstring)."""
    policy = provisioner.policy
    spec = provisioner.kernel_spec
    python, module = kernel_module(list(spec.argv)) or ("python", "ipykernel_launcher")
    # Only what every start of this kernelspec shares: the session's variables (allowlisted
    # from the server's environment) come with the claim.
    env = container_env({}, (), spec.env or {}, policy.env, policy.cpu_limit)
    env[NETWORK_ENV] = policy.network
    uid_pool = None
    if identity.pooled:
        uid_pool = UidPool(UidRange.parse(provisioner.uid_range), provisioner.uid_claims)
    profile = provisioner._spec_config.get("profile") or provisioner.profile
    return PoolRecipe(
        policy=policy,
        user=None if identity.pooled else identity.user,
        uid_pool=uid_pool,
        workspace=workspace,
        workspace_path=workspace_path,
        runtime_root=provisioner.runtime_root,
        runtime_dir_size=provisioner.runtime_dir_bytes(),
        client_reachable=provisioner.client_owner is not None,
        orphan_timeout=provisioner.orphan_timeout,
        env=env,
        python=python,
        module=module,
        kernelspec=provisioner._spec_name,
        profile=profile,
        size=policy.pool_size,
        max_idle=float(policy.pool_max_idle),
        launch_timeout=provisioner.launch_timeout,
        # reaped by the service alone (host/reap.py); the caller is known at the claim only
        labels={label("service"): "true"} if provisioner.client_owner is not None else {},
    )

"""The policy a kernelspec gets, worked out exactly as Jupyter will, for the operator's commands.

``kernel-sandbox policy show``, ``doctor`` and ``install`` read the Jupyter config with the
one loader every command uses (:mod:`kernel_sandbox.policy.jupyter_config`: the files a
Jupyter Server reads) and build the real provisioner from it, so what they report is what a
kernel will get, under Jupyter Server and under ``kernel-sandbox run`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from traitlets.config import Config

from kernel_sandbox.errors import KernelspecError
from kernel_sandbox.kernelspec import PROVISIONER_NAME, find_kernelspec
from kernel_sandbox.policy.jupyter_config import load_jupyter_config
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = ["EffectivePolicy", "effective_policy", "load_jupyter_config", "provisioner_for"]

SECTION = "DockerSandboxProvisioner"


def is_sandboxed(spec: KernelSpec) -> bool:
    provisioner = (spec.metadata or {}).get("kernel_provisioner") or {}
    return bool(provisioner.get("provisioner_name") == PROVISIONER_NAME)


def spec_provisioner_config(spec: KernelSpec) -> dict[str, Any]:
    """The kernelspec's ``metadata.kernel_provisioner.config``."""
    return dict(((spec.metadata or {}).get("kernel_provisioner") or {}).get("config") or {})


def provisioner_for(spec: KernelSpec, config: Config, spec_config: dict[str, Any] | None = None):
    """The real provisioner for ``spec`` under ``config``; nothing is started.

    ``spec_config`` overrides the kernelspec's own provisioner config (to check a kernelspec
    before writing it).
    """
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

    if spec_config is None:
        spec_config = spec_provisioner_config(spec)
    return DockerSandboxProvisioner(kernel_id="", kernel_spec=spec, config=config, **spec_config)


@dataclass
class EffectivePolicy:
    """What a kernelspec's kernels get, and where each part of it came from."""

    kernelspec: str
    resource_dir: str
    profile: str
    profile_source: str
    policy: SandboxPolicy
    sources: dict[str, str]
    ceilings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernelspec": self.kernelspec,
            "resource_dir": self.resource_dir,
            "profile": self.profile,
            "profile_source": self.profile_source,
            "policy": self.policy.to_dict(),
            "sources": self.sources,
            "ceilings": self.ceilings,
        }


def profile_source(spec_config: dict[str, Any], config: Config) -> str:
    if spec_config.get("profile"):
        return "kernelspec"
    if SECTION in config and "profile" in config[SECTION]:
        return "jupyter config"
    return "default"


def resolve(
    spec: KernelSpec, name: str, config: Config, spec_config: dict[str, Any] | None = None
) -> EffectivePolicy:
    """The effective policy of ``spec`` (or of ``spec_config`` in its place).

    Raises:
        PolicyError: the policy is invalid, as the kernel's start would say.
    """
    own = dict(spec_config if spec_config is not None else spec_provisioner_config(spec))
    provisioner = provisioner_for(spec, config, own)
    policy, sources = provisioner.resolve_policy()
    return EffectivePolicy(
        kernelspec=name,
        resource_dir=str(spec.resource_dir or ""),
        profile=own.get("profile") or provisioner.profile,
        profile_source=profile_source(own, config),
        policy=policy,
        sources=sources,
        ceilings=dict(provisioner.ceilings),
    )


def effective_policy(name: str, config: Config) -> EffectivePolicy:
    """The effective policy of the installed kernelspec ``name``.

    Raises:
        KernelspecError: no such kernelspec, or it is not a sandboxed one.
        PolicyError: its policy is invalid.
    """
    spec = find_kernelspec(name)
    if not is_sandboxed(spec):
        raise KernelspecError(
            f"kernelspec {name!r} is not sandboxed (it does not use the {PROVISIONER_NAME} "
            "provisioner); make a sandboxed variant with "
            f"`kernel-sandbox wrap {name} --image IMAGE`"
        )
    return resolve(spec, name, config)

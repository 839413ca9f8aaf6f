"""What a sandbox may do: one typed, validated, immutable policy.

A policy is data only. The provisioner builds it (defaults < profile < Jupyter config <
kernelspec config, see :mod:`kernel_sandbox.policy.layering`), the backend turns it into
container options, and nothing inside the sandbox can reach it. Every key name is a public
interface: users write them in config files and kernelspecs (docs/configuration.md is their
reference).

The keys themselves are described once, in :mod:`kernel_sandbox.policy.keys`. The fields
below are written out so that every use of ``policy.memory_limit`` is typed; their defaults
come from that table, and tests/test_policy.py ties the fields one to one to it (same names,
same order, same types).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy.keys import KEYS, POLICY_KEYS, validate
from kernel_sandbox.policy.mounts import Mount
from kernel_sandbox.policy.values import Dataset

__all__ = ["SandboxPolicy"]


def _strict(name: str) -> Any:
    """The field default of key ``name``: its strict default from the table."""
    default = KEYS[name].default
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.copy(default))
    return dataclasses.field(default=default)


@dataclass(frozen=True)
class SandboxPolicy:
    """The whole perimeter of one sandboxed kernel. Defaults are the strict ones."""

    image: str = _strict("image")
    memory_limit: int = _strict("memory_limit")
    cpu_limit: float = _strict("cpu_limit")
    pids_limit: int = _strict("pids_limit")
    nofile_limit: int = _strict("nofile_limit")
    tmpfs_size: int = _strict("tmpfs_size")
    workspace: str = _strict("workspace")
    mounts: tuple[Mount, ...] = _strict("mounts")
    env: dict[str, str] = _strict("env")
    env_passthrough: tuple[str, ...] = _strict("env_passthrough")
    runtime: str = _strict("runtime")
    seccomp: str = _strict("seccomp")
    network: str = _strict("network")
    egress: tuple[str, ...] = _strict("egress")
    egress_mode: str = _strict("egress_mode")
    egress_hosts: dict[str, str] = _strict("egress_hosts")
    egress_ask_timeout: float = _strict("egress_ask_timeout")
    egress_secrets: dict[str, str] = _strict("egress_secrets")
    idle_timeout: int = _strict("idle_timeout")
    user: str | None = _strict("user")
    datasets: tuple[Dataset, ...] = _strict("datasets")
    token_ttl: int = _strict("token_ttl")
    pool_size: int = _strict("pool_size")
    pool_max_idle: int = _strict("pool_max_idle")
    backend: str = _strict("backend")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: SandboxPolicy | None = None
    ) -> SandboxPolicy:
        """Validate ``values`` (user input) on top of ``base``; unknown keys are errors."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise PolicyError(
                f"unknown policy key {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(cls.keys())}"
            )
        return dataclasses.replace(base or cls(), **{k: validate(k, v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON-able values, in the same form users write."""
        out = dataclasses.asdict(self)
        for key in POLICY_KEYS:
            if key.plain is not None:
                out[key.name] = key.plain(getattr(self, key.name))
        return out

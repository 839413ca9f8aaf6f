"""Layering: the named profiles, the precedence of the layers, and the operator's ceilings.

Precedence, lowest first: built-in defaults < profile < Jupyter config < kernelspec, each
layer replacing a key's value except the merged keys (``env``); then the operator's ceilings
cap what the layers chose, and the host what it cannot give (:mod:`kernel_sandbox.policy.host`).
Which keys merge and which can be capped, and how, is in the policy table
(:mod:`kernel_sandbox.policy.keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy.host import apply_host_limits, host_cpus
from kernel_sandbox.policy.keys import CEILING_KEYS, KEYS, MERGED_KEYS, display_value, validate
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = ["PROFILES", "apply_ceilings", "layer_policy", "profile_values"]

# Named profiles: each is a set of policy values over the strict defaults; "extends" names
# the profile to start from instead. Operators add their own with
# ``c.DockerSandboxProvisioner.profiles`` (built-in names cannot be redefined).
PROFILES: dict[str, dict[str, Any]] = {
    "strict": {},
    "analyst": {
        "workspace": "rw",
        "memory_limit": "4g",
        "cpu_limit": 2.0,
        "pids_limit": 512,
        "tmpfs_size": "1g",
    },
    "educator": {
        "workspace": "rw",
        "memory_limit": "512m",
        "cpu_limit": 0.5,
        "pids_limit": 128,
        "tmpfs_size": "128m",
        "idle_timeout": 3600,
    },
    "ci": {
        "workspace": "ro",
        "memory_limit": "2g",
        "cpu_limit": 1.0,
        "env": {
            "PYTHONHASHSEED": "0",
            "TZ": "UTC",
            "SOURCE_DATE_EPOCH": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            # no MPLBACKEND: ipykernel's inline backend records figures in the executed
            # notebook (Agg would drop them); scripts without a display pick Agg themselves
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        },
    },
    "untrusted": {"extends": "strict", "runtime": "runsc", "workspace": "none"},
}


def profile_values(
    name: str, profiles: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """A profile's own policy values, with the chain of ``extends`` resolved.

    ``profiles`` are the operator's extra profiles, or all of them (built-ins included).

    Raises:
        PolicyError: unknown profile, a redefined built-in, a malformed or circular profile.
    """
    table = {**PROFILES, **(profiles or {})}
    for user_name, values in (profiles or {}).items():
        if user_name in PROFILES and values != PROFILES[user_name]:
            raise PolicyError(
                f"profiles: {user_name!r} is a built-in profile and cannot be redefined; "
                "give yours another name and select it with `profile`"
            )
    chain: list[str] = []
    while True:
        if name not in table:
            raise PolicyError(f"profile: unknown profile {name!r}; known: {', '.join(table)}")
        if name in chain:
            raise PolicyError(f"profiles: {' -> '.join([*chain, name])} extends itself")
        values = table[name]
        if not isinstance(values, Mapping):
            raise PolicyError(
                f"profiles: {name!r} must be a mapping of policy keys, got {values!r}"
            )
        chain.append(name)
        parent = values.get("extends")
        if parent is None:
            break
        name = str(parent)
    merged: dict[str, Any] = {}
    for link in reversed(chain):
        own = {k: v for k, v in table[link].items() if k != "extends"}
        for key in MERGED_KEYS:
            below = merged.get(key)
            if isinstance(own.get(key), Mapping) and isinstance(below, Mapping):
                own[key] = {**below, **own[key]}
        merged.update(own)
    return merged


def layer_policy(
    profile: str,
    profiles: Mapping[str, Mapping[str, Any]],
    config_values: Mapping[str, Any],
    spec_values: Mapping[str, Any],
    ceilings: Mapping[str, Any] | None = None,
    cpus: Callable[[], int | None] = host_cpus,
) -> tuple[SandboxPolicy, dict[str, str]]:
    """Build the effective policy and say where each value came from.

    Precedence, lowest first: built-in defaults < profile < Jupyter config < kernelspec.
    Each layer replaces a key's value, except the keys in MERGED_KEYS (``env``), which are
    merged name by name. ``ceilings`` (operator config only) cap CEILING_KEYS: a value that
    only a default or profile chose is lowered to the ceiling; a value someone set explicitly
    (Jupyter config, kernelspec) above it is an error, so nothing exceeds the operator's cap.
    The host's CPUs (``cpus()``, None: unknown) cap ``cpu_limit`` the same way.

    Raises:
        PolicyError: unknown profile, unknown key, bad value, a value over its ceiling, or
            more CPUs than the host has.
    """
    sources = {key: "default" for key in SandboxPolicy.keys()}
    policy = SandboxPolicy()
    for origin, values in (
        (f"profile {profile}", profile_values(profile, profiles)),
        ("jupyter config", config_values),
        ("kernelspec", spec_values),
    ):
        layer = SandboxPolicy.from_mapping(values, base=policy)
        for key in values:
            below = getattr(policy, key)
            if key in MERGED_KEYS and below:
                merged: dict[str, Any] = {key: {**below, **getattr(layer, key)}}
                layer = dataclasses.replace(layer, **merged)
                sources[key] = f"{sources[key]} + {origin}"
            else:
                sources[key] = origin
        policy = layer
    policy, sources = apply_ceilings(policy, sources, ceilings or {})
    return apply_host_limits(policy, sources, cpus())


def apply_ceilings(
    policy: SandboxPolicy, sources: dict[str, str], ceilings: Mapping[str, Any]
) -> tuple[SandboxPolicy, dict[str, str]]:
    """Hold ``policy`` under the operator's ``ceilings`` (see layer_policy)."""
    sources = dict(sources)
    for key, limit in ceilings.items():
        if key not in CEILING_KEYS:
            raise PolicyError(
                f"ceilings: {key!r} cannot be capped; cappable: {', '.join(CEILING_KEYS)}"
            )
        cap = validate(key, limit)
        value = getattr(policy, key)
        ceiling = KEYS[key].ceiling
        if ceiling is None or not ceiling.exceeded(value, cap):
            continue
        origin = sources[key]
        if origin == "default" or origin.startswith("profile "):
            policy = dataclasses.replace(policy, **{key: cap})
            sources[key] = f"ceiling (the {origin} value was {display_value(key, value)})"
            continue
        verb = (
            "differs from the operator's required"
            if ceiling.pinned
            else "exceeds the operator's ceiling of"
        )
        raise PolicyError(
            f"{key}: {display_value(key, value)} (from {origin}) {verb} "
            f"{display_value(key, cap)}; lower it or ask the operator to change "
            "c.DockerSandboxProvisioner.ceilings"
        )
    return policy, sources

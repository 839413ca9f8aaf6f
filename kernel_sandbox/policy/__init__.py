"""What a sandbox may do: the policy model, its keys, profiles and how it is resolved.

    keys.py            the policy table: one entry per key (parser, default, ceiling, help, flag)
    model.py           SandboxPolicy, the typed, immutable policy
    values.py          parsing user input: sizes, durations, datasets, egress rules, ...
    mounts.py          mount safety: forbidden host paths, reserved targets, the workspace
    layering.py        profiles, precedence (defaults < profile < config < kernelspec), ceilings
    traits.py          the keys as traits of the provisioner (generated from the table)
    jupyter_config.py  the one Jupyter-config loader of every command
    effective.py       the effective policy of a kernelspec, for the operator's commands

The names below are re-exported here; ``effective`` and ``jupyter_config`` are imported from
their modules (they pull in jupyter_client).
"""

from kernel_sandbox.policy.keys import (
    CEILING_KEYS,
    KEYS,
    MERGED_KEYS,
    POLICY_KEYS,
    PolicyKey,
    display_value,
    validate,
)
from kernel_sandbox.policy.layering import PROFILES, apply_ceilings, layer_policy, profile_values
from kernel_sandbox.policy.model import SandboxPolicy
from kernel_sandbox.policy.mounts import (
    RESERVED_TARGETS,
    Mount,
    check_mount_source,
    parse_mount,
    parse_mounts,
    resolve_workspace,
)
from kernel_sandbox.policy.values import (
    DEFAULT_IMAGE,
    Dataset,
    format_size,
    parse_dataset,
    parse_datasets,
    parse_duration,
    parse_size,
)

__all__ = [
    "CEILING_KEYS",
    "DEFAULT_IMAGE",
    "KEYS",
    "MERGED_KEYS",
    "POLICY_KEYS",
    "PROFILES",
    "RESERVED_TARGETS",
    "Dataset",
    "Mount",
    "PolicyKey",
    "SandboxPolicy",
    "apply_ceilings",
    "check_mount_source",
    "display_value",
    "format_size",
    "layer_policy",
    "parse_dataset",
    "parse_datasets",
    "parse_duration",
    "parse_mount",
    "parse_mounts",
    "parse_size",
    "profile_values",
    "resolve_workspace",
    "validate",
]

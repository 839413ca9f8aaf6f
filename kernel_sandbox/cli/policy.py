"""``kernel-sandbox policy show|profiles``, and the policy flags of ``install`` and ``wrap``.

``policy show`` works a kernelspec's policy out exactly as the kernel's start will (profile,
Jupyter config, ceilings) and says where each value came from. The flags
(:data:`POLICY_FLAGS`) are turned into kernelspec values by :mod:`kernel_sandbox.cli.install`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from kernel_sandbox.cli.console import EXIT_OK, out
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.engine.container import reserved_for, workspace_target
from kernel_sandbox.policy import (
    POLICY_KEYS,
    PROFILES,
    SandboxPolicy,
    display_value,
    profile_values,
)
from kernel_sandbox.policy.effective import EffectivePolicy, effective_policy, load_jupyter_config

__all__ = ["POLICY_FLAGS", "PolicyFlag", "add_policy_command", "add_policy_flags"]


@dataclass(frozen=True)
class PolicyFlag:
    """A command-line flag that sets one policy key (from the policy table's ``flag``)."""

    key: str
    flag: str
    metavar: str
    help: str
    repeat: bool = False
    choices: tuple[str, ...] | None = None


# The policy keys `install` and `wrap` take as flags, in the policy table's order, derived from
# it (kernel_sandbox/policy/keys.py). --network, --egress* and --dataset are added by
# kernel_sandbox/cli/install.py (the table's ``other_flag``).
POLICY_FLAGS = tuple(
    PolicyFlag(key.name, f.spelling, f.metavar, f.help, f.repeat, f.choices)
    for key in POLICY_KEYS
    if (f := key.flag) is not None
)


def add_policy_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("policy (each overrides the profile's value)")
    for flag in POLICY_FLAGS:
        if flag.key in skip:
            continue
        if flag.repeat:
            group.add_argument(
                flag.flag,
                dest=f"policy_{flag.key}",
                action="append",
                default=None,
                metavar=flag.metavar,
                help=flag.help,
            )
        else:
            group.add_argument(
                flag.flag,
                dest=f"policy_{flag.key}",
                metavar=flag.metavar,
                choices=flag.choices,
                help=flag.help,
            )


# -- policy show / profiles ------------------------------------------------------------------


def _sources_table(effective: EffectivePolicy) -> Table:
    table = Table(
        title=f"kernelspec {effective.kernelspec} — profile {effective.profile} "
        f"(from {effective.profile_source})",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("from")
    for key in SandboxPolicy.keys():
        source = effective.sources[key]
        style = "dim" if source == "default" else ""
        table.add_row(key, display_value(key, getattr(effective.policy, key)), source, style=style)
    return table


def _workspace_line(mode: str, folder: str) -> str:
    """Where a notebook in ``folder`` finds its folder inside, and why if not at its path."""
    if mode == "none":
        return "workspace: none (no host folder is mounted; the kernel starts in its home)"
    line = f"workspace ({mode}): a notebook in {folder} runs in {workspace_target(folder)} inside"
    reserved = reserved_for(folder)
    if reserved is None:
        return line
    return (
        f"{line}, not at its own path ({reserved} is the sandbox's own there): absolute paths "
        f"differ; use paths relative to the notebook, or keep notebooks outside {reserved}"
    )


async def cmd_policy_show(args: argparse.Namespace, backend: DockerBackend) -> int:
    config, files = load_jupyter_config(args.config)
    effective = effective_policy(args.kernel_name, config)
    here = os.path.realpath(os.getcwd())
    if args.json:
        inside = workspace_target(here) if effective.policy.workspace != "none" else None
        facts = {
            **effective.to_dict(),
            "config_files": files,
            "workspace_here": {"host": here, "inside": inside},
        }
        print(json.dumps(facts, indent=1, default=list))
        return EXIT_OK
    out.print(_sources_table(effective))
    if effective.ceilings:
        caps = ", ".join(
            f"{k} ≤ {v}" if k != "runtime" else f"runtime = {v}"
            for k, v in effective.ceilings.items()
        )
        out.print(f"operator ceilings: {caps}")
    out.print(f"kernelspec: {effective.resource_dir}/kernel.json")
    out.print(_workspace_line(effective.policy.workspace, here), soft_wrap=True)
    out.print("Jupyter config read: " + (", ".join(files) or "none"))
    return EXIT_OK


async def cmd_policy_profiles(args: argparse.Namespace, backend: DockerBackend) -> int:
    config, _files = load_jupyter_config(args.config)
    extra = dict(config.get("DockerSandboxProvisioner", {}).get("profiles") or {})
    names = [*PROFILES, *(n for n in extra if n not in PROFILES)]
    policies = {n: SandboxPolicy.from_mapping(profile_values(n, extra)) for n in names}
    if args.json:
        print(json.dumps({n: p.to_dict() for n, p in policies.items()}, indent=1, default=list))
        return EXIT_OK
    table = Table(header_style="bold")
    table.add_column("key")
    for name in names:
        table.add_column(name)
    for key in SandboxPolicy.keys():
        table.add_row(key, *(display_value(key, getattr(policies[n], key)) for n in names))
    out.print(table)
    return EXIT_OK


def add_policy_command(commands: Any) -> None:
    policy = commands.add_parser(
        "policy",
        help="show the effective policy of a kernelspec, or the profiles",
        description="Policies decide what a sandboxed kernel may do. A value comes from, "
        "lowest first: the built-in defaults, the profile, Jupyter config "
        "(c.DockerSandboxProvisioner.KEY), the kernelspec; operator ceilings cap it.",
    )
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="the effective policy of KERNEL_NAME and where each value came from",
        description="Work out the policy of KERNEL_NAME as its kernel's start will (reading "
        "the Jupyter Server config files) and print each value with its source.",
    )
    show.add_argument("kernel_name", metavar="KERNEL_NAME", help="a sandboxed kernelspec")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.add_argument("--config", metavar="FILE", help="also read this Jupyter config file")
    show.set_defaults(func=cmd_policy_show)
    profiles = actions.add_parser(
        "profiles",
        help="every profile's values side by side",
        description="Every profile's values side by side, key by key: the built-in ones and "
        "those defined in Jupyter config (c.DockerSandboxProvisioner.profiles).",
    )
    profiles.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profiles.add_argument("--config", metavar="FILE", help="also read this Jupyter config file")
    profiles.set_defaults(func=cmd_policy_profiles)

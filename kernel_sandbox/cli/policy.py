"""The policy commands: ``install`` with a policy, ``wrap``, ``policy show|profiles``.

Registered in :func:`kernel_sandbox.cli.app.build_parser`. Every policy a command writes is first
worked out exactly as the kernel's start will (profile, Jupyter config, ceilings), so a bad
value is refused here, with the same message, before any kernelspec is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from rich.console import Console
from rich.table import Table

from kernel_sandbox.errors import KernelspecError, PolicyError
from kernel_sandbox.kernelspec import (
    PYTHON_ARGV,
    check_kernel_name,
    find_kernelspec,
    sandbox_spec,
    shipped_kernelspecs,
    wrapped_spec,
    write_kernelspec,
)
from kernel_sandbox.policy import (
    POLICY_KEYS,
    PROFILES,
    SandboxPolicy,
    display_value,
    profile_values,
)
from kernel_sandbox.policy.effective import (
    EffectivePolicy,
    effective_policy,
    load_jupyter_config,
    resolve,
)

__all__ = [
    "POLICY_FLAGS",
    "add_install_location",
    "add_install_options",
    "add_policy_command",
    "add_policy_flags",
    "add_wrap_command",
    "install_custom",
    "policy_flag_values",
    "wants_custom_install",
]

EXIT_OK = 0
out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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
# it (kernel_sandbox/policy/keys.py). --network, --egress* (cli/egress.py) and --dataset
# (cli/app.py) are added by their own modules (the table's ``other_flag``).
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


def policy_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The policy values given as flags, in the form a kernelspec stores them.

    Raises:
        PolicyError: an ``--env`` without ``=``.
    """
    values: dict[str, Any] = {}
    for flag in POLICY_FLAGS:
        given = getattr(args, f"policy_{flag.key}", None)
        if given is None:
            continue
        if flag.key == "env":
            pairs = [item.partition("=") for item in given]
            bad = [item for item, (_, sep, _) in zip(given, pairs, strict=True) if not sep]
            if bad:
                raise PolicyError(f"--env: expected NAME=VALUE, got {bad[0]!r}")
            given = {name: value for name, _, value in pairs}
        elif flag.key == "mounts":
            given = [_absolute_mount(item) for item in given]
        values[flag.key] = given
    return values


def _absolute_mount(item: str) -> str:
    """Let a relative or ~ host path be written on the command line (stored absolute)."""
    head, sep, rest = item.partition(":")
    return os.path.abspath(os.path.expanduser(head)) + sep + rest


def wants_custom_install(args: argparse.Namespace) -> bool:
    """Whether `install` writes a kernelspec with a policy, not only the shipped ones."""
    return bool(args.name or args.profile or args.display_name or policy_flag_values(args))


def _storable(policy: SandboxPolicy, keys: list[str]) -> dict[str, Any]:
    """The values of ``keys`` in the form a person writes (validated, JSON-able)."""
    every = policy.to_dict()
    return {key: every[key] for key in keys}


def _spec_values(values: dict[str, Any]) -> dict[str, Any]:
    """Validate ``values`` alone and store them normalised (sizes as "4g", absolute mounts)."""
    return _storable(SandboxPolicy.from_mapping(values), list(values))


def _check_and_show(spec: dict[str, Any], name: str, config_file: str | None) -> EffectivePolicy:
    """Work the policy out as the kernel's start will; refuse now what it would refuse."""
    config, _files = load_jupyter_config(config_file)
    provisioner_config = spec["metadata"]["kernel_provisioner"]["config"]
    kernel_spec = KernelSpec(
        **{
            k: v
            for k, v in spec.items()
            if k in ("argv", "display_name", "language", "metadata", "env")
        }
    )
    kernel_spec.name = name
    try:
        return resolve(kernel_spec, name, config, dict(provisioner_config))
    except PolicyError as exc:
        raise PolicyError(f"kernelspec {name}: {exc}") from exc


def _location(args: argparse.Namespace) -> tuple[bool, str | None]:
    return args.user, sys.prefix if args.sys_prefix else args.prefix


def install_custom(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    """``kernel-sandbox install --profile P --name N ...``: one kernelspec with a policy.

    ``extra`` are policy values from the other modules' flags (egress, datasets).
    """
    profile = args.profile
    if args.name is None and profile is None:
        raise KernelspecError(
            "--name is required (or give --profile, and the name "
            "defaults to python3-sandbox-PROFILE)"
        )
    name = check_kernel_name(args.name or f"python3-sandbox-{profile}")
    display = args.display_name or (
        f"Python 3 (sandboxed, {profile})" if profile else f"Python 3 (sandboxed, {name})"
    )
    values = _spec_values({**policy_flag_values(args), **extra})
    spec = sandbox_spec(
        list(PYTHON_ARGV),
        display,
        "python",
        policy=values,
        profile=profile,
        extra_metadata={"debugger": False},
    )
    effective = _check_and_show(spec, name, args.config)
    user, prefix = _location(args)
    where = write_kernelspec(
        name, spec, user=user, prefix=prefix, resources=shipped_kernelspecs()[0]
    )
    err.print(f"installed kernelspec {name} ({display!r}, profile {effective.profile}) in {where}")
    return EXIT_OK


# -- wrap -----------------------------------------------------------------------------------


async def cmd_wrap(args: argparse.Namespace) -> int:
    from kernel_sandbox.cli.egress import egress_install_policy

    original = find_kernelspec(args.kernel_name)
    name = check_kernel_name(args.name or f"{args.kernel_name}-sandboxed")
    values = _spec_values({**policy_flag_values(args), **egress_install_policy(args)})
    image = args.image
    spec = wrapped_spec(original, args.kernel_name, image, args.display_name, values, args.profile)
    effective = _check_and_show(spec, name, args.config)
    user, prefix = _location(args)
    where = write_kernelspec(
        name, spec, user=user, prefix=prefix, resources=Path(original.resource_dir)
    )
    err.print(
        f"installed kernelspec {name} ({spec['display_name']!r}): {args.kernel_name}'s "
        f"kernel in image {image}, profile {effective.profile}, in {where}"
    )
    if spec["argv"] != original.argv:
        err.print(
            f"note: argv[0] {original.argv[0]!r} runs as {spec['argv'][0]!r} on the image's PATH"
        )
    return EXIT_OK


def add_install_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--name", help=f"name of the kernelspec to write ({what})")
    parser.add_argument("--display-name", metavar="TEXT", help="name shown in Jupyter's launcher")
    parser.add_argument(
        "--profile",
        help="policy profile to start from: "
        f"{', '.join(PROFILES)} or one defined in Jupyter config",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="also read this Jupyter config file (after the usual ones)"
    )


def add_install_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help="install into this Python environment (sys.prefix)",
    )
    where.add_argument("--prefix", metavar="P", help="install under prefix P")


def add_wrap_command(commands: Any) -> None:
    from kernel_sandbox.cli.egress import add_egress_install_flags

    wrap = commands.add_parser(
        "wrap",
        help="make a sandboxed variant of an existing kernelspec (R, Julia, ...)",
        description="Write a new kernelspec that runs KERNEL_NAME's command inside IMAGE, in "
        "the sandbox, under a policy. The image must contain that kernel; an absolute program "
        "path in its argv (a host interpreter) is replaced by the bare name, found on the "
        "image's PATH. Example: kernel-sandbox wrap ir --image my/r-kernel:4.3 --profile analyst",
    )
    wrap.add_argument(
        "kernel_name",
        metavar="KERNEL_NAME",
        help="installed kernelspec to wrap (see `jupyter kernelspec list`)",
    )
    wrap.add_argument("--image", required=True, help="image that contains the kernel")
    add_install_options(wrap, "default KERNEL_NAME-sandboxed")
    add_install_location(wrap)
    add_policy_flags(wrap, skip=("image",))
    add_egress_install_flags(wrap)
    wrap.set_defaults(func=cmd_wrap)


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


async def cmd_policy_show(args: argparse.Namespace) -> int:
    config, files = load_jupyter_config(args.config)
    effective = effective_policy(args.kernel_name, config)
    if args.json:
        print(json.dumps({**effective.to_dict(), "config_files": files}, indent=1, default=list))
        return EXIT_OK
    out.print(_sources_table(effective))
    if effective.ceilings:
        caps = ", ".join(
            f"{k} ≤ {v}" if k != "runtime" else f"runtime = {v}"
            for k, v in effective.ceilings.items()
        )
        out.print(f"operator ceilings: {caps}")
    out.print(f"kernelspec: {effective.resource_dir}/kernel.json")
    out.print("Jupyter config read: " + (", ".join(files) or "none"))
    return EXIT_OK


async def cmd_policy_profiles(args: argparse.Namespace) -> int:
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

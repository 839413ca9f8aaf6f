"""``kernel-sandbox install`` and ``kernel-sandbox wrap``: write sandboxed kernelspecs.

``install`` alone installs the kernelspecs shipped with kernel-sandbox (python3-sandbox);
with ``--name``, ``--profile`` or policy flags it writes one Python kernelspec with that
policy. ``wrap`` writes a sandboxed variant of an installed kernelspec (R, Julia, ...).

Every policy a command writes is first worked out exactly as the kernel's start will
(profile, Jupyter config, ceilings), so a bad value is refused here, with the same message,
before any kernelspec is written. Every kernel.json goes through
:func:`kernel_sandbox.kernelspec.write_kernelspec`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec

from kernel_sandbox.cli.console import EXIT_OK, done, warn
from kernel_sandbox.cli.policy import POLICY_FLAGS, add_policy_flags
from kernel_sandbox.cli.visibility import kernelspec_visibility
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import KernelspecError, PolicyError, SandboxError
from kernel_sandbox.kernelspec import (
    PYTHON_ARGV,
    check_kernel_name,
    find_kernelspec,
    install_kernelspec,
    read_kernelspec,
    sandbox_spec,
    shipped_kernelspecs,
    with_policy,
    wrapped_spec,
    write_kernelspec,
)
from kernel_sandbox.policy import PROFILES, SandboxPolicy, parse_datasets
from kernel_sandbox.policy.effective import EffectivePolicy, load_jupyter_config, resolve
from kernel_sandbox.policy.host import check_host_files
from kernel_sandbox.policy.values import URL_SCHEME

__all__ = [
    "add_install_command",
    "add_wrap_command",
    "egress_install_policy",
    "policy_flag_values",
]


# -- flags to policy values -----------------------------------------------------------------


def policy_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The policy values given as flags (:data:`POLICY_FLAGS`), in the form a kernelspec
    stores them.

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


def absolute_datasets(items: list[str]) -> list[str]:
    """``--dataset NAME=SOURCE[:access]`` with a relative or ~ local SOURCE made absolute from
    the current directory, as ``--mount`` does; URLs and malformed items are left to the
    policy's own check."""
    made: list[str] = []
    for item in items:
        name, sep, spec = item.partition("=")
        if sep and spec.strip() and not URL_SCHEME.match(spec.strip()):
            spec = os.path.abspath(os.path.expanduser(spec.strip()))
        made.append(name + sep + spec)
    return made


def egress_install_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy values the egress flags ask for ({} when none was given).

    Raises:
        PolicyError: egress flags without ``--network allowlist``, or a bad value.
    """
    values: dict[str, Any] = {}
    if args.egress:
        values["egress"] = list(args.egress)
    if args.egress_host:
        values["egress_hosts"] = list(args.egress_host)
    if args.egress_mode:
        values["egress_mode"] = args.egress_mode
    if args.egress_ask_timeout is not None:
        values["egress_ask_timeout"] = args.egress_ask_timeout
    if getattr(args, "egress_secret", None):
        values["egress_secrets"] = list(args.egress_secret)
    if values and args.network != "allowlist":
        raise PolicyError(
            "--egress, --egress-host, --egress-mode and --egress-secret need --network allowlist"
        )
    if args.network:
        values["network"] = args.network
    policy = SandboxPolicy.from_mapping(values)  # validated and normalised
    return {key: getattr(policy, key) for key in values}


def _spec_values(values: dict[str, Any]) -> dict[str, Any]:
    """Validate ``values`` alone and store them normalised (sizes as "4g", absolute mounts)."""
    every = SandboxPolicy.from_mapping(values).to_dict()
    return {key: every[key] for key in values}


def _check(spec: dict[str, Any], name: str, config_file: str | None) -> EffectivePolicy:
    """Work the policy out as the kernel's start will; refuse now what it would refuse (a
    seccomp file included)."""
    config, _files = load_jupyter_config(config_file)
    provisioner_config = spec["metadata"]["kernel_provisioner"]["config"]
    fields = ("argv", "display_name", "language", "metadata", "env")
    kernel_spec = KernelSpec(**{k: v for k, v in spec.items() if k in fields})
    kernel_spec.name = name
    effective = resolve(kernel_spec, name, config, dict(provisioner_config))  # names the spec
    try:
        check_host_files(effective.policy)
    except PolicyError as exc:
        raise PolicyError(f"kernelspec {name}: {exc}") from exc
    return effective


async def _warn_missing_runtime(backend: DockerBackend, effective: EffectivePolicy) -> None:
    """A warning when the engine answers and lacks the policy's runtime (it can be registered
    after the install; ``doctor`` fails until it is). Silent when the engine does not answer."""
    runtime = effective.policy.runtime
    if runtime == "runc":
        return
    try:
        known = await backend.runtimes()
    except SandboxError:
        return
    if runtime not in known:
        warn(
            f"warning: the Docker engine has no OCI runtime {runtime!r}: kernels of "
            f"{effective.kernelspec} will not start until it is registered (`kernel-sandbox "
            "doctor` says how)"
        )


def _location(args: argparse.Namespace) -> tuple[bool, str | None]:
    return args.user, sys.prefix if args.sys_prefix else args.prefix


def _installed(message: str, where: str) -> None:
    """Say what was installed where, and which Jupyter will and will not find it."""
    done(message)
    for warning, line in kernelspec_visibility(where).lines():
        if warning:
            warn(f"warning: {line}")
        else:
            done(f"  {line}")


# -- install --------------------------------------------------------------------------------


def _wants_custom_install(args: argparse.Namespace) -> bool:
    """Whether `install` writes a kernelspec with a policy, not only the shipped ones."""
    return bool(args.name or args.profile or args.display_name or policy_flag_values(args))


def _install_shipped(args: argparse.Namespace, egress: dict[str, Any]) -> None:
    """The shipped kernelspecs as they are, or with the egress and dataset values added."""
    extra = {k: list(v) if isinstance(v, tuple) else v for k, v in egress.items()}
    if args.dataset:
        datasets = parse_datasets(absolute_datasets(args.dataset))
        extra["datasets"] = {d.name: f"{d.source}:{d.access}" for d in datasets}
    user, prefix = _location(args)
    for source in shipped_kernelspecs():
        if extra:
            spec = with_policy(read_kernelspec(source), extra)
            where = write_kernelspec(source.name, spec, user=user, prefix=prefix, resources=source)
        else:
            where = install_kernelspec(source, user=user, prefix=prefix)
        _installed(f"installed kernelspec {source.name} in {where}", where)


def _install_custom(args: argparse.Namespace, extra: dict[str, Any]) -> EffectivePolicy:
    """``kernel-sandbox install --profile P --name N ...``: one kernelspec with a policy.

    ``extra`` are the egress and dataset values.
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
    effective = _check(spec, name, args.config)
    user, prefix = _location(args)
    where = write_kernelspec(
        name, spec, user=user, prefix=prefix, resources=shipped_kernelspecs()[0]
    )
    _installed(
        f"installed kernelspec {name} ({display!r}, profile {effective.profile}) in {where}",
        where,
    )
    return effective


async def cmd_install(args: argparse.Namespace, backend: DockerBackend) -> int:
    egress = egress_install_policy(args)
    if _wants_custom_install(args):
        datasets = {"datasets": absolute_datasets(args.dataset)} if args.dataset else {}
        effective = _install_custom(args, {**egress, **datasets})
        await _warn_missing_runtime(backend, effective)
    else:
        _install_shipped(args, egress)
    return EXIT_OK


# -- wrap -----------------------------------------------------------------------------------


async def cmd_wrap(args: argparse.Namespace, backend: DockerBackend) -> int:
    original = find_kernelspec(args.kernel_name)
    name = check_kernel_name(args.name or f"{args.kernel_name}-sandboxed")
    values = _spec_values({**policy_flag_values(args), **egress_install_policy(args)})
    image = args.image
    spec = wrapped_spec(original, args.kernel_name, image, args.display_name, values, args.profile)
    effective = _check(spec, name, args.config)
    user, prefix = _location(args)
    where = write_kernelspec(
        name, spec, user=user, prefix=prefix, resources=Path(original.resource_dir)
    )
    _installed(
        f"installed kernelspec {name} ({spec['display_name']!r}): {args.kernel_name}'s "
        f"kernel in image {image}, profile {effective.profile}, in {where}",
        where,
    )
    if spec["argv"] != original.argv:
        done(f"  argv[0] {original.argv[0]!r} runs as {spec['argv'][0]!r} on the image's PATH")
    await _warn_missing_runtime(backend, effective)
    return EXIT_OK


# -- parsers --------------------------------------------------------------------------------


def _add_install_options(parser: argparse.ArgumentParser, what: str) -> None:
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


def _add_install_location(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help="install into this Python environment (sys.prefix)",
    )
    where.add_argument("--prefix", metavar="P", help="install under prefix P")


def _add_egress_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("egress (network allowlist)")
    group.add_argument(
        "--network",
        choices=("none", "allowlist"),
        default=None,
        help="'allowlist': still no interface but loopback; a host-side proxy "
        "lets the --egress patterns out (default none)",
    )
    group.add_argument(
        "--egress",
        action="append",
        default=[],
        metavar="PATTERN",
        help="host pattern the kernels may reach: api.corp.test, *.corp.test, "
        "data.corp.test:8443 (ports 80 and 443 unless given; repeatable)",
    )
    group.add_argument(
        "--egress-host",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="resolve NAME to ADDRESS on the host, like a hosts file (repeatable)",
    )
    group.add_argument(
        "--egress-mode",
        choices=("deny", "ask"),
        default=None,
        help="unlisted targets: deny (default) or ask a person (kernel-sandbox egress approve)",
    )
    group.add_argument(
        "--egress-secret",
        action="append",
        default=[],
        metavar="HOST=SOURCE[:HOW]",
        help="a credential the host-side proxy adds to HTTPS requests to HOST (the kernel never "
        "sees it): SOURCE env:NAME, file:/PATH or keyring:SERVICE/USER; HOW bearer (default), "
        "basic, header:NAME or query:NAME (repeatable)",
    )
    group.add_argument(
        "--egress-ask-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long an 'ask' request waits for a person (default 60)",
    )


def add_install_command(commands: Any) -> None:
    """Register ``kernel-sandbox install`` on the CLI's subparsers."""
    install = commands.add_parser(
        "install",
        help="install python3-sandbox, or a sandboxed kernelspec with a policy",
        description="Without --name, --profile or policy flags: install the kernelspecs that "
        "come with kernel-sandbox, so that `jupyter kernelspec list` shows python3-sandbox. "
        "With them: write one Python kernelspec with that policy, e.g. `kernel-sandbox install "
        "--profile educator --name course-101 --display-name 'Course 101' --mount "
        "/srv/course:ro`. The policy is checked first, with the Jupyter config, exactly as "
        "the kernel's start will check it.",
    )
    _add_install_options(install, "default python3-sandbox-PROFILE")
    _add_install_location(install)
    add_policy_flags(install)
    _add_egress_flags(install)
    install.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=SOURCE[:read|:read-write]",
        help="grant the kernels a dataset through the data broker (repeatable)",
    )
    install.set_defaults(func=cmd_install)


def add_wrap_command(commands: Any) -> None:
    """Register ``kernel-sandbox wrap`` on the CLI's subparsers."""
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
    _add_install_options(wrap, "default KERNEL_NAME-sandboxed")
    _add_install_location(wrap)
    add_policy_flags(wrap, skip=("image",))
    _add_egress_flags(wrap)
    wrap.set_defaults(func=cmd_wrap)

"""``kernel-sandbox egress ...`` (approve-once from a terminal) and the install flags that
give the shipped kernelspecs an egress allowlist.

    kernel-sandbox egress pending [--kernel ID] [--json]
    kernel-sandbox egress approve KERNEL_ID HOST:PORT [--always]
    kernel-sandbox egress deny KERNEL_ID HOST:PORT [--always]
    kernel-sandbox install --network allowlist --egress '*.corp.test' \\
        --egress-host pypi.corp.test=10.0.0.5 --egress-mode ask
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from kernel_sandbox.egress.control import EgressControl, EgressControlError
from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = [
    "add_egress_command",
    "add_egress_install_flags",
    "egress_install_policy",
    "with_egress_policy",
]

EXIT_OK, EXIT_FAILED = 0, 1
err = Console(stderr=True, highlight=False)


# -- kernel-sandbox egress ------------------------------------------------------------------


async def cmd_pending(args: argparse.Namespace) -> int:
    requests = EgressControl(args.runtime_root).pending(args.kernel)
    if args.json:
        rows = [{**r.__dict__, "seconds_left": round(r.seconds_left, 1)} for r in requests]
        print(json.dumps(rows))
        return EXIT_OK
    if not requests:
        err.print("no egress request is waiting for approval")
        return EXIT_OK
    print(f"{'KERNEL':<38} {'TARGET':<40} {'WAITING':>7} {'LEFT':>6}")
    for r in requests:
        print(f"{r.kernel_id:<38} {r.target:<40} {r.waiting:>7} {r.seconds_left:>5.0f}s")
    return EXIT_OK


async def cmd_decide(args: argparse.Namespace) -> int:
    control = EgressControl(args.runtime_root)
    decide = control.approve if args.egress_command == "approve" else control.deny
    try:
        count = decide(args.kernel_id, args.target, always=args.always)
    except EgressControlError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True)
        return EXIT_FAILED
    verb = "approved" if args.egress_command == "approve" else "denied"
    scope = " (and from now on, for this kernel)" if args.always else ""
    err.print(
        f"{verb} {count} waiting request(s) to {args.target} in kernel {args.kernel_id}{scope}"
    )
    return EXIT_OK


def add_egress_command(commands: Any) -> None:
    """Register ``kernel-sandbox egress`` on the CLI's subparsers."""
    egress = commands.add_parser(
        "egress",
        help="approve or deny waiting egress requests (egress_mode: ask)",
        description="Kernels whose policy has egress_mode 'ask' hold a request to an unlisted "
        "target until a person decides here, or until its time is up (silence denies). An "
        "approval holds for that one kernel only.",
    )
    actions = egress.add_subparsers(dest="egress_command", required=True, metavar="ACTION")
    pending = actions.add_parser("pending", help="list the requests waiting for a decision")
    pending.add_argument("--kernel", default=None, metavar="ID", help="only this kernel's")
    pending.add_argument("--json", action="store_true", help="print JSON")
    pending.set_defaults(func=cmd_pending)
    parsers = [pending]
    for name, verb in (("approve", "let through"), ("deny", "refuse")):
        action = actions.add_parser(name, help=f"{verb} the waiting requests to TARGET")
        action.add_argument("kernel_id", metavar="KERNEL_ID", help="kernel id (or a unique prefix)")
        action.add_argument(
            "target", metavar="TARGET", help="HOST:PORT as `egress pending` shows it"
        )
        action.add_argument(
            "--always",
            action="store_true",
            help=f"also {verb} later requests to TARGET, for this kernel's life",
        )
        action.set_defaults(func=cmd_decide)
        parsers.append(action)
    for parser in parsers:
        parser.add_argument(
            "--runtime-root",
            default=None,
            metavar="DIR",
            help="runtime root of the kernels (default /tmp/kernel-sandbox-UID)",
        )


# -- kernel-sandbox install --network allowlist ... -----------------------------------------


def add_egress_install_flags(install: argparse.ArgumentParser) -> None:
    group = install.add_argument_group("egress (network allowlist)")
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
        "--egress-ask-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long an 'ask' request waits for a person (default 60)",
    )


def egress_install_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The policy values the install flags ask for ({} when none was given).

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
    if values and args.network != "allowlist":
        raise PolicyError("--egress, --egress-host and --egress-mode need --network allowlist")
    if args.network:
        values["network"] = args.network
    policy = SandboxPolicy.from_mapping(values)  # validated and normalised
    return {key: getattr(policy, key) for key in values}


@contextmanager
def with_egress_policy(source: Path, policy: dict[str, Any]) -> Iterator[Path]:
    """``source`` itself, or a copy of that kernelspec folder with ``policy`` in its config."""
    if not policy:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="ks-spec-") as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy)
        spec = json.loads((copy / "kernel.json").read_text())
        provisioner = spec.setdefault("metadata", {}).setdefault("kernel_provisioner", {})
        config = provisioner.setdefault("config", {})
        config.update({k: list(v) if isinstance(v, tuple) else v for k, v in policy.items()})
        SandboxPolicy.from_mapping({k: v for k, v in config.items() if k != "profile"})
        (copy / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        yield copy

"""``kernel-sandbox egress ...``: approve-once from a terminal (``egress_mode: ask``).

    kernel-sandbox egress pending [--kernel ID] [--json]
    kernel-sandbox egress approve KERNEL_ID HOST:PORT [--always]
    kernel-sandbox egress deny KERNEL_ID HOST:PORT [--always]
    kernel-sandbox egress secrets list|revoke|rotate ...   (kernel_sandbox.cli.egress_secrets)

The install flags that give a kernelspec an allowlist (``--network allowlist --egress ...``)
are in :mod:`kernel_sandbox.cli.install`. Through the sandbox service (which runs the proxies:
:mod:`kernel_sandbox.cli.service_mode`) these see and decide for the caller's own kernels only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kernel_sandbox.cli.console import EXIT_OK, UsageError, done
from kernel_sandbox.cli.egress_secrets import add_secrets_command
from kernel_sandbox.cli.service_mode import add_service_flags, ask, service_for
from kernel_sandbox.egress.control import EgressControl
from kernel_sandbox.egress.rules import TargetError, parse_target
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_egress_command"]


async def cmd_pending(args: argparse.Namespace, backend: DockerBackend) -> int:
    client = service_for(args)
    everyone = False
    if client is not None:
        reply = await ask(client, "egress_pending", kernel=args.kernel)
        rows: list[dict[str, Any]] = reply["pending"]
        everyone = bool(reply.get("all"))
    else:
        requests = EgressControl(args.runtime_root).pending(args.kernel)
        rows = [{**r.__dict__, "seconds_left": round(r.seconds_left, 1)} for r in requests]
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    if not rows:
        done("no egress request is waiting for approval")
        return EXIT_OK
    user = f" {'USER':<16}" if everyone else ""
    print(f"{'KERNEL':<38} {'TARGET':<40} {'WAITING':>7} {'LEFT':>6}{user}")
    for r in rows:
        user = f" {r.get('user', ''):<16}" if everyone else ""
        print(
            f"{r['kernel_id']:<38} {r['target']:<40} {r['waiting']:>7} "
            f"{r['seconds_left']:>5.0f}s{user}"
        )
    return EXIT_OK


async def cmd_decide(args: argparse.Namespace, backend: DockerBackend) -> int:
    """Approve or deny; no such kernel or nothing waiting is an EgressControlError (exit 2).

    TARGET may be pasted as a URL (``https://pypi.org/simple`` is ``pypi.org:443``)."""
    try:
        target = str(parse_target(args.target))
    except TargetError as exc:
        raise UsageError(f"TARGET: {exc}; give HOST:PORT as `egress pending` shows it") from None
    client = service_for(args)
    if client is not None:
        reply = await ask(
            client,
            "egress_decide",
            decision=args.egress_command,
            kernel_id=args.kernel_id,
            target=target,
            always=args.always,
        )
        count = int(reply["decided"])
    else:
        control = EgressControl(args.runtime_root)
        decide = control.approve if args.egress_command == "approve" else control.deny
        count = decide(args.kernel_id, target, always=args.always)
    verb = "approved" if args.egress_command == "approve" else "denied"
    scope = " (and from now on, for this kernel)" if args.always else ""
    done(f"{verb} {count} waiting request(s) to {target} in kernel {args.kernel_id}{scope}")
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
            "target",
            metavar="TARGET",
            help="HOST:PORT as `egress pending` shows it (or a URL: https://HOST/... is HOST:443)",
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
            help="runtime root of the kernels (default /tmp/kernel-sandbox-UID; direct mode)",
        )
        add_service_flags(parser)
    add_secrets_command(actions)

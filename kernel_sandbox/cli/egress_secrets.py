"""``kernel-sandbox egress secrets ...``: the credentials a running kernel's proxy adds.

    kernel-sandbox egress secrets list [--kernel ID] [--json]
    kernel-sandbox egress secrets revoke KERNEL_ID HOST
    kernel-sandbox egress secrets rotate KERNEL_ID HOST

``revoke`` withdraws the credential from that kernel (its next request to HOST is refused);
``rotate`` reads it again from its source (rewrite the file or keyring entry first). Values are
never shown. Direct mode only: the sandbox service does not run kernels with ``egress_secrets``
(an operator-only key there). See :mod:`kernel_sandbox.egress.intercept`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kernel_sandbox.cli.console import EXIT_OK, done
from kernel_sandbox.egress.control import EgressControl
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_secrets_command"]


async def cmd_list(args: argparse.Namespace, backend: DockerBackend) -> int:
    control = EgressControl(args.runtime_root)
    found = {args.kernel: control.secrets(args.kernel)} if args.kernel else control.all_secrets()
    if args.json:
        print(json.dumps(found))
        return EXIT_OK
    if not found:
        done("no running kernel has egress secrets")
        return EXIT_OK
    print(f"{'KERNEL':<38} {'HOST':<32} {'SOURCE':<32} {'APPLY':<20} {'STATE':<8} {'SENT':>5}")
    for kernel_id, rows in found.items():
        for r in rows:
            print(
                f"{kernel_id:<38} {r['host']:<32} {r['source']:<32} {r['apply']:<20} "
                f"{r['state']:<8} {r['injected']:>5}"
            )
    return EXIT_OK


async def cmd_change(args: argparse.Namespace, backend: DockerBackend) -> int:
    """Revoke or rotate; no such kernel or secret is an EgressControlError (exit 2)."""
    control = EgressControl(args.runtime_root)
    op = control.revoke_secret if args.secrets_command == "revoke" else control.rotate_secret
    changed = op(args.kernel_id, args.host)
    verb = "withdrew" if args.secrets_command == "revoke" else "re-read"
    done(
        f"{verb} the secret for {', '.join(changed)} in kernel {args.kernel_id}; "
        "its next request there sees the change"
    )
    return EXIT_OK


def add_secrets_command(actions: Any) -> list[argparse.ArgumentParser]:
    """Register ``egress secrets`` on the ``egress`` subparsers; returns its parsers."""
    secrets = actions.add_parser(
        "secrets",
        help="list, revoke or rotate the credentials the proxy adds (egress_secrets)",
        description="A kernel whose policy has egress_secrets gets its credentials added by "
        "its host-side proxy; these act on a running kernel, effective on its next request.",
    )
    commands = secrets.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    listing = commands.add_parser("list", help="the secrets of running kernels (never values)")
    listing.add_argument("--kernel", default=None, metavar="ID", help="only this kernel's")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)
    parsers = [listing]
    for name, text in (
        ("revoke", "withdraw the credential for HOST from this kernel"),
        ("rotate", "read the credential for HOST again from its source"),
    ):
        action = commands.add_parser(name, help=text)
        action.add_argument("kernel_id", metavar="KERNEL_ID", help="kernel id (or a unique prefix)")
        action.add_argument(
            "host", metavar="HOST", help="a host pattern of egress_secrets, or a host it matches"
        )
        action.set_defaults(func=cmd_change)
        parsers.append(action)
    for parser in parsers:
        parser.add_argument(
            "--runtime-root",
            default=None,
            metavar="DIR",
            help="runtime root of the kernels (default /tmp/kernel-sandbox-UID)",
        )
    return parsers

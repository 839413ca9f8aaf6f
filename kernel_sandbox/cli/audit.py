"""``kernel-sandbox audit show|verify``: read and check the hash-chained audit (docs/audit.md).

Both read files, never a kernel: the audit log (execute requests, kernel events, data
accesses) and the egress decision log (decisions and approvals). By default this user's
(direct mode); ``--log-dir`` names a directory holding both (the sandbox service's
``--log-dir``, readable by root), ``--log`` one chain (repeatable). Where a sandbox service is
in use, ``show`` asks it instead (:mod:`kernel_sandbox.service.audit_view`): your own kernels'
records, or everyone's for an operator (``--user NAME`` for one student's).

``verify`` exits 0 when every chain is intact, 1 when one is not (the first bad record named
on stdout), 2 on a usage error (a ``--log`` that does not exist), as every command does
(:mod:`kernel_sandbox.cli.console`).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.markup import escape
from rich.table import Table

from kernel_sandbox.cli.console import EXIT_FAILED, EXIT_OK, UsageError, done, wide_console
from kernel_sandbox.cli.service_mode import add_service_flags, ask, service_for
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_audit_command", "default_chains"]

AUDIT_FILE, EGRESS_FILE = "audit.jsonl", "egress.jsonl"


def default_chains() -> list[str]:
    """This user's audit log and egress decision log (the provisioner's defaults)."""
    from kernel_sandbox.broker.tokens import default_state_dir
    from kernel_sandbox.egress.service import default_log_path

    return [str(default_state_dir() / AUDIT_FILE), default_log_path()]


def _chains(args: argparse.Namespace) -> list[str]:
    if args.log:
        missing = [p for p in args.log if not (os.path.exists(p) or _rotated(p))]
        if missing:
            raise UsageError(f"--log {missing[0]}: no such audit log")
        return list(args.log)
    if args.log_dir:
        if not os.path.isdir(args.log_dir):
            raise UsageError(f"--log-dir {args.log_dir}: not a directory")
        return [os.path.join(args.log_dir, AUDIT_FILE), os.path.join(args.log_dir, EGRESS_FILE)]
    return default_chains()


def _rotated(path: str) -> bool:
    return os.path.exists(f"{path}.1")


async def cmd_audit_verify(args: argparse.Namespace, backend: DockerBackend) -> int:
    from kernel_sandbox.audit.verify import verify_chain

    failed = False
    for chain in _chains(args):
        report = verify_chain(chain)
        if report.broken is not None:
            failed = True
            done(f"TAMPERED {chain}: {report.broken}")
            continue
        if not report.files:
            done(f"no records {chain}")
            continue
        span = f"seq {report.first.seq}..{report.last.seq}" if report.first and report.last else ""
        extra = f", {report.unchained} unchained lines before the chain" if report.unchained else ""
        files = len(report.files)
        done(f"intact {chain}: {report.records} records ({span}) in {files} file(s){extra}")
    return EXIT_FAILED if failed else EXIT_OK


def _summary(row: dict[str, Any]) -> str:
    event = row["event"]
    if event == "execute":
        code = str(row.get("code", "")).strip().splitlines()
        first = code[0] if code else ""
        more = f" (+{len(code) - 1} lines)" if len(code) > 1 else ""
        return (first[:60] + ("…" if len(first) > 60 else "")) + more
    if event == "data":
        return f"{row.get('op')} {row.get('dataset') or ''}:{row.get('path') or ''}"
    if event == "egress":
        return f"{row.get('host')}:{row.get('port')} {row.get('rule') or ''}"
    skip = {"time", "event", "kernel_id", "uid", "user", "client", "seq", "prev", "hash"}
    return ", ".join(f"{k}={v}" for k, v in row.items() if k not in skip and v is not None)


def _status(row: dict[str, Any]) -> str:
    if row["event"] == "execute":
        status = str(row.get("status", ""))
        seconds = row.get("seconds")
        return f"{status} {seconds:.3f}s" if isinstance(seconds, (int, float)) else status
    return str(row.get("decision") or row.get("status") or "")


async def cmd_audit_show(args: argparse.Namespace, backend: DockerBackend) -> int:
    from kernel_sandbox.audit.show import parse_since, rows
    from kernel_sandbox.service.audit_view import owned_by

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    service = None if (args.log or args.log_dir) else service_for(args)
    if service is not None:  # the service wrote the audit, and reads it for its callers
        fields = {"kernel": args.kernel, "since": args.since, "user": args.user}
        reply = await ask(service, "audit", **{k: v for k, v in fields.items() if v})
        found, dropped = list(reply["rows"]), int(reply.get("dropped", 0))
    else:
        found, dropped = rows(_chains(args), args.kernel, since), 0
        if args.user:
            found = owned_by(found, None, args.user)
    if args.json:
        for row in found:
            print(json.dumps(row))
        return EXIT_OK
    if not found:
        done("no audit records" + (" for that kernel" if args.kernel else ""))
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    for column in ("TIME", "KERNEL", "EVENT", "WHO", "STATUS", "WHAT"):
        table.add_column(column)
    for row in found:
        who = row.get("user") or (str(row["uid"]) if "uid" in row else "")
        client = row.get("username") or ""
        table.add_row(
            str(row.get("time", ""))[:23].replace("T", " "),
            str(row.get("kernel_id", ""))[:8],
            row["event"],
            escape(f"{who} {client}".strip()),
            escape(_status(row)),
            escape(_summary(row)),
        )
    wide_console(140).print(table)
    if dropped:
        done(f"({dropped} older records not shown: narrow with --since or --kernel)")
    return EXIT_OK


def add_audit_command(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="show and verify the hash-chained audit of what ran",
        description="The host-side audit: every execute request of every sandboxed kernel, "
        "kernel events, data accesses and egress decisions (see docs/audit.md).",
    )
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def where(parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument(
            "--log",
            action="append",
            metavar="FILE",
            help="a chained log to read (repeatable; default: yours, "
            "~/.local/share/kernel-sandbox/audit.jsonl and the egress log)",
        )
        group.add_argument(
            "--log-dir",
            metavar="DIR",
            help="a directory holding audit.jsonl and egress.jsonl (kernel-sandbox serve's "
            "--log-dir, e.g. /var/log/kernel-sandbox)",
        )

    show = actions.add_parser("show", help="list audit records, executions paired")
    show.add_argument("--kernel", metavar="ID", help="one kernel (its id or a prefix)")
    show.add_argument(
        "--since", metavar="T", help="from a time (2026-12-03T16:00, UTC) or an age (30m, 2h, 7d)"
    )
    show.add_argument(
        "--user",
        metavar="NAME",
        help="the kernels of one account (through the service: operators only)",
    )
    show.add_argument("--json", action="store_true", help="one JSON record per line")
    where(show)
    add_service_flags(show)
    show.set_defaults(func=cmd_audit_show)

    verify = actions.add_parser(
        "verify",
        help="check the hash chains (exit 0 intact, 1 tampered, 2 usage error)",
        description="Check every record's hash and link from the anchor to the head: an "
        "edited, deleted, reordered or truncated record is named. Exit 0 intact, 1 tampered.",
    )
    where(verify)
    verify.set_defaults(func=cmd_audit_verify)

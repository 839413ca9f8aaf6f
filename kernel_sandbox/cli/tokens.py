"""``kernel-sandbox tokens list|revoke``: the data tokens of sandboxed kernels.

A token or kernel that is not in the store is a ``TokenNotFound`` (exit 2, through
:data:`kernel_sandbox.cli.console.EXIT_CODES`); ``install --dataset`` is in
:mod:`kernel_sandbox.cli.install`. Through the sandbox service (which holds the token
database: :mod:`kernel_sandbox.cli.service_mode`) both show and act on the caller's own
kernels' tokens only.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from kernel_sandbox.broker.tokens import TokenStore, default_state_dir
from kernel_sandbox.cli.console import EXIT_OK, UsageError, done, wide_console
from kernel_sandbox.cli.service_mode import add_service_flags, ask, service_for
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_tokens_command"]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


@contextmanager
def _database(path: Path) -> Iterator[None]:
    """sqlite's own errors (a path that cannot be opened) as one line, not a traceback."""
    try:
        yield
    except sqlite3.Error as exc:
        raise UsageError(f"token database {path}: {exc} (--db FILE)") from exc
    except OSError as exc:  # its folder cannot be made or entered
        where = f" ({exc.filename})" if exc.filename else ""
        raise UsageError(
            f"token database {path}: {exc.strerror or exc}{where} (--db FILE)"
        ) from exc


async def cmd_tokens_list(args: argparse.Namespace, backend: DockerBackend) -> int:
    client = service_for(args)
    everyone = False
    if client is not None:
        reply = await ask(client, "tokens", all=args.all)
        records: list[dict[str, Any]] = reply["tokens"]
        everyone = bool(reply.get("all"))
    else:
        now = time.time()
        with _database(args.db):
            records = [r.to_dict(now) for r in TokenStore(args.db).records(include_dead=args.all)]
    if args.json:
        print(json.dumps(records, indent=1))
        return EXIT_OK
    if not records:
        hint = "" if args.all else " (--all shows the others)"
        done(f"no live tokens{hint}")
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    columns = ["TOKEN", "KERNEL", "STATE", "DATASETS", "EXPIRES", "REVOKED"]
    for column in columns + (["USER"] if everyone else []):
        table.add_column(column)
    for record in records:
        datasets = ", ".join(f"{n}:{access}" for n, access in record["datasets"].items())
        revoked = record["revoked"]
        revoked_text = f"{_when(revoked)} ({record['reason']})" if revoked else "-"
        table.add_row(
            record["token_id"],
            record["kernel_id"],
            record["state"],
            datasets,
            _when(record["expires"]),
            revoked_text,
            *([record.get("user") or "-"] if everyone else []),
        )
    wide_console(200).print(table)
    return EXIT_OK


async def cmd_tokens_revoke(args: argparse.Namespace, backend: DockerBackend) -> int:
    client = service_for(args)
    if client is not None:
        reply = await ask(client, "revoke", ident=args.ident, reason=args.reason)
        if not reply["revoked"]:
            done(f"{args.ident}: its tokens were already revoked or expired")
        for token in reply["revoked"]:
            done(f"revoked token {token['token_id']} of kernel {token['kernel_id']}")
        return EXIT_OK
    with _database(args.db):
        revoked = TokenStore(args.db).revoke(args.ident, reason=args.reason)  # TokenNotFound: 2
    if not revoked:
        done(f"{args.ident}: its tokens were already revoked or expired")
        return EXIT_OK
    for record in revoked:
        done(f"revoked token {record.token_id} of kernel {record.kernel_id}")
    return EXIT_OK


def add_tokens_command(commands: Any) -> None:
    """Add ``tokens list`` and ``tokens revoke`` to the CLI's subparsers."""
    tokens = commands.add_parser(
        "tokens",
        help="list or revoke the data tokens of sandboxed kernels",
        description="Each kernel whose policy grants datasets gets a scoped, expiring token for "
        "the host's data broker. Revoking one stops it on its next request; the user's own "
        "credentials are untouched. Through the sandbox service: your own kernels' tokens only "
        "(the service holds the database; --db does not apply).",
    )
    actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    default_db = default_state_dir() / "tokens.sqlite"

    listing = actions.add_parser("list", help="show live tokens (--all: also expired, revoked)")
    listing.add_argument("--all", action="store_true", help="include expired and revoked tokens")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument(
        "--db", type=Path, default=default_db, help=f"token database (default {default_db})"
    )
    add_service_flags(listing)
    listing.set_defaults(func=cmd_tokens_list)

    revoke = actions.add_parser("revoke", help="revoke a kernel's tokens, or one token")
    revoke.add_argument(
        "ident",
        metavar="KERNEL_ID|TOKEN_ID",
        help="a kernel id (all its tokens) or a token id from `tokens list`",
    )
    revoke.add_argument("--reason", default="revoked by user", help="recorded with the revocation")
    revoke.add_argument(
        "--db", type=Path, default=default_db, help=f"token database (default {default_db})"
    )
    add_service_flags(revoke)
    revoke.set_defaults(func=cmd_tokens_revoke)

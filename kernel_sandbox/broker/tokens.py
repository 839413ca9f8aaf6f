"""Scoped data tokens: minted per kernel, stored only hashed, expiring, revocable.

A token is an opaque random string (``secrets``) that a kernel presents to the data broker.
The host keeps only its SHA-256, the kernel it was minted for, its scope (dataset name ->
source and access), its expiry and whether it was revoked, in SQLite, so revocations and
expiries survive a restart of the broker (or of the Jupyter Server that runs it). The user's
own credentials are never involved: revoking a token touches nothing but its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import TokenNotFound, TokenRefused  # defined there, kept here

__all__ = [
    "PRUNE_AFTER",
    "Grant",
    "TokenNotFound",
    "TokenRecord",
    "TokenRefused",
    "TokenStore",
    "default_state_dir",
]

TOKEN_PREFIX = "kst1_"
# How long records of expired or revoked tokens are kept (for `tokens list --all`) before the
# broker prunes them when it opens the store; the audit log keeps every request regardless.
PRUNE_AFTER = 7 * 24 * 3600.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_id   TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    kernel_id  TEXT NOT NULL,
    scope      TEXT NOT NULL,
    created    REAL NOT NULL,
    expires    REAL NOT NULL,
    revoked    REAL,
    reason     TEXT
);
CREATE INDEX IF NOT EXISTS tokens_by_kernel ON tokens (kernel_id);
"""


def default_state_dir() -> Path:
    """Host-only home of the token database and the audit log (never mounted in a sandbox):
    ``$XDG_DATA_HOME/kernel-sandbox``, by default ``~/.local/share/kernel-sandbox``."""
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return Path(base) / "kernel-sandbox"


@dataclass(frozen=True)
class Grant:
    """One dataset as a token grants it: where it comes from and what may be done."""

    source: str
    access: str  # "read" or "read-write"
    # A local root's (st_dev, st_ino) when the broker opened it at grant time (broker.roots):
    # an adopting broker serves the path only if it still names that directory.
    root: tuple[int, int] | None = None

    @property
    def writable(self) -> bool:
        return self.access == "read-write"


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    kernel_id: str
    scope: dict[str, Grant]
    created: float
    expires: float
    revoked: float | None
    reason: str | None

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        return "expired" if now >= self.expires else "live"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "kernel_id": self.kernel_id,
            "datasets": {name: g.access for name, g in self.scope.items()},
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
            "reason": self.reason,
            "state": self.state(now),
        }


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The token records in one SQLite file (created 0600 in a 0700 directory).

    Safe to use from several threads and processes (WAL journal, a connection per thread).
    ``clock`` returns the current time in seconds (injectable for tests).
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        self._local = threading.local()
        self._initialized = False
        self._init_lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            with self._init_lock:
                if not self._initialized:
                    self._create_private()
                db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                if not self._initialized:
                    db.executescript(_SCHEMA)
                    self._initialized = True
            self._local.db = db
        return db

    def _create_private(self) -> None:
        """Create the database file 0600 (SQLite gives its -wal and -shm files the same mode).

        Only a file that does not exist yet is opened here: closing any descriptor of a file
        drops every POSIX lock this process holds on it, including SQLite's own.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            return
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass

    def mint(
        self, kernel_id: str, scope: Mapping[str, Grant], ttl: float
    ) -> tuple[str, TokenRecord]:
        """A new token for ``kernel_id``; returns the secret (shown once, never stored) and
        its record."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        record = TokenRecord(
            token_id=secrets.token_hex(6),
            kernel_id=kernel_id,
            scope=dict(scope),
            created=now,
            expires=now + ttl,
            revoked=None,
            reason=None,
        )
        scope_json = json.dumps({n: _grant_json(g) for n, g in record.scope.items()})
        self._db().execute(
            "INSERT INTO tokens (token_id, token_hash, kernel_id, scope, created, expires)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (record.token_id, hash_token(token), kernel_id, scope_json, now, record.expires),
        )
        return token, record

    def check(self, token: str, kernel_id: str) -> TokenRecord:
        """The record of a live ``token`` minted for ``kernel_id``.

        Raises:
            TokenRefused: unknown (bad-token), minted for another kernel (wrong-kernel),
                revoked, or expired.
        """
        row = (
            self._db()
            .execute("SELECT * FROM tokens WHERE token_hash = ?", (hash_token(token),))
            .fetchone()
        )
        if row is None:
            raise TokenRefused("bad-token", "token not recognised by the data broker")
        record = _record(row)
        if record.kernel_id != kernel_id:
            raise TokenRefused("wrong-kernel", "token does not belong to this kernel")
        if record.revoked is not None:
            raise TokenRefused("revoked", "token revoked")
        if self.clock() >= record.expires:
            raise TokenRefused("expired", "token expired (restart the kernel for a new one)")
        return record

    def revoke(self, ident: str, reason: str = "revoked by user") -> list[TokenRecord]:
        """Revoke the live tokens of a kernel id or the token with that token id.

        Raises:
            TokenNotFound: nothing has that kernel id or token id.
        """
        db = self._db()
        rows = db.execute(
            "SELECT * FROM tokens WHERE token_id = ? OR kernel_id = ?", (ident, ident)
        ).fetchall()
        if not rows:
            raise TokenNotFound(
                f"no token or kernel {ident!r}; `kernel-sandbox tokens list --all` shows them"
            )
        now = self.clock()
        db.execute(
            "UPDATE tokens SET revoked = ?, reason = ? "
            "WHERE (token_id = ? OR kernel_id = ?) AND revoked IS NULL",
            (now, reason, ident, ident),
        )
        return [_record(r) for r in rows if r["revoked"] is None]

    def revoke_kernel(self, kernel_id: str, reason: str) -> int:
        """Revoke every live token of ``kernel_id`` (none is fine); return how many."""
        cur = self._db().execute(
            "UPDATE tokens SET revoked = ?, reason = ? WHERE kernel_id = ? AND revoked IS NULL",
            (self.clock(), reason, kernel_id),
        )
        return cur.rowcount

    def records(self, include_dead: bool = False) -> list[TokenRecord]:
        """Token records, newest first; only live ones unless ``include_dead``."""
        rows = self._db().execute("SELECT * FROM tokens ORDER BY created DESC").fetchall()
        records = [_record(r) for r in rows]
        if include_dead:
            return records
        now = self.clock()
        return [r for r in records if r.state(now) == "live"]

    def purge(self, older_than: float) -> int:
        """Delete records that expired or were revoked more than ``older_than`` seconds ago;
        return how many. The broker calls it when it starts (:class:`DataBroker`)."""
        limit = self.clock() - older_than
        cur = self._db().execute(
            "DELETE FROM tokens WHERE expires < ? OR (revoked IS NOT NULL AND revoked < ?)",
            (limit, limit),
        )
        return cur.rowcount

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _grant_json(grant: Grant) -> dict[str, Any]:
    out: dict[str, Any] = {"source": grant.source, "access": grant.access}
    if grant.root is not None:
        out["root"] = list(grant.root)
    return out


def _grant(value: dict[str, Any]) -> Grant:
    root = value.get("root")
    return Grant(value["source"], value["access"], (int(root[0]), int(root[1])) if root else None)


def _record(row: Any) -> TokenRecord:
    if not isinstance(row, sqlite3.Row):
        raise TypeError("expected an sqlite3.Row")
    scope = {n: _grant(g) for n, g in json.loads(row["scope"]).items()}
    return TokenRecord(
        row["token_id"],
        row["kernel_id"],
        scope,
        row["created"],
        row["expires"],
        row["revoked"],
        row["reason"],
    )

"""The audit through the service: an instructor reads a student's runs, a student their own.

The service writes the audit (``--log-dir``, readable by root only), so users cannot read the
files. ``kernel-sandbox audit show`` asks the service instead (op ``audit``): an operator
(``operator = true``) gets every user's records, anyone else the records of their own
kernels, which are the kernels whose records carry their uid (its start, its executions); a
data access or egress decision of such a kernel comes with it. The newest ``limit`` rows are
sent, with code clipped to keep the reply within the protocol's size.
"""

from __future__ import annotations

from typing import Any

from kernel_sandbox.audit.show import parse_since, rows
from kernel_sandbox.service.protocol import BadRequest

__all__ = ["CODE_CHARS", "DEFAULT_ROWS", "MAX_ROWS", "audit_reply"]

DEFAULT_ROWS = 500
MAX_ROWS = 2000
CODE_CHARS = 1000  # of each row's code in a reply (the file keeps up to audit_code_limit)


def _optional_text(request: dict[str, Any], key: str) -> str | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 200:
        raise BadRequest(f"{key} must be a non-empty string of at most 200 characters")
    return value


def _limit(request: dict[str, Any]) -> int:
    value = request.get("limit", DEFAULT_ROWS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROWS:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_ROWS}")
    return value


def owned_by(found: list[dict[str, Any]], uid: int | None, user: str | None) -> list[dict]:
    """The rows of kernels that ``uid`` (or the account ``user``) ran: kernels one of whose
    records carries it, with every row of those kernels."""
    kernels = {
        row.get("kernel_id")
        for row in found
        if (uid is not None and row.get("uid") == uid) or (user and row.get("user") == user)
    }
    kernels.discard(None)
    return [row for row in found if row.get("kernel_id") in kernels]


def audit_reply(
    chains: list[str], caller_uid: int, operator: bool, request: dict[str, Any]
) -> dict[str, Any]:
    """Answer an ``audit`` request: ``kernel`` (an id or prefix), ``since`` (a time or an
    age), ``user`` (an account name; operators only), ``limit``."""
    kernel, user = _optional_text(request, "kernel"), _optional_text(request, "user")
    since_text, limit = _optional_text(request, "since"), _limit(request)
    try:
        since = parse_since(since_text) if since_text else None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if user and not operator:
        raise BadRequest("user: only an operator (operator = true) reads other users' records")
    found = rows(chains, kernel, since)
    if not operator:
        found = owned_by(found, caller_uid, None)
    elif user:
        found = owned_by(found, None, user)
    dropped = max(0, len(found) - limit)
    sent = []
    for row in found[dropped:]:
        code = row.get("code")
        if isinstance(code, str) and len(code) > CODE_CHARS:
            row = {**row, "code": code[:CODE_CHARS] + " …(clipped in this reply)"}
        sent.append(row)
    return {"rows": sent, "dropped": dropped, "all": operator}

"""The broker's audit trail: one JSON line per request, on the host, where no kernel can reach.

Each line: time (UTC, ISO 8601), kernel id, token id, dataset, path, operation, decision
(allow, deny or error), the reason for a refusal, and the bytes moved. Lines are appended
with ``O_APPEND`` in a single write, hash-chained with the execution records in the same file
(:mod:`kernel_sandbox.audit.chain`: several brokers, processes, can share it; it rotates by
size without breaking the chain). The token itself never appears, not even
hashed.

A kernel chooses much of a line (its paths, dataset names, and how many requests it makes):
each text field is clipped (:func:`~kernel_sandbox.host.logtext.clip`), and each kernel may
add at most ``budget.lines`` records per ``budget.interval`` seconds; the rest are still
decided and answered, only counted, and summarized in one ``"decision": "suppressed"`` record
with the count per decision.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernel_sandbox.audit.chain import shared_appender
from kernel_sandbox.host.logfile import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES
from kernel_sandbox.host.logtext import DEFAULT_RECORDS, LineBudget, Suppressed, clip

__all__ = ["AuditLog"]

MAX_FIELD = 512


def _clip(value: Any) -> Any:
    return clip(value, MAX_FIELD) if isinstance(value, str) else value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditLog:
    """Append-only JSON lines at ``path`` (created 0600 in a 0700 directory).

    Args:
        path: the file; ``path.1`` ... ``path.<backups>`` are its rotated predecessors.
        max_bytes: rotate when the file would grow past this (0: never).
        backups: rotated files kept.
        budget: records per kernel per interval (default 1000 per 10 s).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        budget: LineBudget | None = None,
    ):
        self.path = Path(path)
        self.file = shared_appender(self.path, max_bytes, backups)  # chained (kernel_sandbox.audit)
        self.budget = budget or LineBudget(DEFAULT_RECORDS)

    def record(
        self,
        *,
        kernel_id: str,
        op: str | None,
        decision: str,
        dataset: str | None = None,
        path: str | None = None,
        token_id: str | None = None,
        reason: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        entry = {
            "time": _now(),
            "event": "data",
            "kernel_id": kernel_id,
            "token_id": token_id,
            "op": _clip(op),
            "dataset": _clip(dataset),
            "path": _clip(path),
            "decision": decision,
            "reason": _clip(reason),
            **{k: _clip(v) for k, v in extra.items()},
        }
        allowed, ended = self.budget.admit(kernel_id, decision)
        if ended is not None:
            self._summarize(ended)
        if allowed:
            self._write(entry)
        return entry

    def flush(self, force: bool = False) -> None:
        """Write the summaries of budget intervals that are over (every one, with ``force``)."""
        for ended in self.budget.due(force):
            self._summarize(ended)

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone: summarize what was held back from it."""
        ended = self.budget.forget(kernel_id)
        if ended is not None:
            self._summarize(ended)

    def close(self) -> None:
        self.flush(force=True)
        self.file.close()

    def _summarize(self, ended: Suppressed) -> None:
        self._write(
            {
                "time": _now(),
                "event": "data",
                "kernel_id": ended.key,
                "decision": "suppressed",
                "suppressed": ended.count,
                "seconds": round(ended.seconds, 3),
                "decisions": ended.kinds,
                "reason": ended.message("audit records"),
            }
        )

    def _write(self, entry: dict[str, Any]) -> None:
        self.file.write((json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def entries(self) -> list[dict[str, Any]]:
        """The broker's records so far in the current file (for tests and `kernel-sandbox
        tokens`: not the kernels' execution records sharing the file); none when there is no
        log."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [r for r in records if r.get("event", "data") == "data"]

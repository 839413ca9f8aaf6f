"""The broker's audit trail: one JSON line per request, on the host, where no kernel can reach.

Each line: time (UTC, ISO 8601), kernel id, token id, dataset, path, operation, decision
(allow, deny or error), the reason for a refusal, and the bytes moved. Lines are appended
with ``O_APPEND`` in a single write, so several brokers (processes) can share one file.
The token itself never appears, not even hashed.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]

MAX_FIELD = 512


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "..."
    return value


class AuditLog:
    """Append-only JSON lines at ``path`` (created 0600 in a 0700 directory)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()

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
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "kernel_id": kernel_id,
            "token_id": token_id,
            "op": _clip(op),
            "dataset": _clip(dataset),
            "path": _clip(path),
            "decision": decision,
            "reason": reason,
            **{k: _clip(v) for k, v in extra.items()},
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every line so far (for tests and `kernel-sandbox tokens`); none when there is no log."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

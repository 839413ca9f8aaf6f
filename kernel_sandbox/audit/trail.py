"""The audit trail: how a host-side component records an event about a kernel.

One chained file (:mod:`kernel_sandbox.audit.chain`) per owner: the provisioner's ``audit_log``
(direct mode: ``~/.local/share/kernel-sandbox/audit.jsonl``; the sandbox service: ``--log-dir``
``/audit.jsonl``). The data broker's records (:mod:`kernel_sandbox.broker.audit`) go to the
same file; the egress proxies chain their decision log (approvals included) beside it.

    trail = AuditTrail.shared(path, max_bytes, backups)
    trail.record("execute_request", kernel_id, code=..., msg_id=...)

Every record gets ``time`` (UTC, ISO 8601, milliseconds), ``event`` and ``kernel_id`` first;
text a kernel may have chosen is clipped by the caller (:func:`clip_text`). :meth:`record`
never raises: an audit that cannot be written is logged (the kernel's work goes on), and
counted in :attr:`AuditTrail.failures`.
"""

from __future__ import annotations

import logging
import os
import pwd
from datetime import datetime, timezone
from typing import Any

from kernel_sandbox.audit.chain import ChainedAppender, shared_appender
from kernel_sandbox.host.logtext import clip

__all__ = ["AuditTrail", "clip_text", "now", "who"]

_log = logging.getLogger("kernel_sandbox.audit")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def clip_text(value: Any, limit: int = 512) -> Any:
    """A kernel-chosen string made safe and short for a record; other values as they are."""
    return clip(value, limit) if isinstance(value, str) else value


def who(uid: int | None = None) -> dict[str, Any]:
    """``{"uid": ..., "user": ...}`` of ``uid`` (default: this process's), from the account
    database."""
    uid = os.getuid() if uid is None else uid
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    return {"uid": uid, "user": name}


class AuditTrail:
    """Records events about kernels in one chained file (see the module docstring)."""

    def __init__(self, appender: ChainedAppender):
        self.appender = appender
        self.failures = 0

    @classmethod
    def shared(cls, path: str | os.PathLike[str], max_bytes: int, backups: int) -> AuditTrail:
        """A trail on this process's one appender for ``path``."""
        return cls(shared_appender(path, max_bytes, backups))

    @property
    def path(self) -> str:
        return str(self.appender.path)

    def record(self, event: str, kernel_id: str, **fields: Any) -> dict[str, Any] | None:
        """Append one record; the record written (with ``seq`` and ``hash``), None if it could
        not be (logged)."""
        entry = {"time": now(), "event": event, "kernel_id": kernel_id, **fields}
        try:
            return self.appender.append(entry)
        except (OSError, ValueError) as exc:
            self.failures += 1
            if self.failures % 100 == 1:  # a full disk: the first failure, then every 100th
                _log.error(
                    "kernel %s: cannot write the audit trail %s (%d record(s) lost so far): %s",
                    kernel_id,
                    self.path,
                    self.failures,
                    exc,
                )
            return None

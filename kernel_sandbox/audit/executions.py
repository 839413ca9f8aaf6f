"""One kernel's execute requests and their replies, as audit records.

The shell relay (:mod:`kernel_sandbox.host.shell_relay`) hands :meth:`ExecutionAudit.observe`
a copy of every shell message with its direction: ``in`` (a client's, toward the kernel) or
``out`` (the kernel's, toward a client). Only the client's direction can create a record: what
ran is what a client asked for, whatever the kernel says. The kernel's replies only close a
request it was sent (matched by the request's ``msg_id``); its status is one of a fixed set,
its error name clipped, and frames over a size are not parsed at all.

Records (besides ``time``, ``event``, ``kernel_id``, and who: ``uid``, ``user``, ``client``;
``channel: control`` for a request sent on the control channel, which ipykernel also obeys):

- ``execute_request``: ``msg_id``, ``code`` (up to ``code_limit`` characters, then a marker),
  ``code_sha256`` and ``code_chars`` of the whole code, ``silent``, ``username`` and
  ``session`` from the request's header, ``start``.
- ``execute_reply``: ``msg_id``, ``status`` (ok, error, aborted, or ``other``),
  ``execution_count``, ``ename`` for an error, ``start``, ``end``, ``seconds``.
- ``debug_request``: a debugger request (``evaluate`` runs code): ``command``, ``expression``.
- ``execute_end``: a request left without a reply when the kernel ended or restarted
  (``status``: ``no-reply``, ``reason``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from kernel_sandbox.audit.trail import AuditTrail, clip_text, now

__all__ = ["DEFAULT_CODE_LIMIT", "ExecutionAudit"]

DEFAULT_CODE_LIMIT = 64 * 1024  # characters of a request's code kept in its record
DELIMITER = b"<IDS|MSG>"
MAX_HEADER = 16 * 1024  # bytes of a header or parent header parsed
MAX_REPLY = 64 * 1024  # bytes of a reply's content parsed
MAX_PENDING = 10_000  # requests awaiting a reply (more: the oldest are closed unanswered)
STATUSES = frozenset({"ok", "error", "aborted"})


def _json(frame: Any, limit: int) -> dict[str, Any] | None:
    if len(frame) > limit:
        return None
    try:
        value = json.loads(bytes(frame))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


class ExecutionAudit:
    """Turns one kernel's shell traffic into audit records (see the module docstring).

    Args:
        trail: where records go.
        kernel_id: the kernel.
        context: fields every record of this kernel carries (who: uid, user, client label).
        code_limit: characters of code kept in a record (its hash covers all of it).
    """

    def __init__(
        self,
        trail: AuditTrail,
        kernel_id: str,
        context: dict[str, Any],
        code_limit: int = DEFAULT_CODE_LIMIT,
    ):
        self.trail, self.kernel_id = trail, kernel_id
        self.context, self.code_limit = dict(context), code_limit
        self.pending: dict[str, tuple[float, str]] = {}  # msg_id -> (monotonic, start time)
        self._lock = threading.Lock()

    def observe(self, direction: bytes, frames: Sequence[Any], channel: str = "shell") -> None:
        """One captured message of ``channel`` (shell or control: ipykernel runs execute
        requests from either), ``frames`` as on the wire, identities first."""
        try:
            at = next(i for i, f in enumerate(frames) if len(f) == 9 and bytes(f) == DELIMITER)
        except StopIteration:
            return
        if len(frames) < at + 6:
            return
        header = _json(frames[at + 2], MAX_HEADER)
        if header is None:
            return
        msg_type = header.get("msg_type")
        extra = {"channel": channel} if channel != "shell" else {}
        if direction == b"in" and msg_type == "execute_request":
            self._request(header, frames[at + 5], extra)
        elif direction == b"in" and msg_type == "debug_request":
            self._debug(header, frames[at + 5], extra)
        elif direction == b"out" and msg_type == "execute_reply":
            self._reply(frames[at + 3], frames[at + 5])

    def event(self, event: str, **fields: Any) -> None:
        """Record something about the kernel itself (an interrupt, its end)."""
        self.trail.record(event, self.kernel_id, **self.context, **fields)

    def end(self, reason: str) -> None:
        """The kernel ended or restarts: close every request still waiting for its reply."""
        with self._lock:
            pending, self.pending = self.pending, {}
        for msg_id, (_, start) in pending.items():
            self.trail.record(
                "execute_end",
                self.kernel_id,
                **self.context,
                msg_id=msg_id,
                status="no-reply",
                reason=reason,
                start=start,
                end=now(),
            )

    # -- the two directions -----------------------------------------------------------------

    def _debug(self, header: dict[str, Any], content_frame: Any, extra: dict[str, Any]) -> None:
        """A debugger request (its ``evaluate`` runs code too): the command and expression."""
        content = _json(content_frame, MAX_REPLY) or {}
        arguments = content.get("arguments")
        arguments = arguments if isinstance(arguments, dict) else {}
        self.trail.record(
            "debug_request",
            self.kernel_id,
            **self.context,
            **extra,
            msg_id=str(header.get("msg_id", ""))[:128],
            username=clip_text(str(header.get("username", "")), 128),
            command=clip_text(str(content.get("command", "")), 128),
            expression=clip_text(arguments.get("expression"), self.code_limit),
        )

    def _request(self, header: dict[str, Any], content_frame: Any, extra: dict[str, Any]) -> None:
        try:
            content = json.loads(bytes(content_frame))
        except (ValueError, UnicodeDecodeError):
            content = None
        if not isinstance(content, dict):
            content = {}
        code = content.get("code")
        code = code if isinstance(code, str) else ""
        msg_id = str(header.get("msg_id", ""))[:128]
        start = now()
        with self._lock:
            if len(self.pending) >= MAX_PENDING:
                self.pending.pop(next(iter(self.pending)))
            self.pending[msg_id] = (time.monotonic(), start)
        shown = code if len(code) <= self.code_limit else code[: self.code_limit]
        self.trail.record(
            "execute_request",
            self.kernel_id,
            **self.context,
            **extra,
            msg_id=msg_id,
            username=clip_text(str(header.get("username", "")), 128),
            session=clip_text(str(header.get("session", "")), 128),
            code=shown,
            code_chars=len(code),
            code_clipped=len(code) > len(shown),
            code_sha256=hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
            silent=bool(content.get("silent", False)),
            start=start,
        )

    def _reply(self, parent_frame: Any, content_frame: Any) -> None:
        parent = _json(parent_frame, MAX_HEADER)
        if parent is None:
            return
        msg_id = parent.get("msg_id")
        with self._lock:
            opened = self.pending.pop(msg_id, None) if isinstance(msg_id, str) else None
        if opened is None:  # not a request a client sent (or answered already)
            return
        content = _json(content_frame, MAX_REPLY) or {}
        status = content.get("status")
        fields: dict[str, Any] = {"status": status if status in STATUSES else "other"}
        count = content.get("execution_count")
        if isinstance(count, int) and not isinstance(count, bool):
            fields["execution_count"] = count
        if status == "error":
            fields["ename"] = clip_text(str(content.get("ename", "")), 128)
        began, start = opened
        self.trail.record(
            "execute_reply",
            self.kernel_id,
            **self.context,
            msg_id=msg_id,
            **fields,
            start=start,
            end=now(),
            seconds=round(time.monotonic() - began, 6),
        )

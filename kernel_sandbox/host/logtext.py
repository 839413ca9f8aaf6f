"""Kernel-chosen text on its way into a host log: clipped, escaped and rate-limited per kernel.

A kernel decides much of what the host logs about it: the paths and names in its requests, the
error messages those provoke (a 60 KB file name comes back in ``ENAMETOOLONG``), and how often.
Unbounded, that fills the owner's log (Jupyter Server's) and the audit and egress files with
whatever the kernel likes, and a newline in it forges a line that seems to come from the host.

- :func:`clip` makes one value safe to log: control characters (newlines too) escaped, at most
  ``limit`` characters, with a visible marker for the rest (``…(+59,812 chars)``).
- :class:`LineBudget` lets one kernel add at most ``lines`` lines per ``interval`` seconds to
  one log; the rest are counted and summarized in a single line later (:meth:`LineBudget.due`).
- :class:`KernelLog` is both for a :class:`logging.Logger` (the owner's log).
- :class:`LogLimits` carries the settings from the provisioner to the broker and the proxy.

Used by the broker (:mod:`kernel_sandbox.broker`) and the egress proxy
(:mod:`kernel_sandbox.egress`); the files themselves rotate in :mod:`.logfile`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.host.logfile import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES

__all__ = ["MAX_TEXT", "KernelLog", "LineBudget", "LogLimits", "clip", "clip_exception"]

MAX_TEXT = 512  # characters of one kernel-chosen value in a log line
DEFAULT_LINES = 20  # the owner's log: lines per kernel per interval
DEFAULT_RECORDS = 1000  # the audit and egress files: records per kernel per interval
DEFAULT_INTERVAL = 10.0

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True)
class LogLimits:
    """How much one kernel may make the host log (the provisioner's ``log_*`` traits): lines
    per interval in the owner's log, records per interval in the audit and egress files, and
    those files' rotation (bytes, rotated files kept)."""

    lines: int = DEFAULT_LINES
    records: int = DEFAULT_RECORDS
    interval: float = DEFAULT_INTERVAL
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS


def _escape(char: str) -> str:
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def clip(value: object, limit: int = MAX_TEXT) -> str:
    """``value`` as one log-safe line: controls escaped, at most ``limit`` characters of it
    kept and the rest replaced by ``…(+N chars)`` (N counts characters of ``value``)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = value if isinstance(value, str) else str(value)
    head = text[:limit]
    if _CONTROL.search(head):
        pieces, size, used = [], 0, 0
        for char in head:
            piece = _escape(char) if _CONTROL.match(char) else char
            if size + len(piece) > limit:
                break
            pieces.append(piece)
            size += len(piece)
            used += 1
        head = "".join(pieces)
    else:
        used = len(head)
    rest = len(text) - used
    return head if rest == 0 else f"{head}…(+{rest:,} chars)"


def clip_exception(exc: BaseException, limit: int = MAX_TEXT) -> str:
    """A traceback of ``exc`` whose message is clipped (the frames are the host's own code)."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    return f"Traceback (most recent call last):\n{stack}{type(exc).__name__}: {clip(exc, limit)}"


@dataclass
class _Window:
    start: float
    lines: int = 0
    suppressed: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Suppressed:
    """What :class:`LineBudget` held back from one kernel in one interval."""

    key: str
    count: int
    seconds: float
    kinds: dict[str, int]

    def message(self, what: str = "log lines") -> str:
        return (
            f"kernel {self.key}: {self.count:,} {what} suppressed in the last "
            f"{self.seconds:.0f} s (over its budget)"
        )


class LineBudget:
    """At most ``lines`` lines per ``interval`` seconds for each key (a kernel id).

    A fixed window starts with a key's first line; lines over the budget are counted (by an
    optional kind, e.g. the decision) and reported once, as a :class:`Suppressed`, when the
    window is over: by :meth:`admit` on the key's next line or by :meth:`due`, which the owner
    calls now and then (and with ``flush=True`` when a kernel goes). ``lines <= 0`` means no
    limit. Thread-safe.
    """

    def __init__(
        self,
        lines: int = DEFAULT_LINES,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.lines, self.interval, self.clock = lines, interval, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, kind: str = "") -> tuple[bool, Suppressed | None]:
        """Whether this line may be written, and a summary of an interval that just ended."""
        if self.lines <= 0:
            return True, None
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            ended = None
            if window is None or now - window.start >= self.interval:
                ended = self._summary(key, window, now)
                window = self._windows[key] = _Window(now)
            if window.lines < self.lines:
                window.lines += 1
                return True, ended
            window.suppressed += 1
            window.kinds[kind] = window.kinds.get(kind, 0) + 1
            return False, ended

    def due(self, flush: bool = False) -> list[Suppressed]:
        """Summaries of the windows that are over (all of them with ``flush``); forgets them."""
        now = self.clock()
        out = []
        with self._lock:
            for key, window in list(self._windows.items()):
                if flush or now - window.start >= self.interval:
                    del self._windows[key]
                    summary = self._summary(key, window, now)
                    if summary is not None:
                        out.append(summary)
        return out

    def forget(self, key: str) -> Suppressed | None:
        """Drop ``key``'s window (its kernel is gone) and return what it had held back."""
        with self._lock:
            return self._summary(key, self._windows.pop(key, None), self.clock())

    @staticmethod
    def _summary(key: str, window: _Window | None, now: float) -> Suppressed | None:
        if window is None or not window.suppressed:
            return None
        return Suppressed(key, window.suppressed, now - window.start, dict(window.kinds))


class KernelLog:
    """A :class:`logging.Logger` for lines about one kernel's requests: every argument is
    clipped, and each kernel's lines are held to a :class:`LineBudget` (summaries included).
    """

    def __init__(self, logger: logging.Logger, budget: LineBudget | None = None):
        self.logger = logger
        self.budget = budget or LineBudget()

    def log(
        self, level: int, kernel_id: str, msg: str, *args: Any, exc: BaseException | None = None
    ) -> None:
        """Log ``msg % args`` (and ``exc``'s traceback, clipped) unless over the budget."""
        allowed, ended = self.budget.admit(kernel_id)
        if ended is not None:
            self.logger.warning("%s", ended.message())
        if not allowed or not self.logger.isEnabledFor(level):
            return
        clipped = tuple(clip(a) if not isinstance(a, (int, float)) else a for a in args)
        if exc is not None:
            msg, clipped = msg + "\n%s", (*clipped, clip_exception(exc))
        self.logger.log(level, msg, *clipped)

    def warning(self, kernel_id: str, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, kernel_id, msg, *args)

    def error(self, kernel_id: str, msg: str, *args: Any, exc: BaseException | None = None) -> None:
        self.log(logging.ERROR, kernel_id, msg, *args, exc=exc)

    def flush(self, force: bool = False) -> None:
        """Write the summaries of intervals that are over (all, with ``force``)."""
        for ended in self.budget.due(force):
            self.logger.warning("%s", ended.message())

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone: write what was held back from it, then forget it."""
        ended = self.budget.forget(kernel_id)
        if ended is not None:
            self.logger.warning("%s", ended.message())


class _BudgetFilter(logging.Filter):
    """Clips a record's text (its traceback too) and holds it to one kernel's budget."""

    def __init__(self, key: str, budget: LineBudget):
        super().__init__()
        self.key, self.budget = key, budget

    def filter(self, record: logging.LogRecord) -> bool:
        allowed, ended = self.budget.admit(self.key)
        text = clip(record.getMessage(), 4 * MAX_TEXT)
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + clip_exception(record.exc_info[1])
        if ended is not None:
            text = f"{ended.message()}\n{text}" if allowed else ended.message()
            allowed = True
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        return allowed


def budgeted_handler(key: str, lines: int, interval: float) -> logging.Handler:
    """A stderr handler for a process that serves one kernel (the egress proxy): every record
    clipped, at most ``lines`` per ``interval`` seconds, the rest summarized."""
    handler = logging.StreamHandler()
    handler.addFilter(_BudgetFilter(key, LineBudget(lines, interval)))
    return handler

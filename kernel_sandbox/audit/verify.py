"""Check a chained file (and its rotated predecessors) from its anchor to its head.

Walks ``FILE.N`` ... ``FILE.1``, ``FILE`` (:func:`~kernel_sandbox.audit.chain.chain_files`) and
checks, record by record: the line is a chained JSON object, its hash is the SHA-256 of what it
covers, its ``seq`` follows the previous one and its ``prev`` is the previous ``hash``. The
first record must continue the anchor (retention deleted what came before) or the genesis; the
last must be the head. The first failure is the answer: a :class:`Break` naming the file, the
line number, the record's ``seq`` where known, and what is wrong.

Lines from before chaining began (no ``hash``: written by an older version) are allowed only
at the very start of the oldest file, and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kernel_sandbox.audit.chain import (
    GENESIS,
    Link,
    chain_files,
    head_path,
    read_anchor,
    read_head,
    split_hash,
)

__all__ = ["Break", "ChainReport", "verify_chain"]


@dataclass(frozen=True)
class Break:
    """Where a chain is broken, and how."""

    file: str
    line: int
    seq: int | None
    reason: str

    def __str__(self) -> str:
        record = f" (record seq {self.seq})" if self.seq is not None else ""
        return f"{self.file} line {self.line}{record}: {self.reason}"


@dataclass
class ChainReport:
    """What :func:`verify_chain` found for one chain."""

    path: str
    files: list[str] = field(default_factory=list)
    records: int = 0
    unchained: int = 0  # lines from before chaining began
    first: Link | None = None
    last: Link | None = None
    broken: Break | None = None

    @property
    def intact(self) -> bool:
        return self.broken is None


def verify_chain(path: str | os.PathLike[str]) -> ChainReport:
    """Verify one chain (see the module docstring). A missing chain is intact and empty."""
    report = ChainReport(str(path))
    files = chain_files(path)
    report.files = [str(f) for f in files]
    anchor = read_anchor(path)
    expected = anchor or Link(0, GENESIS)
    started = False
    for index, file in enumerate(files):
        try:
            data = file.read_bytes()
        except OSError as exc:
            report.broken = Break(str(file), 0, None, f"cannot be read: {exc}")
            return report
        if data and not data.endswith(b"\n"):
            last = data.count(b"\n") + 1
            report.broken = Break(str(file), last, None, "the last line is cut off (truncated)")
            return report
        for number, line in enumerate(data.splitlines(), start=1):
            problem, link = _check(line, expected)
            if problem == "unchained" and not started and index == 0:
                report.unchained += 1
                continue
            if problem is not None:
                seq = link.seq if link is not None else None
                report.broken = Break(str(file), number, seq, problem)
                return report
            assert link is not None
            started = True
            report.first = report.first or link
            report.last = expected = link
            report.records += 1
    _check_head(path, report, files)
    return report


def _check(line: bytes, expected: Link) -> tuple[str | None, Link | None]:
    """(what is wrong or None, the record's link) for one line after ``expected``."""
    split = split_hash(line)
    if split is None:
        try:
            json.loads(line)
        except ValueError:
            return "not a JSON record (edited or corrupted)", None
        return "unchained", None
    body, stated = split
    try:
        record = json.loads(body)
        seq, prev = int(record["seq"]), str(record["prev"])
    except (ValueError, KeyError, TypeError):
        return "not a chained JSON record (edited or corrupted)", None
    link = Link(seq, stated)
    if hashlib.sha256(body).hexdigest() != stated:
        return "its hash does not match its content (edited)", link
    if seq != expected.seq + 1 or prev != expected.hash:
        if seq <= expected.seq:
            why = f"out of order: follows seq {expected.seq} (reordered or duplicated)"
        elif seq > expected.seq + 1:
            missing = seq - expected.seq - 1
            why = f"{missing} record(s) missing before it (seq {expected.seq + 1}..{seq - 1})"
            if expected.seq == 0 and expected.hash == GENESIS:
                why += "; no anchor says they were retired"
        else:
            why = "its prev is not the previous record's hash (inserted or replaced)"
        return why, link
    return None, link


def _check_head(path: str | os.PathLike[str], report: ChainReport, files: list[Path]) -> None:
    """The last record must be the head (else records were cut off the end)."""
    head = read_head(path)
    if head is None:
        if report.records:
            newest = files[-1] if files else Path(path)
            report.broken = Break(str(newest), 0, None, "the head file is missing")
        return
    try:
        seq, digest = int(head["seq"]), str(head["hash"])
    except (KeyError, TypeError, ValueError):
        report.broken = Break(str(head_path(path)), 1, None, "the head file is not a head record")
        return
    last = report.last or read_anchor(path) or Link(0, GENESIS)
    if (seq, digest) != (last.seq, last.hash):
        where = str(files[-1]) if files else str(path)
        lines = _line_count(files[-1]) if files else 0
        if seq > last.seq:
            reason = f"records seq {last.seq + 1}..{seq} are missing from the end (truncated)"
        else:
            reason = f"the head names seq {seq}, but the chain ends at seq {last.seq}"
        report.broken = Break(where, lines + 1, last.seq + 1 if seq > last.seq else None, reason)


def _line_count(file: Path) -> int:
    try:
        return file.read_bytes().count(b"\n")
    except OSError:
        return 0

"""Kernel-chosen text in host logs: clipping, escaping, per-kernel budgets and log rotation
(kernel_sandbox.host.logtext and kernel_sandbox.host.logfile), without an engine."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from kernel_sandbox.broker.audit import AuditLog
from kernel_sandbox.host.logfile import RotatingAppender
from kernel_sandbox.host.logtext import KernelLog, LineBudget, clip, clip_exception


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_clip_keeps_short_text() -> None:
    assert clip("sales/2024.csv") == "sales/2024.csv"
    assert clip(42) == "42"


def test_clip_marks_what_it_cuts() -> None:
    text = "A" * 60_000
    out = clip(text, 100)
    assert out == "A" * 100 + "…(+59,900 chars)"


@pytest.mark.parametrize("control", ["\n", "\r", "\x1b", "\x00", "\x85", "\u2028", "\x7f"])
def test_clip_escapes_every_line_break_and_control(control: str) -> None:
    out = clip(f"a{control}FORGED line")
    assert control not in out and len(out.splitlines()) == 1
    assert out.startswith("a\\") and out.endswith("FORGED line")


def test_clip_counts_escapes_in_the_limit() -> None:
    out = clip("\n" * 100, 10)
    assert out == "\\n" * 5 + "…(+95 chars)"
    assert clip(b"bytes\xff\n") == "bytes\\xff\\n"


def test_clip_exception_clips_the_message_only() -> None:
    try:
        raise OSError(36, "File name too long", "A" * 60_000 + "\nFORGED")
    except OSError as exc:
        text = clip_exception(exc)
    assert text.startswith("Traceback (most recent call last):\n")
    assert "test_clip_exception_clips_the_message_only" in text
    assert len(text) < 2000 and "\nFORGED" not in text


def test_budget_admits_then_counts_then_summarizes() -> None:
    clock = Clock()
    budget = LineBudget(3, 10.0, clock)
    verdicts = [budget.admit("k1", "deny")[0] for _ in range(10)]
    assert verdicts == [True] * 3 + [False] * 7
    assert budget.admit("k2")[0] is True  # another kernel has its own budget
    assert budget.due() == []  # the window is not over yet
    clock.now = 10.0
    allowed, ended = budget.admit("k1", "allow")
    assert allowed and ended is not None and ended.count == 7 and ended.kinds == {"deny": 7}
    assert "7 log lines suppressed in the last 10 s" in ended.message()
    for _ in range(5):
        budget.admit("k1")
    clock.now = 25.0
    (summary,) = budget.due()
    assert summary.key == "k1" and summary.count == 3  # 1 + 5 lines, 3 admitted


def test_budget_zero_means_no_limit() -> None:
    budget = LineBudget(0, 10.0)
    assert all(budget.admit("k")[0] for _ in range(10_000))


def test_kernel_log_clips_and_limits(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = KernelLog(logging.getLogger("kernel_sandbox.test"), LineBudget(2, 10.0, clock))
    with caplog.at_level(logging.WARNING, "kernel_sandbox.test"):
        for _ in range(100):
            log.warning("k1", "kernel %s: %s", "k1", "A" * 60_000 + "\nFORGED")
        clock.now = 11.0
        log.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert all(len(m) < 1000 and "\n" not in m for m in messages[:2])
    assert messages[2] == "kernel k1: 98 log lines suppressed in the last 11 s (over its budget)"


def test_audit_log_summarizes_what_it_held_back(tmp_path: Path) -> None:
    clock = Clock()
    audit = AuditLog(tmp_path / "audit.jsonl", budget=LineBudget(5, 10.0, clock))
    for i in range(50):
        audit.record(kernel_id="k1", op="stat", decision="deny" if i % 2 else "allow", path="x")
    audit.forget("k1")
    entries = audit.entries()
    assert len(entries) == 6
    assert entries[-1]["decision"] == "suppressed"
    assert entries[-1]["suppressed"] == 45
    assert entries[-1]["decisions"] == {"allow": 22, "deny": 23}


def test_rotation_keeps_the_newest_files(tmp_path: Path) -> None:
    log = tmp_path / "state" / "egress.jsonl"
    appender = RotatingAppender(log, max_bytes=1000, backups=2)
    for i in range(100):
        appender.write(f"{i:099d}\n".encode())
    appender.close()
    names = sorted(p.name for p in log.parent.iterdir())
    assert names == ["egress.jsonl", "egress.jsonl.1", "egress.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in log.parent.iterdir())
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert log.read_text().splitlines()[-1] == f"{99:099d}"


def _writer(path: str, name: str, count: int) -> None:
    appender = RotatingAppender(path, max_bytes=20_000, backups=1000)
    for i in range(count):
        appender.write((json.dumps({"w": name, "i": i, "pad": "x" * 60}) + "\n").encode())
    appender.close()


def test_rotation_with_several_writer_processes_loses_nothing(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(log), f"w{n}", 2000)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    seen = []
    for path in tmp_path.iterdir():
        seen += [json.loads(line) for line in path.read_text().splitlines()]  # none torn
    keys = [(e["w"], e["i"]) for e in seen]
    assert len(keys) == len(set(keys)) == 4 * 2000  # none lost, none twice
    assert len(list(tmp_path.iterdir())) > 10  # it did rotate, many times

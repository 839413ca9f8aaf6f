"""The hash chain itself: tampering of every kind is found, rotation and retention keep it whole.

Unit tier (no engine): real files, real writer processes; ``kernel-sandbox audit verify`` run
through the CLI's ``main`` for its exit codes (0 intact, 1 tampered, 2 usage error).
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from kernel_sandbox.audit.chain import ChainedAppender, anchor_path, chain_files, head_path
from kernel_sandbox.audit.executions import ExecutionAudit
from kernel_sandbox.audit.show import parse_since, rows
from kernel_sandbox.audit.trail import AuditTrail
from kernel_sandbox.audit.verify import verify_chain
from kernel_sandbox.cli.app import main


def write(path: Path, count: int, max_bytes: int = 0, backups: int = 5) -> None:
    appender = ChainedAppender(path, max_bytes, backups)
    for i in range(count):
        appender.append({"event": "test", "i": i, "pad": "x" * 40})
    appender.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", "verify", "--log", str(path)])
    return code, capsys.readouterr().out


def test_an_untouched_chain_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 20)
    report = verify_chain(log)
    assert report.intact and report.records == 20 and report.last and report.last.seq == 20
    code, out = verify(log, capsys)
    assert code == 0 and "intact" in out and "20 records" in out
    first = json.loads(lines(log)[0])
    assert first["prev"] == "0" * 64 and first["seq"] == 1


@pytest.mark.parametrize(
    ("tamper", "line", "words"),
    [
        ("edit", 7, "hash does not match"),
        ("delete", 7, "missing before it"),
        ("reorder", 7, "missing before it"),
        ("truncate", 18, "missing from the end"),
        ("cut", 20, "cut off"),
        ("insert", 7, "out of order"),
    ],
)
def test_tampering_is_found_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str, line: int, words: str
) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 20)
    records = lines(log)
    if tamper == "edit":
        records[6] = records[6].replace(b'"i":6', b'"i":9')
    elif tamper == "delete":
        del records[6]
    elif tamper == "reorder":
        records[6], records[7] = records[7], records[6]
    elif tamper == "truncate":
        records = records[:17]
    elif tamper == "cut":
        records[-1] = records[-1][:30]
    elif tamper == "insert":
        records.insert(6, records[2])
    log.write_bytes(b"".join(records))
    report = verify_chain(log)
    assert report.broken is not None and words in report.broken.reason
    assert report.broken.line == line
    code, out = verify(log, capsys)
    assert code == 1
    assert "TAMPERED" in out and f"line {line}" in out


def test_an_edit_that_recomputes_the_hash_still_breaks_the_link(tmp_path: Path) -> None:
    """Rewriting one record with a fresh hash breaks the next record's prev."""
    import hashlib

    from kernel_sandbox.audit.chain import split_hash

    log = tmp_path / "audit.jsonl"
    write(log, 5)
    records = lines(log)
    split = split_hash(records[1])
    assert split is not None
    body = split[0].replace(b'"i":1', b'"i":7')
    records[1] = body[:-1] + b',"hash":"%s"}\n' % hashlib.sha256(body).hexdigest().encode()
    log.write_bytes(b"".join(records))
    broken = verify_chain(log).broken
    assert broken is not None and broken.line == 3 and "prev" in broken.reason


def test_rotation_links_files_and_retention_leaves_an_anchor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 200, max_bytes=2000, backups=3)
    files = chain_files(log)
    assert [f.name for f in files] == ["audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1", log.name]
    first_kept = json.loads(lines(files[0])[0])
    anchor = json.loads(anchor_path(log).read_text())
    assert first_kept["prev"] == anchor["hash"] and first_kept["seq"] == anchor["seq"] + 1
    for older, newer in zip(files, files[1:], strict=False):  # each continues the last
        assert json.loads(lines(newer)[0])["prev"] == json.loads(lines(older)[-1])["hash"]
    code, out = verify(log, capsys)
    assert code == 0 and "in 4 file(s)" in out
    # retention's anchor makes the oldest kept file's start checkable: deleting it is found
    files[0].unlink()
    assert not verify_chain(log).intact


def test_no_backups_keeps_only_the_current_file_and_still_verifies(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 100, max_bytes=1000, backups=0)
    assert chain_files(log) == [log]
    report = verify_chain(log)
    assert report.intact and report.last is not None and report.last.seq == 100


def test_a_deleted_rotated_file_without_an_anchor_is_found(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 60, max_bytes=2000, backups=5)
    files = chain_files(log)
    assert len(files) >= 3
    files[1].unlink()  # a middle file
    broken = verify_chain(log).broken
    assert broken is not None and "missing" in broken.reason


def _writer(path: str, name: str, count: int) -> None:
    appender = ChainedAppender(path, max_bytes=20_000, backups=1000)
    for i in range(count):
        appender.append({"w": name, "i": i, "pad": "x" * 60})
    appender.close()


def test_several_writer_processes_make_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(log), f"w{n}", 500)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    report = verify_chain(log)
    assert report.intact, report.broken
    assert report.records == 2000 and len(report.files) > 3
    seen = {(r["w"], r["i"]) for r in rows([log]) if "w" in r}
    assert len(seen) == 2000


def test_a_writer_that_died_before_the_head_is_recovered(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 3)
    saved = head_path(log).read_bytes()
    write(log, 1)  # the head moves on ...
    head_path(log).write_bytes(saved)  # ... as if the writer died before updating it
    write(log, 2)
    assert verify_chain(log).intact


def test_unchained_lines_of_an_older_version_are_allowed_only_first(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_text('{"time": "t", "op": "read"}\n{"time": "t", "op": "list"}\n')
    write(log, 3)
    report = verify_chain(log)
    assert report.intact and report.unchained == 2 and report.records == 3
    with log.open("a") as handle:
        handle.write('{"time": "t", "op": "forged"}\n')
    assert not verify_chain(log).intact


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", "--log", str(tmp_path / "none.jsonl")]) == 2
    assert main(["audit", "show", "--log-dir", str(tmp_path / "nope")]) == 2
    assert main(["audit", "show", "--since", "yesterday-ish"]) == 2
    assert main(["audit", "bogus"]) == 2


def test_executions_pair_up_and_kernel_replies_cannot_forge(tmp_path: Path) -> None:
    """Only a client's request makes a record; a reply to no request makes none."""
    log = tmp_path / "audit.jsonl"
    audit = ExecutionAudit(AuditTrail(ChainedAppender(log)), "k1", {"uid": 1, "client": "test"})

    def message(msg_type: str, content: dict, parent: dict | None = None, msg_id: str = "m1"):
        header = {"msg_id": msg_id, "msg_type": msg_type, "username": "ann", "session": "s"}
        return [
            b"client-id",
            b"<IDS|MSG>",
            b"sig",
            json.dumps(header).encode(),
            json.dumps(parent or {}).encode(),
            b"{}",
            json.dumps(content).encode(),
        ]

    audit.observe(b"out", message("execute_request", {"code": "forged()"}, msg_id="x"))
    audit.observe(b"out", message("execute_reply", {"status": "ok"}, {"msg_id": "nope"}))
    audit.observe(b"in", message("execute_request", {"code": "print(1)\nx = 2"}))
    audit.observe(b"out", message("execute_reply", {"status": "bogus"}, {"msg_id": "m1"}, "r"))
    audit.observe(b"in", message("execute_request", {"code": "while True: pass"}, msg_id="m2"))
    debug = {"command": "evaluate", "arguments": {"expression": "secret()"}}
    audit.observe(b"in", message("debug_request", debug, msg_id="d1"), "control")
    audit.end("kernel shut down")
    found = rows([log])
    assert [(r["event"], r.get("status")) for r in found if r["event"] == "execute"] == [
        ("execute", "other"),
        ("execute", "no-reply"),
    ]
    assert found[0]["code"] == "print(1)\nx = 2" and found[0]["username"] == "ann"
    [debugged] = [r for r in rows([log]) if r["event"] == "debug_request"]
    assert (debugged["command"], debugged["expression"]) == ("evaluate", "secret()")
    assert debugged["channel"] == "control"
    assert verify_chain(log).intact


def test_since_takes_times_and_ages() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 12, 3, 16, 0, tzinfo=timezone.utc)
    assert parse_since("30m", now) == datetime(2026, 12, 3, 15, 30, tzinfo=timezone.utc)
    assert parse_since("2026-12-03T15:00", now).hour == 15
    with pytest.raises(ValueError):
        parse_since("soon", now)

"""The test cluster's leases (support.kube): the last test session out stops a cluster that a
fixture started, never one another session still uses. Unit tier: files and pids only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import kube


@pytest.fixture
def leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> kube._Leases:
    monkeypatch.setattr(kube, "STATE", tmp_path)
    return kube._Leases()


def test_alone_is_last(leases: kube._Leases) -> None:
    leases.take()
    assert leases.mine.exists()
    stopped: list[bool] = []
    assert leases.release(lambda: stopped.append(True))
    assert stopped == [True]
    assert not leases.mine.exists()


def test_not_last_while_another_live_session_holds_a_lease(leases: kube._Leases) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (leases.dir).mkdir(parents=True, exist_ok=True)
        (leases.dir / str(other.pid)).write_text("")
        leases.take()
        assert not leases.release(lambda: pytest.fail("stopped under a live session"))
    finally:
        other.kill()
        other.wait()


def test_a_dead_sessions_lease_is_dropped(leases: kube._Leases) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leases.dir.mkdir(parents=True, exist_ok=True)
    (leases.dir / str(dead.pid)).write_text("")
    leases.take()
    assert leases.release(lambda: None)
    assert sorted(p.name for p in leases.dir.iterdir()) == [".lock"]
    assert os.getpid() != dead.pid

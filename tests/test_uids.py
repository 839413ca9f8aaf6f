"""Per-sandbox uids (kernel_sandbox.host.uids): ranges, host id clashes, claims, reclaim,
and many processes claiming at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_sandbox.errors import KernelStartError, PolicyError, UidsExhausted
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.host.uids import (
    DEFAULT_RANGE,
    HostIds,
    UidPool,
    UidRange,
    check_range,
    host_ids,
)


def dead_owner() -> Owner:
    """A process that has exited (its pid no longer has that start time)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = Owner.current().start  # any start time: the pid below will not match it
    child.wait()
    return Owner(Owner.current().host, child.pid, start)


def pool(tmp_path: Path, text: str = "5000-5003", **kwargs) -> UidPool:
    return UidPool(UidRange.parse(text), tmp_path / "claims", rng=random.Random(1), **kwargs)


# -- ranges and the host's ids --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, first, last", [(DEFAULT_RANGE, 2000000, 2065535), (" 7 - 7 ", 7, 7)]
)
def test_range_parses(text, first, last):
    parsed = UidRange.parse(text)
    assert (parsed.first, parsed.last) == (first, last)
    assert len(parsed) == last - first + 1 and first in parsed and last + 1 not in parsed


@pytest.mark.parametrize("text", ["", "2000000", "10-5", "0-10", "a-b", "1-4294967295"])
def test_bad_range_is_refused_with_the_expected_form(text):
    with pytest.raises(PolicyError, match="uid_range: expected"):
        UidRange.parse(text)


def test_host_ids_read_accounts_groups_and_subordinate_ranges(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nana:x:1000:1000::/h:/bin/sh\n")
    (tmp_path / "group").write_text("root:x:0:\nstaff:x:50:\n")
    (tmp_path / "subuid").write_text("ana:100000:65536\n# comment\n")
    (tmp_path / "subgid").write_text("ana:300000:10\n")
    found = host_ids(*(str(tmp_path / n) for n in ("passwd", "group", "subuid", "subgid")), False)
    assert {(i.what, i.first, i.last) for i in found} == {
        ("account root (uid 0)", 0, 0),
        ("account ana (uid 1000)", 1000, 1000),
        ("group root (gid 0)", 0, 0),
        ("group staff (gid 50)", 50, 50),
        ("subordinate uids of ana (100000-165535)", 100000, 165535),
        ("subordinate gids of ana (300000-300009)", 300000, 300009),
    }


def test_a_range_over_an_account_or_subordinate_range_is_refused():
    used = [HostIds("account ana (uid 1000)", 1000, 1000), HostIds("subordinate uids", 10, 20)]
    check_range(UidRange(1001, 5000), used)
    with pytest.raises(PolicyError, match=r"overlaps ids this host uses: account ana \(uid 1000\)"):
        check_range(UidRange(900, 1000), used)
    with pytest.raises(PolicyError, match="subordinate uids; .*default 2000000-2065535"):
        check_range(UidRange(20, 30), used)


def test_the_default_range_clashes_with_nothing_on_this_host():
    check_range(UidRange.parse(DEFAULT_RANGE))  # the real /etc/passwd, /etc/group, NSS


def test_this_hosts_accounts_are_found():
    pwd = pytest.importorskip("pwd")
    try:
        nobody = pwd.getpwuid(65534).pw_name
    except KeyError:
        pytest.skip("no uid 65534 on this host")
    with pytest.raises(PolicyError, match=rf"account {nobody} \(uid 65534\)"):
        check_range(UidRange.parse("65000-66000"))


# -- claims -----------------------------------------------------------------------------------


def test_claims_are_distinct_files_with_the_owner_and_released_once(tmp_path):
    uids = pool(tmp_path)
    claims = [uids.claim(f"k{i}") for i in range(4)]
    assert sorted(c.uid for c in claims) == [5000, 5001, 5002, 5003]
    record = json.loads((tmp_path / "claims" / str(claims[0].uid)).read_text())
    me = Owner.current()
    assert record == {"host": me.host, "pid": me.pid, "start": me.start, "kernel": "k0"}
    assert (tmp_path / "claims").stat().st_mode & 0o777 == 0o700
    claims[0].release()
    claims[0].release()  # idempotent
    assert uids.claimed() == {c.uid for c in claims[1:]}
    assert uids.claim("k4").uid == claims[0].uid


def test_exhaustion_is_a_clear_start_error(tmp_path):
    uids = pool(tmp_path, "5000-5001")
    uids.claim("a"), uids.claim("b")
    with pytest.raises(UidsExhausted, match=r"kernel c: all 2 uids of uid_range 5000-5001") as info:
        uids.claim("c")
    assert isinstance(info.value, KernelStartError) and "widen" in str(info.value)


def test_a_dead_owners_claim_is_taken_over_only_when_none_is_free(tmp_path):
    dead = dead_owner()
    gone = pool(tmp_path, "5000-5001", owner=lambda: dead)
    stale = gone.claim("old")
    uids = pool(tmp_path, "5000-5001")
    fresh = uids.claim("new")
    assert fresh.uid != stale.uid  # a free uid first
    taken = uids.claim("newer")
    assert taken.uid == stale.uid
    assert json.loads((tmp_path / "claims" / str(taken.uid)).read_text())["kernel"] == "newer"
    stale.release()  # the old claim's release leaves the new claim alone
    assert uids.claimed() == {5000, 5001}


def test_a_live_owners_claim_is_never_taken(tmp_path):
    uids = pool(tmp_path, "5000-5000")
    uids.claim("a")
    with pytest.raises(UidsExhausted):
        pool(tmp_path, "5000-5000").claim("b")


def test_an_unwritten_claim_is_stale_only_after_a_grace(tmp_path):
    uids = pool(tmp_path, "5000-5000")
    (tmp_path / "claims").mkdir(mode=0o700)
    (tmp_path / "claims" / "5000").write_text("")  # its writer died between create and write
    with pytest.raises(UidsExhausted):
        uids.claim("a")
    os.utime(tmp_path / "claims" / "5000", (0, 0))
    assert uids.claim("a").uid == 5000


def test_claims_outside_the_range_and_odd_names_are_ignored(tmp_path):
    (tmp_path / "claims").mkdir(mode=0o700)
    (tmp_path / "claims" / "4999").write_text("{}")
    (tmp_path / "claims" / "notes").write_text("")
    assert pool(tmp_path, "5000-5000").claim("a").uid == 5000


def test_adoption_takes_over_the_kernels_own_claim_but_not_anothers(tmp_path):
    dead = dead_owner()
    first = pool(tmp_path, owner=lambda: dead).claim("kernel-a")
    uids = pool(tmp_path)
    adopted = uids.adopt(first.uid, "kernel-a")
    assert adopted is not None and adopted.record["pid"] == os.getpid()
    other = uids.claim("kernel-b")
    assert uids.adopt(other.uid, "kernel-c") is None  # live owner, another kernel
    assert uids.adopt(1, "kernel-a") is None  # not in the range
    assert uids.adopt(5003 if other.uid != 5003 else 5002, "kernel-d") is not None  # free


@pytest.mark.parametrize("problem", ["symlink", "group-writable", "file"])
def test_an_unsafe_claims_directory_is_refused(tmp_path, problem):
    target = tmp_path / "claims"
    if problem == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "elsewhere")
    elif problem == "group-writable":
        target.mkdir()
        target.chmod(0o770)
    else:
        target.write_text("")
    with pytest.raises(PolicyError, match="uid claims: .*uid_claims"):
        pool(tmp_path).claim("a")


def _claim_in_child(directory: str, first: int, last: int, kernel: str, queue, go, done) -> None:
    """Claim a uid in a separate process when all are ready, and live on (holding it) until
    ``done``."""
    uids = UidPool(UidRange(first, last), directory, rng=random.Random(0))  # same first try
    go.wait(60)
    try:
        queue.put(uids.claim(kernel).uid)
    except UidsExhausted:
        queue.put(None)
    done.wait(60)


def claim_concurrently(directory: Path, first: int, last: int, processes: int) -> list:
    """What ``processes`` processes that claim at the same moment get."""
    ctx = multiprocessing.get_context("fork")
    queue, go, done = ctx.Queue(), ctx.Barrier(processes), ctx.Event()
    children = [
        ctx.Process(
            target=_claim_in_child, args=(str(directory), first, last, f"k{i}", queue, go, done)
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    try:
        return [queue.get(timeout=60) for _ in children]
    finally:
        done.set()
        for child in children:
            child.join(timeout=60)


def test_concurrent_processes_never_share_a_uid(tmp_path):
    results = claim_concurrently(tmp_path / "c", 6000, 6039, 48)
    got = [uid for uid in results if uid is not None]
    assert len(got) == 40 and len(set(got)) == 40  # 40 uids, 8 refused, no uid twice
    assert results.count(None) == 8


def test_concurrent_takeover_of_stale_claims_gives_each_uid_once(tmp_path):
    dead = dead_owner()
    gone = UidPool(UidRange(7000, 7003), tmp_path / "c", owner=lambda: dead)
    for i in range(4):
        gone.claim(f"old{i}")  # the whole range is stale
    for _ in range(3):  # each round's children exit: their claims are stale for the next
        results = claim_concurrently(tmp_path / "c", 7000, 7003, 12)
        got = [uid for uid in results if uid is not None]
        assert sorted(got) == [7000, 7001, 7002, 7003], results

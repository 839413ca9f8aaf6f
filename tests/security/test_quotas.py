"""Per-user kernel limits: what one kernel exhausts must not fail in another kernel, nor for a
host account; and the open-files bound on the host's file table.

The Linux kernel counts inotify instances and POSIX message queue bytes per uid across the
whole host (no user namespace maps a container's uids). Kernel A exhausts one of them and
keeps it exhausted while kernel B (the shared probe kernel) and a host process running as a
host account try for one; then A lets go. Under runc each probe fails when sandboxes share a
uid with each other or with a host account (they did, as uid 1000, before uid_range).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_sandbox.inside.contract import KERNEL_UID

PIDS_LIMIT = 256  # the strict profile's
NOFILE_LIMIT = 1024  # the strict profile's
FILE_NR = Path("/proc/sys/fs/file-nr")
# run as another account: an interpreter it may execute (not one under /root)
HOST_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
    sys.executable,
)
# processes that hold files at once: under runsc the sandbox's own threads count against
# pids_limit too, and about 50 processes end the whole sandbox (res-fork-bomb)
HOLDERS = {"runc": 200, "runsc": 10}

FILL_INOTIFY = r"""
_held_inotify, _inotify_error = [], None
while len(_held_inotify) < 512:  # 4x the host's per-uid limit; leaves the kernel fds to talk
    _ct.set_errno(0)
    _fd = _libc.inotify_init1(0)
    if _fd < 0:
        _inotify_error = errname(_ct.get_errno())
        break
    _held_inotify.append(_fd)
report(count=len(_held_inotify), error=_inotify_error, uid=_os.getuid())
"""
ONE_INOTIFY = r"""
_ct.set_errno(0)
_fd = _libc.inotify_init1(0)
_result = 'ok' if _fd >= 0 else errname(_ct.get_errno())
if _fd >= 0:
    _os.close(_fd)
report(result=_result, uid=_os.getuid())
"""
RELEASE_INOTIFY = r"""
for _fd in _held_inotify:
    _os.close(_fd)
report(released=len(_held_inotify))
"""

MQ_SETUP = r"""
_mq = _libc if hasattr(_libc, 'mq_open') else _ct.CDLL('librt.so.1', use_errno=True)
_mq.mq_open.restype = _ct.c_int
_mq.mq_open.argtypes = [_ct.c_char_p, _ct.c_int, _ct.c_uint, _ct.c_void_p]

def mq_try(tag):
    '''Open one queue with the default size (10 x 8 KiB); 'ok' or the errno's name.'''
    name = f'/ks-probe-{tag}-{_os.getpid()}'.encode()
    _ct.set_errno(0)
    q = _mq.mq_open(name, _os.O_CREAT | _os.O_EXCL | _os.O_RDWR, 0o600, None)
    if q < 0:
        return errname(_ct.get_errno())
    _os.close(q)
    _mq.mq_unlink(name)
    return 'ok'
"""
FILL_MQUEUE = r"""
_held_mq, _mq_error = [], None
for _i in range(300):
    _name = f'/ks-probe-a-{_os.getpid()}-{_i}'.encode()
    _ct.set_errno(0)
    _q = _mq.mq_open(_name, _os.O_CREAT | _os.O_EXCL | _os.O_RDWR, 0o600, None)
    if _q < 0:
        _mq_error = errname(_ct.get_errno())
        break
    _held_mq.append((_q, _name))
report(count=len(_held_mq), error=_mq_error, uid=_os.getuid())
"""
RELEASE_MQUEUE = r"""
for _q, _name in _held_mq:
    _os.close(_q)
    _mq.mq_unlink(_name)
report(released=len(_held_mq))
"""

# the host side: one attempt as a given uid, printing the result
HOST_INOTIFY = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
print('ok' if fd >= 0 else errno.errorcode.get(ctypes.get_errno(), '?'))
"""
HOST_MQUEUE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.restype = ctypes.c_int
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
name = f'/ks-probe-host-{os.getpid()}'.encode()
q = libc.mq_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600, None)
if q < 0:
    print(errno.errorcode.get(ctypes.get_errno(), '?'))
else:
    os.close(q)
    libc.mq_unlink(name)
    print('ok')
"""


def account_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def host_accounts_at_risk(kernel_uid: int) -> list[int]:
    """Host accounts whose per-user limits the kernel's would be: its own uid if that is an
    account, and the image's user (the uid every sandbox had before uid_range)."""
    return [
        uid
        for uid in dict.fromkeys((kernel_uid, KERNEL_UID))
        if uid != 0 and account_name(uid) is not None
    ]


def as_host_account(uid: int, code: str) -> str:
    """Run ``code`` on the host as ``uid`` (with its primary group); what it printed."""
    if os.getuid() != 0:
        pytest.skip("running a host process as another account needs root")
    gid = pwd.getpwuid(uid).pw_gid
    done = subprocess.run(
        [HOST_PYTHON, "-I", "-c", code],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    return (done.stdout.strip() or done.stderr.strip()[-200:]) or "?"


def describe_uid(uid: int) -> str:
    name = account_name(uid)
    return f"uid {uid}, {'host account ' + name if name else 'no host account'}"


def test_inotify_exhausted_in_one_kernel_fails_nowhere_else(dedicated_kernel, sandbox, observe):
    with dedicated_kernel() as a:
        filled = a.probe(FILL_INOTIFY)
        try:
            b = sandbox.probe(ONE_INOTIFY)
            host = {
                uid: as_host_account(uid, HOST_INOTIFY)
                for uid in host_accounts_at_risk(filled["uid"])
            }
        finally:
            a.probe(RELEASE_INOTIFY)
    hosts = (
        "; ".join(f"host {describe_uid(u)}: {r}" for u, r in host.items())
        or "no host account shares it"
    )
    observe(
        "res-inotify-shared",
        f"A ({describe_uid(filled['uid'])}) held {filled['count']} instances, then "
        f"{filled['error'] or 'stopped (no limit met)'}; "
        f"B ({describe_uid(b['uid'])}): {b['result']}; {hosts}",
    )
    if a.runtime == "runc":  # A met the host's per-uid limit
        assert filled["error"] == "EMFILE" and filled["count"] <= 128, filled
    else:  # gVisor counts inotify in its own kernel, none of it the host's
        assert filled["error"] in (None, "EMFILE", "ENFILE", "ENOMEM"), filled
    assert b["result"] == "ok", b
    assert all(result == "ok" for result in host.values()), host
    if os.getuid() == 0:
        assert filled["uid"] != b["uid"] and account_name(filled["uid"]) is None


def test_message_queues_exhausted_in_one_kernel_fail_nowhere_else(
    dedicated_kernel, sandbox, observe
):
    with dedicated_kernel() as a:
        a.probe(MQ_SETUP + "report(ok=1)")
        sandbox.probe(MQ_SETUP + "report(ok=1)")
        filled = a.probe(FILL_MQUEUE)
        try:
            b = sandbox.probe("report(result=mq_try('b'), uid=_os.getuid())")
            host = {
                uid: as_host_account(uid, HOST_MQUEUE)
                for uid in host_accounts_at_risk(filled["uid"])
            }
        finally:
            a.probe(RELEASE_MQUEUE)
    hosts = (
        "; ".join(f"host {describe_uid(u)}: {r}" for u, r in host.items())
        or "no host account shares it"
    )
    observe(
        "res-mqueue-shared",
        f"A ({describe_uid(filled['uid'])}) opened {filled['count']} queues of 80 KiB, then "
        f"{filled['error'] or 'stopped (no limit met)'}; "
        f"B ({describe_uid(b['uid'])}): {b['result']}; {hosts}",
    )
    if a.runtime == "runc":  # A met its RLIMIT_MSGQUEUE (800 KiB: about ten 80 KiB queues)
        assert filled["error"] == "EMFILE" and filled["count"] <= 10, filled
    else:  # gVisor keeps queues in its own kernel; its limits are not the host's
        assert filled["error"] in (None, "ENOSYS", "EMFILE", "ENOMEM", "ENOSPC"), filled
    assert b["result"] == ("ENOSYS" if filled["error"] == "ENOSYS" else "ok"), b
    assert all(result == "ok" for result in host.values()), host
    if os.getuid() == 0:
        assert filled["uid"] != b["uid"] and account_name(filled["uid"]) is None


OPEN_FILES = r"""
import resource, signal, time
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_fds = []
while len(_fds) < 100000:
    try:
        _fds.append(_os.open('/dev/null', _os.O_RDONLY))
    except OSError as exc:
        _one_error = errname(exc.errno)
        break
else:
    _one_error = None
_one = len(_fds)
for _fd in _fds:
    _os.close(_fd)
del _fds

# @HOLDERS@ processes, each opening up to 2048 files (past 1024, short of the engine's
# default 20,000 so that a missing bound cannot empty the host's file table) and holding them
_r, _w = _os.pipe()
_children = []
for _ in range(@HOLDERS@):
    _pid = _os.fork()
    if _pid == 0:
        _n = 0
        try:
            while _n < 2048:
                _os.open('/dev/null', _os.O_RDONLY)
                _n += 1
        except OSError:
            pass
        _os.write(_w, _n.to_bytes(4, 'little'))
        time.sleep(120)
        _os._exit(0)
    _children.append(_pid)
_counts = [int.from_bytes(_os.read(_r, 4), 'little') for _ in _children]
report(soft=_soft, hard=_hard, one=_one, one_error=_one_error, children=len(_children),
       most=max(_counts), total=sum(_counts))
"""
END_CHILDREN = r"""
for _pid in _children:
    _os.kill(_pid, signal.SIGKILL)
for _pid in _children:
    _os.waitpid(_pid, 0)
report(ended=len(_children))
"""


def host_file_handles() -> int:
    return int(FILE_NR.read_text().split()[0])


def test_open_files_are_bounded(dedicated_kernel, observe):
    file_max = int(FILE_NR.read_text().split()[2])
    with dedicated_kernel() as kernel:
        before = host_file_handles()
        holders = HOLDERS[kernel.runtime]
        seen = kernel.probe(OPEN_FILES.replace("@HOLDERS@", str(holders)), timeout=120)
        during = host_file_handles()
        kernel.probe(END_CHILDREN)
    grew = during - before
    observe(
        "res-open-files",
        f"RLIMIT_NOFILE {seen['soft']}/{seen['hard']}; one process: {seen['one']} then "
        f"{seen['one_error']}; {seen['children']} processes held {seen['total']:,} (at most "
        f"{seen['most']} each); host file handles +{grew:,} (fs.file-max {file_max:,})",
    )
    assert seen["soft"] == seen["hard"] == NOFILE_LIMIT
    assert seen["one_error"] == "EMFILE" and seen["one"] <= NOFILE_LIMIT
    assert seen["most"] <= NOFILE_LIMIT
    assert PIDS_LIMIT * NOFILE_LIMIT < file_max // 5
    # other work shares this host: a loose margin over what the 200 processes may hold
    assert seen["children"] == holders
    assert grew <= holders * NOFILE_LIMIT + 20000

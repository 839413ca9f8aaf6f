"""Privilege probes: setuid, capabilities, chown, ptrace, namespaces and the kernel-facing
system calls that the default profile refuses (bpf, perf_event_open, keyctl, modules)."""

from __future__ import annotations

import os

from security.battery import REFUSED

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def test_setuid_binaries_gain_nothing(sandbox, observe):
    got = sandbox.probe("""
import stat, subprocess, time
found = []
for folder in ('/usr/bin', '/usr/sbin', '/usr/local/bin', '/usr/lib/openssh'):
    if _os.path.isdir(folder):
        for name in sorted(_os.listdir(folder)):
            path = _os.path.join(folder, name)
            st = _os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_ISUID and st.st_uid == 0:
                found.append(path)
# Popen returns once exec has succeeded: a honoured setuid bit would show in its Uid line now.
su = subprocess.Popen(['/usr/bin/su', 'root', '-c', 'id -u'], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
uid_line = status('Uid', su.pid)
out, err = su.communicate(b'not-the-password\\n', timeout=30)
mount = subprocess.run(['/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp'], capture_output=True,
                       text=True)
report(found=found, su_uid=uid_line.split(), su_code=su.returncode, su_out=out.decode().strip(),
       su_err=err.decode().strip().splitlines()[-1:], mount=mount.stderr.strip().splitlines()[:1],
       setuid0=attempt(_os.setuid, 0), setresuid0=attempt(_os.setresuid, 0, 0, 0),
       no_new_privs=_libc.prctl(39, 0, 0, 0, 0))
""")
    names = ", ".join(os.path.basename(p) for p in got["found"])
    su_said = got["su_err"][0] if got["su_err"] else f"exit {got['su_code']}"
    mount_said = got["mount"][0] if got["mount"] else "?"
    observe(
        "priv-setuid",
        f"{len(got['found'])} setuid-root files ({names}); su ran with Uid "
        f"{' '.join(got['su_uid'])} and failed ({su_said}); mount: {mount_said}; "
        f"setuid(0): {got['setuid0']}; no_new_privs={got['no_new_privs']}",
    )
    assert "/usr/bin/su" in got["found"]  # the bait is really there
    assert "0" not in got["su_uid"]  # real, effective, saved and fs uid all the sandbox user
    assert got["su_code"] != 0 and got["su_out"] != "0"
    assert got["setuid0"] == "EPERM" and got["setresuid0"] == "EPERM"
    assert got["no_new_privs"] == 1


def test_cap_net_raw(sandbox, observe):
    got = sandbox.probe(f"""
import socket
report(**{{name: status(name) for name in {CAP_SETS!r}}},
       raw=attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
""")
    sets = {name: got[name] for name in CAP_SETS if got.get(name) is not None}
    observe(
        "priv-cap-net-raw",
        f"{', '.join(f'{k} {v}' for k, v in sets.items())}; SOCK_RAW: {got['raw']}",
    )
    assert sets and all(int(v, 16) == 0 for v in sets.values())
    assert got["raw"] in REFUSED


def test_cap_sys_admin(sandbox, observe):
    got = sandbox.probe("""
import socket
report(sethostname=sys_call('sethostname', b'ks-pwned', 8),
       setdomainname=sys_call('setdomainname', b'ks-pwned', 8),
       hostname=socket.gethostname())
""")
    observe(
        "priv-cap-sys-admin",
        f"sethostname: {got['sethostname']}; setdomainname: "
        f"{got['setdomainname']}; hostname still {got['hostname']}",
    )
    assert got["sethostname"] == "EPERM" and got["setdomainname"] == "EPERM"
    assert got["hostname"] == "sandbox"


def test_chown_of_others_files(sandbox, observe):
    got = sandbox.probe("""
mine = '/tmp/ks-mine'
open(mine, 'w').close()
lifeline = '/run/kernel-sandbox-host/lifeline'
uid, gid = _os.getuid(), _os.getgid()
out = dict(tmp=attempt(_os.chown, '/tmp', uid, gid),
           own_to_root=attempt(_os.chown, mine, 0, 0),
           own_to_group_0=attempt(_os.chown, mine, -1, 0))
if _os.path.lexists(lifeline):
    out['lifeline'] = attempt(_os.lchown, lifeline, uid, gid)
    out['lifeline_owner'] = _os.lstat(lifeline).st_uid
_os.unlink(mine)
report(tmp_owner=_os.stat('/tmp').st_uid, **out)
""")
    tried = {k: v for k, v in got.items() if not k.endswith("_owner")}
    observe("priv-chown", "; ".join(f"{k}: {v}" for k, v in tried.items()))
    assert got["tmp_owner"] == 0
    assert {v for k, v in tried.items() if k != "lifeline"} == {"EPERM"}, tried
    if "lifeline" in got:  # a host-created (root-owned) socket in the read-only host part
        assert got["lifeline"] in ("EPERM", "EROFS")
        assert got["lifeline_owner"] == 0


PTRACE = r"""
import subprocess, time
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000

def attach(pid):
    result = sys_call('ptrace', PTRACE_ATTACH, pid, 0, 0)
    if result == 'ok':  # let it go again at once
        _os.waitpid(pid, WALL)
        sys_call('ptrace', PTRACE_DETACH, pid, 0, 0)
    return result
"""


def test_ptrace_reaches_nothing_beyond_the_sandbox(sandbox, observe):
    host_pid = os.getpid()  # this test's own process: a host process the kernel must not find
    got = sandbox.probe(
        PTRACE
        + f"""
child = subprocess.Popen(['sleep', '30'])
own_child = attach(child.pid)
child.kill(); child.wait()
procs = {{}}
for pid in sorted(int(p) for p in _os.listdir('/proc') if p.isdigit()):
    try:
        procs[pid] = dict(uid=status('Uid', pid).split(), cap=int(status('CapEff', pid), 16),
                          cmd=open(f'/proc/{{pid}}/cmdline').read().replace('\\0', ' ')[:60])
    except OSError:
        pass
report(own_child=own_child, procs=procs, host_visible={host_pid} in procs,
       host_ptrace=attach({host_pid}), host_kill=attempt(_os.kill, {host_pid}, 0))
"""
    )
    procs = {int(pid): proc for pid, proc in got["procs"].items()}  # JSON keys are text
    uids = {u for p in procs.values() for u in p["uid"]}
    observe(
        "priv-ptrace",
        f"own child: {got['own_child']}; a host pid (the test's own): ptrace "
        f"{got['host_ptrace']}, kill {got['host_kill']}; {len(procs)} visible processes, "
        f"all uid {sorted(uids)}, CapEff 0",
    )
    assert not got["host_visible"]
    if sandbox.runtime == "runc":
        assert got["own_child"] == "EPERM"  # the seccomp profile refuses ptrace altogether
    # kill shows the host pid does not exist inside; ptrace is refused before the lookup (runc)
    assert got["host_kill"] == "ESRCH"
    assert got["host_ptrace"] == ("EPERM" if sandbox.runtime == "runc" else "ESRCH")
    # Nothing visible is worth tracing: the sandbox's own few processes, one uid, no capabilities
    assert len(procs) <= 8, procs
    assert all(p["cap"] == 0 for p in procs.values()), procs
    assert len(uids) == 1 and "0" not in uids, procs
    assert procs[1]["cmd"].startswith(("/sbin/docker-init", "/dev/init", "docker-init"))


def test_ptrace_of_pid1(sandbox, observe):
    # PID 1 is Docker's init (tini) running as the sandbox's own uid, with no capabilities, and
    # the host has no Yama LSM: only the seccomp profile (runc) or gVisor keeps it untraced.
    got = sandbox.probe(
        PTRACE
        + """
report(pid1=attach(1), uid=status('Uid', 1).split(),
       cmd=open('/proc/1/cmdline').read().split('\\0')[0])
"""
    )
    observe(
        "priv-ptrace-pid1",
        f"PTRACE_ATTACH 1 ({got['cmd']}, uid {got['uid'][0]}): "
        + ("attached (then detached)" if got["pid1"] == "ok" else got["pid1"]),
    )
    assert got["pid1"] != "ok"
    if sandbox.runtime == "runc":
        assert got["pid1"] == "EPERM"  # refused by the seccomp profile, not by chance


UNSHARE = r"""
import socket
FLAGS = dict(user=0x10000000, mnt=0x20000, uts=0x4000000, ipc=0x8000000, net=0x40000000,
             pid=0x20000000, cgroup=0x2000000)
out = {name: sys_call('unshare', flag) for name, flag in FLAGS.items()}  # cumulative, in order
out['caps_after'] = status('CapEff')
out['sethostname'] = sys_call('sethostname', b'ks-pwned', 8)
out['mount_tmpfs'] = sys_call('mount', b'none', b'/tmp', b'tmpfs', 0, None)
out['remount_root_rw'] = sys_call('mount', None, b'/', None, 32, None)
out['write_root'] = attempt(lambda: open('/var/tmp/ks-unshare', 'w').close())
report(**out)
"""


def test_unshare_gains_no_power(sandbox, observe):
    # In a single-threaded child: unshare(CLONE_NEWUSER) is refused to threaded processes.
    got = sandbox.probe(f"""
import subprocess, sys, socket
child = subprocess.run([sys.executable, '-c', _PRELUDE + {UNSHARE!r}], capture_output=True,
                       text=True, timeout=60)
lines = [l for l in child.stdout.splitlines() if l.startswith('{{')]
result = _json.loads(lines[-1]) if lines else dict(error=child.stderr[-300:])
result['hostname_after'] = socket.gethostname()
result['root_write_after'] = attempt(lambda: open('/var/tmp/ks-unshare', 'w').close())
report(**result)
""")
    names = ("user", "mnt", "uts", "ipc", "net", "pid", "cgroup")
    assert "error" not in got, got
    granted = [n for n in names if got[n] == "ok"]
    observe(
        "priv-unshare",
        "; ".join(f"{n}: {got[n]}" for n in names)
        + (
            f"; inside the new namespaces: mount {got['mount_tmpfs']}, remount / rw "
            f"{got['remount_root_rw']}, write / {got['write_root']}, sethostname "
            f"{got['sethostname']} (container hostname still {got['hostname_after']})"
            if granted
            else ""
        ),
    )
    if sandbox.runtime == "runc":
        assert not granted, got
    # Whatever gVisor grants stays inside its own kernel: no mount, / stays read-only, the
    # container's hostname is untouched.
    assert got["mount_tmpfs"] != "ok" and got["remount_root_rw"] != "ok"
    assert got["write_root"] in ("EROFS", "EACCES")
    assert got["hostname_after"] == "sandbox" and got["root_write_after"] == "EROFS"


def test_bpf(sandbox, observe):
    got = sandbox.probe("""
import struct
attr = _ct.create_string_buffer(struct.pack('IIII', 1, 4, 4, 1), 72)  # a small hash map
report(map_create=sys_call('bpf', 0, attr, 72))
""")
    observe("priv-bpf", f"BPF_MAP_CREATE: {got['map_create']}")
    assert got["map_create"] in ("EPERM", "EACCES", "ENOSYS")


def test_perf_event_open(sandbox, observe):
    got = sandbox.probe("""
import struct
# PERF_TYPE_SOFTWARE / PERF_COUNT_SW_CPU_CLOCK on itself: allowed to anyone by the host's
# perf_event_paranoid <= 2 unless a filter refuses the call
attr = _ct.create_string_buffer(struct.pack('II', 1, 112), 112)
report(self_clock=sys_call('perf_event_open', attr, 0, -1, -1, 0),
       paranoid=open('/proc/sys/kernel/perf_event_paranoid').read().strip()
                if _os.path.exists('/proc/sys/kernel/perf_event_paranoid') else None)
""")
    observe("priv-perf", f"perf_event_open(self): {got['self_clock']}")
    assert got["self_clock"] in ("EPERM", "EACCES", "ENOSYS", "ENODEV", "ENOENT")


def test_keyctl(sandbox, observe):
    got = sandbox.probe("""
KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, KEY_SPEC_PROCESS_KEYRING = 0, -3, -2
report(get_keyring=sys_call('keyctl', KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1),
       add_key=sys_call('add_key', b'user', b'ks-probe', b'secret', 6, KEY_SPEC_PROCESS_KEYRING))
""")
    observe("priv-keyctl", f"keyctl: {got['get_keyring']}; add_key: {got['add_key']}")
    assert got["get_keyring"] != "ok" and got["add_key"] != "ok"


def test_kernel_modules(sandbox, observe):
    got = sandbox.probe("""
image = _ct.create_string_buffer(b'\\x7fELF' + bytes(60))
fd = _os.open('/usr/bin/true', _os.O_RDONLY)
report(init_module=sys_call('init_module', image, 64, b''),
       finit_module=sys_call('finit_module', fd, b'', 0),
       delete_module=sys_call('delete_module', b'ks_probe', 0o4000))
_os.close(fd)
""")
    observe("priv-modules", "; ".join(f"{k}: {v}" for k, v in got.items()))
    assert set(got.values()) == {"EPERM"}, got


def test_io_uring(sandbox, observe):
    """io_uring is a large host-kernel interface behind many escalations: refused under runc."""
    got = sandbox.probe("""
params = _ct.create_string_buffer(120)  # struct io_uring_params, zeroed: let the kernel choose
_ct.set_errno(0)
fd = _libc.syscall(_ct.c_long(SYS['io_uring_setup']), _ct.c_long(4), params)
setup = 'ok' if fd >= 0 else errname(_ct.get_errno())
if fd >= 0:
    _os.close(fd)
# On a ring that does not exist: EBADF if the call is let through, the filter's errno if not.
report(setup=setup, enter=sys_call('io_uring_enter', -1, 0, 0, 0, None, 0),
       register=sys_call('io_uring_register', -1, 0, None, 0))
""")
    observe(
        "priv-io-uring",
        f"io_uring_setup: {got['setup']}; io_uring_enter(-1): {got['enter']}; "
        f"io_uring_register(-1): {got['register']}"
        + (" (gVisor's own io_uring, in the Sentry)" if sandbox.runtime == "runsc" else ""),
    )
    if sandbox.runtime == "runc":
        assert got == {"setup": "EPERM", "enter": "EPERM", "register": "EPERM"}, got
    else:
        # gVisor serves io_uring itself (NOP and READV only); Docker's profile does not apply
        # inside it and the host kernel's io_uring is not reached (docs/threat-model.md).
        assert got["enter"] in ("EBADF", "EPERM", "ENOSYS"), got
        assert got["register"] in ("EBADF", "EPERM", "ENOSYS"), got


def test_cross_process_calls(sandbox, observe):
    """Reading, writing or comparing another process's memory and files, and userfaultfd."""
    got = sandbox.probe("""
import subprocess
child = subprocess.Popen(['sleep', '30'])
buf = _ct.create_string_buffer(8)
iov = (_ct.c_void_p * 2)(_ct.cast(buf, _ct.c_void_p), 8)
pidfd = _libc.syscall(_ct.c_long(SYS['pidfd_open']), _ct.c_long(child.pid), _ct.c_long(0))
out = dict(
    process_vm_readv=sys_call('process_vm_readv', child.pid, iov, 1, iov, 1, 0),
    process_vm_writev=sys_call('process_vm_writev', child.pid, iov, 1, iov, 1, 0),
    kcmp=sys_call('kcmp', _os.getpid(), child.pid, 0, 0, 0),
    pidfd_getfd=sys_call('pidfd_getfd', pidfd, 0, 0) if pidfd >= 0 else 'no pidfd',
    process_madvise=sys_call('process_madvise', pidfd, iov, 1, 20, 0) if pidfd >= 0 else 'no pidfd',
    userfaultfd=sys_call('userfaultfd', 0),
    request_key=sys_call('request_key', b'user', b'ks-probe', None, 0),
)
if pidfd >= 0:
    _os.close(pidfd)
child.kill(); child.wait()
report(**out)
""")
    observe("priv-cross-process", "; ".join(f"{k}: {v}" for k, v in got.items()))
    refused = {"EPERM"} if sandbox.runtime == "runc" else {"EPERM", "EACCES", "ENOSYS"}
    assert set(got.values()) - {"no pidfd"} <= refused, got
    if sandbox.runtime == "runc":
        assert "no pidfd" not in got.values(), got

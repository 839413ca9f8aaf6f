"""The attack battery's catalogue, the code every probe cell starts from, and the record.

Each probe is one row of ``docs/security.md``: what is tried, what the sandbox promises, and
what was observed under each runtime. Tests fill the record through the ``observe`` fixture;
``conftest.py`` writes the table at the end of a session in which every probe ran under every
runtime (a partial run, e.g. with ``-k``, leaves the file alone).
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["PRELUDE", "PROBES", "REFUSED", "SYSCALLS", "Battery", "Probe", "parse_report"]


@dataclass(frozen=True)
class Probe:
    id: str
    area: str
    title: str
    expected: str


AREAS = ("Network", "File system", "Privilege", "Resources", "Information")

PROBES: tuple[Probe, ...] = (
    # -- network -------------------------------------------------------------------------------
    Probe(
        "net-tcp-gateway",
        "Network",
        "TCP connect to a host listener on the Docker bridge gateway",
        "fails (no route); the host listener sees no connection",
    ),
    Probe(
        "net-tcp-loopback",
        "Network",
        "TCP connect to a host listener on 127.0.0.1",
        "the container's own loopback refuses; the host listener sees no connection",
    ),
    Probe(
        "net-udp-gateway",
        "Network",
        "UDP datagram to a host listener on the bridge gateway",
        "send fails (no route); the host listener receives nothing",
    ),
    Probe(
        "net-udp-loopback",
        "Network",
        "UDP datagram to a host listener on 127.0.0.1",
        "stays on the container's own loopback; the host listener receives nothing",
    ),
    Probe("net-raw", "Network", "raw IP socket (AF_INET, SOCK_RAW)", "EPERM (no CAP_NET_RAW)"),
    Probe("net-packet", "Network", "packet socket (AF_PACKET, SOCK_RAW)", "EPERM (no CAP_NET_RAW)"),
    Probe(
        "net-dns",
        "Network",
        "/etc/resolv.conf and getaddrinfo of a .test name",
        "resolv.conf read-only, naming only 127.0.0.1 (not the host's resolver); resolution "
        "fails: only `lo`, no route anywhere",
    ),
    Probe(
        "net-egress-secret",
        "Network",
        "learn the key of an egress_secrets host: environment, /proc, readable files, an API "
        "that echoes the request (with the kernel's own Authorization)",
        "the server gets the key, the kernel none of it: not in its environment or files, the "
        "echo masked, its own credential header dropped",
    ),
    # -- file system ---------------------------------------------------------------------------
    Probe(
        "fs-rootfs-write",
        "File system",
        "write the root file system (/usr, /etc/passwd, world-writable /var/tmp)",
        "EROFS: the root file system is read-only",
    ),
    Probe(
        "fs-host-paths",
        "File system",
        "read host files that are not mounted (/root/..., /srv/...)",
        "they do not exist inside",
    ),
    Probe(
        "fs-workspace-escape",
        "File system",
        "leave the mounted workspace through `..` and symlinks to host files",
        "ENOENT: links resolve inside the container, where the targets do not exist",
    ),
    Probe(
        "fs-workspace-write",
        "File system",
        "write into the workspace (strict mounts it read-only)",
        "EROFS",
    ),
    Probe(
        "fs-proc-sys",
        "File system",
        "write /proc/sys (hostname, core_pattern, drop_caches)",
        "refused (read-only /proc/sys, or gVisor's own /proc)",
    ),
    Probe(
        "fs-sys",
        "File system",
        "write /sys (uevent_helper, a device attribute, the cgroup limits)",
        "refused (read-only sysfs)",
    ),
    Probe(
        "fs-mknod",
        "File system",
        "mknod /dev/mem, /dev/kmsg and the host's root disk in /tmp",
        "EPERM, or (gVisor) a node that opens no host device",
    ),
    Probe(
        "fs-mount",
        "File system",
        "mount tmpfs and proc, remount / read-write, unmount the runtime dir",
        "EPERM",
    ),
    Probe(
        "fs-tmp-fill",
        "File system",
        "fill /tmp beyond its cap",
        "ENOSPC at the 256 MiB cap; the host's disk is not used",
    ),
    Probe(
        "fs-rundir-fill",
        "File system",
        "fill its runtime directory (/run/kernel-sandbox) for 4 s",
        "ENOSPC at the 4 MiB cap (runtime_dir_size: a tmpfs of its own); the kernel still answers",
    ),
    Probe(
        "fs-rundir-cleanup",
        "File system",
        "plant a 4,000+ level tree, mode-000 dirs, FIFOs, links to host files and dirs where "
        "host sockets are, then shut down",
        "shutdown raises nothing and leaves nothing; links are never followed; the host part "
        "is read-only",
    ),
    Probe(
        "fs-lifeline-takeover",
        "File system",
        "serve its own lifeline, then its owner is SIGKILLed",
        "the host part is read-only (EROFS); gc sees the orphan at once; the container ends "
        "within the watchdog's grace",
    ),
    Probe(
        "fs-socket-symlink",
        "File system",
        "replace its socket paths with links to a host unix socket, then a new client connects",
        "the client reaches the kernel through host-only links; the host socket sees nothing",
    ),
    Probe(
        "fs-dataset-root-swap",
        "File system",
        "swap a dataset's folder for a link to a host folder: from inside (dataset in the "
        "read-write workspace) and on the host after the grant; then list, stat, read, write",
        "a dataset in a folder the kernel can write is refused before any container starts; "
        "after a swap the broker still serves the granted folder (the host folder is neither "
        "read nor written) and the audit log says `root: moved`",
    ),
    Probe(
        "fs-audit-log",
        "File system",
        "find, read or write the host's audit log; forge execute requests and replies on its "
        "own shell socket",
        "no audit file is visible inside; the host recorded the probe cell's real request "
        "(exact code hash) and nothing forged; the hash chain verifies",
    ),
    # -- privilege -----------------------------------------------------------------------------
    Probe(
        "priv-setuid",
        "Privilege",
        "run setuid-root binaries (su, mount); setuid(0)",
        "no-new-privileges: the setuid bit is ignored, euid stays the sandbox user",
    ),
    Probe(
        "priv-cap-net-raw",
        "Privilege",
        "use CAP_NET_RAW",
        "no capability in any set; SOCK_RAW is EPERM",
    ),
    Probe(
        "priv-cap-sys-admin", "Privilege", "use CAP_SYS_ADMIN: sethostname, setdomainname", "EPERM"
    ),
    Probe(
        "priv-chown",
        "Privilege",
        "chown others' files (/tmp, the host-owned lifeline socket) and give one's own away",
        "EPERM (no CAP_CHOWN); the lifeline, in the read-only host part: EROFS or EPERM",
    ),
    Probe(
        "priv-ptrace",
        "Privilege",
        "ptrace: the kernel's own child; processes of the host",
        "own child: EPERM under runc (the seccomp profile refuses ptrace), traceable under "
        "gVisor (same sandbox, harmless); host processes are invisible (ESRCH); every visible "
        "process is the sandbox user with no capabilities",
    ),
    Probe(
        "priv-ptrace-pid1",
        "Privilege",
        "ptrace PID 1 (the container's init)",
        "refused: EPERM by the seccomp profile (runc), descendants only (gVisor)",
    ),
    Probe(
        "priv-unshare",
        "Privilege",
        "unshare user, mount, UTS, IPC, net, PID and cgroup namespaces",
        "EPERM; under gVisor a namespace stays inside the sandbox (mount still refused, "
        "hostname and root file system unchanged)",
    ),
    Probe("priv-bpf", "Privilege", "bpf(BPF_MAP_CREATE)", "refused"),
    Probe("priv-perf", "Privilege", "perf_event_open on itself", "refused"),
    Probe("priv-keyctl", "Privilege", "keyctl and add_key", "refused"),
    Probe(
        "priv-io-uring",
        "Privilege",
        "io_uring_setup, io_uring_enter, io_uring_register",
        "EPERM under runc (the seccomp profile); under gVisor the Sentry's own io_uring "
        "answers and the host kernel's is never reached",
    ),
    Probe(
        "priv-cross-process",
        "Privilege",
        "another process's memory and files (process_vm_readv/writev, kcmp, pidfd_getfd, "
        "process_madvise on its own child), userfaultfd, request_key",
        "refused (EPERM under runc; EPERM, EACCES or ENOSYS under gVisor)",
    ),
    Probe("priv-modules", "Privilege", "init_module, finit_module, delete_module", "EPERM"),
    # -- resources -----------------------------------------------------------------------------
    Probe(
        "res-fork-bomb",
        "Resources",
        "fork bomb",
        "stopped at the pids limit (256); host responsive, other kernels unaffected",
    ),
    Probe(
        "res-memory-bomb",
        "Resources",
        "allocate past the memory limit (1 GiB)",
        "only that kernel is OOM-killed; the client sees it dead; restart works; containers "
        "gone after shutdown",
    ),
    Probe(
        "res-cpu-hog",
        "Resources",
        "3 busy processes for 3 s (cpu_limit 1.0), measured from the host's cgroup",
        "held to about 1.0 CPU",
    ),
    Probe(
        "res-log-flood-data",
        "Resources",
        "flood the data broker for 10 s with requests whose path is a 60 KB name with "
        "newlines and a forged log line in it",
        "every request refused and answered; the owner's log grows by at most 20 clipped "
        "lines per 10 s and the audit log by at most 1,000 records per 10 s (then one "
        "summary); no forged line",
    ),
    Probe(
        "res-log-flood-egress",
        "Resources",
        "flood the egress proxy for 10 s with requests to unlisted 245-character host names "
        "(a 30 KB URL)",
        "every request denied; the decision log grows by at most 1,000 records per 10 s "
        "(then one summary), rotated at 50 MiB x 5; nothing in the owner's log",
    ),
    Probe(
        "res-iopub-flood",
        "Resources",
        "publish one 200 MiB buffer 10 times on IOPub (a widget's comm message) while the "
        "client is idle",
        "the owner's RSS grows by far less than one such message (it grew by ~2 GB with clients "
        "on the kernel's own socket); each is dropped by the host-side relay and the cell shows "
        "a notice naming iopub_max_message",
    ),
    Probe(
        "res-inotify-shared",
        "Resources",
        "exhaust inotify instances (a per-uid limit, 128 here) in kernel A, then create one in "
        "kernel B and as a host account (the image's uid 1000, an account on this host)",
        "A is refused at its own limit; B and the host account still get one: each sandbox "
        "runs as a uid of its own that no host account has",
    ),
    Probe(
        "res-mqueue-shared",
        "Resources",
        "exhaust POSIX message queue bytes (RLIMIT_MSGQUEUE, counted per uid) in kernel A, then "
        "open a queue in kernel B and as a host account",
        "A is refused at its own limit; B and the host account still open one",
    ),
    Probe(
        "res-open-files",
        "Resources",
        "open files until refused in one process, then hold as many as allowed in 200 "
        "processes (10 under runsc); the host's file handles measured (/proc/sys/fs/file-nr)",
        "EMFILE at nofile_limit (1024, soft = hard); the host's file handles grow by at most "
        "pids_limit x 1024 = 262,144 (about a tenth of fs.file-max here)",
    ),
    # -- information ---------------------------------------------------------------------------
    Probe(
        "info-env",
        "Information",
        "look for a secret exported in the host process that started the kernel",
        "absent from every visible process's environment",
    ),
    Probe(
        "info-docker-socket",
        "Information",
        "find and connect to a Docker socket",
        "none; the only sockets are the kernel's own in /run/kernel-sandbox",
    ),
    Probe(
        "info-hostname",
        "Information",
        "learn the host's name",
        "the hostname is `sandbox`, not the host's",
    ),
    Probe(
        "info-other-kernel",
        "Information",
        "from kernel B, find kernel A's files, key, token or sockets",
        "nothing of A is visible; /run/kernel-sandbox holds only B's own",
    ),
)

# x86_64 system call numbers (Python has no wrapper for these).
# How a socket of a kind the sandbox must not have is refused: EPERM (no capability, or the
# seccomp profile), or EAFNOSUPPORT (the family does not exist there: gVisor passing sockets to
# its host's stack, as in a gVisor pod, has no raw or packet sockets at all).
REFUSED = ("EPERM", "EAFNOSUPPORT")

SYSCALLS = {
    "ptrace": 101,
    "chown": 92,
    "mknod": 133,
    "sethostname": 170,
    "setdomainname": 171,
    "mount": 165,
    "umount2": 166,
    "init_module": 175,
    "delete_module": 176,
    "add_key": 248,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "finit_module": 313,
    "bpf": 321,
    "request_key": 249,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "pidfd_open": 434,
    "pidfd_getfd": 438,
    "process_madvise": 440,
}

# Runs first in every probe kernel (and in child processes that probes start).
PRELUDE = r'''
import ctypes as _ct, errno as _errno, json as _json, os as _os
_libc = _ct.CDLL(None, use_errno=True)
SYS = @SYSCALLS@

def errname(code):
    return _errno.errorcode.get(code, str(code))

def sys_call(name, *args):
    """Make a raw system call; return 'ok' or the errno's name."""
    conv = [a if a is None or isinstance(a, (bytes, _ct.Array)) else _ct.c_long(a)
            for a in args]
    _ct.set_errno(0)
    ret = _libc.syscall(_ct.c_long(SYS[name]), *conv)
    return 'ok' if ret != -1 else errname(_ct.get_errno())

def attempt(fn, *args, **kwargs):
    """Call fn; return 'ok' or the name of the error it raised."""
    try:
        fn(*args, **kwargs)
        return 'ok'
    except OSError as exc:
        return errname(exc.errno) if exc.errno else type(exc).__name__
    except Exception as exc:
        return type(exc).__name__

def status(field, pid='self'):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith(field + ':'):
            return line.split(':', 1)[1].strip()
    return None

def report(**values):
    print(_json.dumps(values))
'''.replace("@SYSCALLS@", json.dumps(SYSCALLS))


def parse_report(stdout: str) -> dict[str, Any]:
    """The JSON object a probe cell printed last."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"the probe printed no report: {stdout!r}")
    return json.loads(lines[-1])


@dataclass
class Cell:
    text: str
    nodeid: str


@dataclass
class Battery:
    """What each probe observed under each runtime, and how its test ended."""

    runtimes: tuple[str, ...]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)

    def observe(self, probe_id: str, runtime: str, text: str, nodeid: str) -> None:
        if probe_id not in {p.id for p in PROBES}:
            raise KeyError(f"unknown probe {probe_id!r}; add it to battery.PROBES")
        self.cells[(probe_id, runtime)] = Cell(text, nodeid)

    def complete(self) -> bool:
        """Every probe observed under every runtime, each by a test that ran to its end."""
        return all(
            (p.id, rt) in self.cells and self.cells[(p.id, rt)].nodeid in self.outcomes
            for p in PROBES
            for rt in self.runtimes
        )

    def verdict(self, probe_id: str, runtime: str) -> str:
        return self.outcomes.get(self.cells[(probe_id, runtime)].nodeid, "failed")

    def render(self) -> str:
        counts = {"held": 0, "known gap": 0, "failed": 0}
        for p in PROBES:
            for rt in self.runtimes:
                counts[self.verdict(p.id, rt)] += 1
        lines = [
            "# Attack battery: what the sandbox held",
            "",
            "<!-- GENERATED by tests/security (conftest.py writes it at the end of a full run). "
            "Do not edit by hand. -->",
            "",
            "Each probe below ran as a cell inside a real sandboxed kernel started through "
            "`jupyter_client` with the shipped kernelspec and the default policy (profile "
            "`strict`), once with runc and once with runsc (gVisor); host-side facts (listeners, "
            "cgroup counters, disk, process counts) were measured from the host. "
            "Regenerate with:",
            "",
            "```",
            "python3 -m pytest tests/security",
            "```",
            "",
            "The file is rewritten only when every probe ran under every runtime. "
            "✓ = held, ✗ = did not hold (a known gap is explained in "
            "[threat-model.md](threat-model.md)). "
            "What the sandbox promises, and what it does not, is in "
            "[threat-model.md](threat-model.md).",
            "",
            "| Run | |",
            "|---|---|",
        ]
        lines += [f"| {key} | {value} |" for key, value in self.facts.items()]
        lines += [
            f"| Result | {len(PROBES)} probes x {len(self.runtimes)} runtimes: "
            f"{counts['held']} held, {counts['known gap']} known gap(s), "
            f"{counts['failed']} failed |",
            "",
        ]
        for area in AREAS:
            observed = " | ".join(f"Observed: {rt}" for rt in self.runtimes)
            lines += [
                f"## {area}",
                "",
                f"| Probe | Expected | {observed} |",
                "|---|---|" + "---|" * len(self.runtimes),
            ]
            for p in (p for p in PROBES if p.area == area):
                cells = []
                for rt in self.runtimes:
                    mark = {"held": "✓", "known gap": "✗ known gap:", "failed": "✗ FAILED:"}
                    cells.append(f"{mark[self.verdict(p.id, rt)]} {self.cells[(p.id, rt)].text}")
                lines.append(
                    "| " + " | ".join(_cell(x) for x in (p.title, p.expected, *cells)) + " |"
                )
            lines.append("")
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_facts(docker_client: Any, image: str) -> dict[str, str]:
    """The versions a reader needs to judge the table."""
    facts = {"Date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        facts["Docker Engine"] = str(docker_client.version().get("Version", "?"))
        attrs = docker_client.api.inspect_image(image)
        facts["Image"] = f"{image} ({attrs['Id'][7:19]})"
    except Exception:  # the table is still worth writing without them
        pass
    try:
        runsc = subprocess.run(["runsc", "--version"], capture_output=True, text=True, timeout=10)
        facts["runsc"] = runsc.stdout.splitlines()[0] if runsc.stdout else "?"
    except (OSError, subprocess.SubprocessError):
        facts["runsc"] = "not found"
    facts["Host kernel"] = f"{platform.system()} {platform.release()} ({platform.machine()})"
    return facts

"""Runtime directory probes: what a kernel can do to the one host directory it shares.

The kernel fills ``/run/kernel-sandbox`` (capped by a tmpfs of its own), plants a tree made to
break cleanup (thousands of levels deep, mode-000 directories, FIFOs, links to host files,
directories where host sockets were), takes over its lifeline to outlive its owner, and plants
links at its socket paths to send new host clients to a host socket of its choice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from jupyter_client.manager import KernelManager
from support.kernels import run_cell
from test_containment import runtime_kernel
from traitlets.config import Config

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.host.reap import sweep
from kernel_sandbox.host.rundir import RuntimeDir
from kernel_sandbox.host.tmpfs import mounts_under

from .battery import PRELUDE, parse_report

MIB = 1024**2
CAP = 4 * MIB  # runtime_dir_size's default
FILL_SECONDS = 4
FILL_LIMIT = 3 * 1024 * MIB  # before the cap existed: stop here whatever happens
DEPTH = 5000
GRACE = 5.0  # orphan_timeout of the takeover probe's kernel


@contextmanager
def probe_kernel(runtime: str, cwd: Path, root: Path) -> Iterator[tuple[Any, Any]]:
    """A kernel of ``runtime`` with its runtime directories under ``root`` (so the probe can
    check that nothing is left there); the caller shuts it down (timed), or this does."""
    config = Config({"DockerSandboxProvisioner": {"runtime_root": str(root)}})
    km = KernelManager(kernel_name=runtime_kernel(runtime), config=config)
    km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out = run_cell(kc, PRELUDE)
        assert out["status"] == "ok", out
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def record(observe: Any, probe_id: str, text: str) -> None:
    print(f"{probe_id}: {text}")  # the measured numbers, also in the test's output
    observe(probe_id, text)


def probe(kc: Any, code: str, timeout: float = 120) -> dict[str, Any]:
    out = run_cell(kc, code, timeout=timeout)
    assert out["status"] == "ok", f"{out['ename']}: {out['evalue']}\n{out['stderr']}"
    return parse_report(out["stdout"])


@pytest.fixture
def root(bait: Any) -> Iterator[Path]:
    """A runtime root of this probe's own (short: socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ks-rd-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            RuntimeDir(child).remove()
        path.rmdir()


# -- fs-rundir-fill -----------------------------------------------------------------------------

FILL = """
import time
path = '/run/kernel-sandbox/ks-fill'
chunk = b'x' * (1 << 20)
written, error = 0, None
started = time.monotonic()
fd = _os.open(path, _os.O_WRONLY | _os.O_CREAT | _os.O_TRUNC, 0o600)
try:
    while time.monotonic() - started < SECONDS and written < LIMIT:
        try:
            written += _os.write(fd, chunk)
        except OSError as exc:
            error = errname(exc.errno)
            break
finally:
    _os.close(fd)
seconds = time.monotonic() - started
st = _os.statvfs('/run/kernel-sandbox')
_os.unlink(path)
report(written=written, error=error, seconds=seconds, cap=st.f_blocks * st.f_frsize)
"""


def test_fs_rundir_fill(runtime, root, bait, observe, x86_64, jupyter_path, kernel_image):
    """fs-rundir-fill: the kernel writes into its runtime directory for 4 s."""
    cwd = Path(tempfile.mkdtemp(prefix="k-", dir=bait.root))
    with probe_kernel(runtime, cwd, root) as (km, kc):
        runtime_dir = km.provisioner.runtime_dir
        code = FILL.replace("SECONDS", str(FILL_SECONDS)).replace("LIMIT", str(FILL_LIMIT))
        got = probe(kc, code)
        mounted = [str(p) for p in mounts_under(runtime_dir.path)]
        alive = run_cell(kc, "print('still here')")["stdout"].strip()
    record(
        observe,
        "fs-rundir-fill",
        f"{got['error'] or 'no error'} after {got['written'] / MIB:.1f} MiB in "
        f"{got['seconds']:.1f} s (cap {CAP / MIB:.0f} MiB, a tmpfs of its own); the kernel "
        "still answers",
    )
    assert got["error"] == "ENOSPC", got
    assert got["written"] <= CAP, got
    assert mounted == [str(runtime_dir.area)]
    assert alive == "still here"


# -- fs-rundir-cleanup ----------------------------------------------------------------------------

PLANT = """
import socket as _socket
base = '/run/kernel-sandbox'
out = {}
_os.makedirs(base + '/locked/inner')
open(base + '/locked/inner/f', 'w').write('x')
_os.chmod(base + '/locked/inner', 0)
_os.chmod(base + '/locked', 0o500)
_os.mkfifo(base + '/fifo')
s = _socket.socket(_socket.AF_UNIX)
s.bind(base + '/own.sock')
s.close()
_os.symlink(OUTSIDE, base + '/file-link')
_os.symlink(ROOT, base + '/dir-link')
def plant(path):
    if _os.path.lexists(path) and not _os.path.isdir(path):
        _os.unlink(path)
    _os.mkdir(path)
    open(path + '/x', 'w').write('x')
for name in ('lifeline', 'data.sock', 'connection.json', 'egress', 'egress-notices'):
    out[name] = attempt(plant, base + '/' + name)
    out['host-' + name] = attempt(plant, '/run/kernel-sandbox-host/' + name)
top = _os.open(base, _os.O_RDONLY)
_os.mkdir('deep', dir_fd=top)
cur = _os.open('deep', _os.O_RDONLY, dir_fd=top)
depth = 0
try:
    for depth in range(1, DEPTH + 1):
        _os.mkdir('d', dir_fd=cur)
        nxt = _os.open('d', _os.O_RDONLY, dir_fd=cur)
        _os.close(cur)
        cur = nxt
        if depth % 1000 == 0:
            _os.symlink(OUTSIDE, 'file-link', dir_fd=cur)
            _os.symlink(ROOT, 'dir-link', dir_fd=cur)
            _os.mkfifo('fifo', dir_fd=cur)
except OSError as exc:
    out['deep_stop'] = errname(exc.errno)  # the tmpfs's inode cap
_os.close(cur)
out['depth'] = depth
report(**out)
"""


def test_fs_rundir_cleanup(runtime, root, bait, observe, x86_64, jupyter_path, kernel_image):
    """fs-rundir-cleanup: a tree made to break cleanup, then a normal shutdown."""
    cwd = Path(tempfile.mkdtemp(prefix="k-", dir=bait.root))
    with probe_kernel(runtime, cwd, root) as (km, kc):
        code = (
            PLANT.replace("DEPTH", str(DEPTH))
            .replace("OUTSIDE", repr(str(bait.outside)))
            .replace("ROOT", repr(str(bait.root)))
        )
        got = probe(kc, code, timeout=300)
        kc.stop_channels()
        started = time.monotonic()
        km.shutdown_kernel(now=True)  # raises nothing, whatever the kernel planted
        seconds = time.monotonic() - started
    left = sorted(os.listdir(root))
    host_refused = {got[k] for k in got if k.startswith("host-")}
    record(
        observe,
        "fs-rundir-cleanup",
        f"{got['depth']:,} levels ({got.get('deep_stop', 'all made')}), mode-000 and "
        f"read-only dirs, FIFOs, links to host files, dirs where host sockets were (in its "
        f"own part; in the host part: {'/'.join(sorted(host_refused))}); shutdown "
        f"{seconds:.1f} s, raised nothing, left {len(left)} entries; host files intact",
    )
    assert got["depth"] >= 4000, got
    assert host_refused <= {"EROFS", "EACCES", "EPERM"}, got
    assert left == [], left
    assert not mounts_under(root)
    assert bait.outside.read_text() == bait.secret
    assert bait.root.is_dir() and bait.workspace.is_dir()


# -- fs-lifeline-takeover -------------------------------------------------------------------------

TAKEOVER = """
import socket as _socket, threading as _threading
_held = []
def serve(path):
    if _os.path.lexists(path):
        _os.unlink(path)
    s = _socket.socket(_socket.AF_UNIX)
    s.bind(path)
    s.listen(16)
    _held.append(s)
    def accept():
        while True:
            conn, _ = s.accept()
            _held.append(conn)
    _threading.Thread(target=accept, daemon=True).start()
out = {}
for path in ('/run/kernel-sandbox-host/lifeline', '/run/kernel-sandbox/lifeline'):
    out[path] = attempt(serve, path)
report(**out)
"""

OWNER = textwrap.dedent("""
    import asyncio, json, sys, time
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    kernel, root, grace, prelude, attack = sys.argv[1:6]
    config = Config({"DockerSandboxProvisioner": {"orphan_timeout": float(grace),
                                                  "runtime_root": root}})
    km = KernelManager(kernel_name=kernel, config=config)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    for code in (prelude, attack):
        kc.execute_interactive(code, timeout=60, output_hook=lambda m: print(
            json.dumps({"stream": m["content"].get("text", "")}), flush=True)
            if m["msg_type"] == "stream" else None)
    info = asyncio.run(km.provisioner.get_provisioner_info())
    print(json.dumps({"info": info}), flush=True)
    time.sleep(3600)
""")


def _state(docker_client: Any, container_id: str) -> str:
    try:
        return str(docker_client.api.inspect_container(container_id)["State"]["Status"])
    except Exception:
        return "gone"


def test_fs_lifeline_takeover(
    runtime, root, observe, x86_64, jupyter_path, kernel_image, docker_client
):
    """fs-lifeline-takeover: the kernel serves its own lifeline; its owner is SIGKILLed."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, runtime_kernel(runtime), str(root), str(GRACE)]
        + [PRELUDE, TAKEOVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    info: dict[str, Any] = {}
    attack = ""
    assert owner.stdout is not None
    for line in owner.stdout:
        message = json.loads(line)
        if "stream" in message:
            attack += message["stream"]
        else:
            info = message["info"]
            break
    assert info, "the owner process did not start its kernel"
    container_id, runtime_dir = info["container_id"], Path(info["runtime_dir"])
    try:
        got = parse_report(attack)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        killed = time.monotonic()
        report = asyncio.run(sweep(DockerBackend(), str(root), dry_run=True))
        seen = container_id in report.containers
        ended = None
        while time.monotonic() - killed < GRACE + 25:
            if _state(docker_client, container_id) != "running":
                ended = time.monotonic() - killed
                break
            time.sleep(0.25)
        try:  # another process's orphan sweep may have removed it already
            logs = docker_client.api.logs(container_id, tail=5).decode(errors="replace")
        except docker.errors.APIError as exc:
            logs = f"(gone: {exc.explanation})"
        print(f"container's last lines: {logs!r}")
    finally:
        owner.kill()
        owner.wait()
        try:
            docker_client.api.remove_container(container_id, force=True)
        except Exception:
            pass
        asyncio.run(sweep(DockerBackend(), str(root)))  # the orphan's directory and tmpfs
    host, old = got["/run/kernel-sandbox-host/lifeline"], got["/run/kernel-sandbox/lifeline"]
    record(
        observe,
        "fs-lifeline-takeover",
        f"replacing the lifeline: {host} (a lifeline in its own part: {old}, never "
        f"used); owner SIGKILLed: gc sees the orphan at once: {seen}; the container ended "
        + (f"{ended:.1f} s later (grace {GRACE:.0f} s)" if ended else "NOT within 30 s"),
    )
    assert host in ("EROFS", "EACCES", "EPERM"), got
    assert seen
    assert ended is not None and ended <= GRACE + 10
    assert not runtime_dir.exists()
    assert not mounts_under(root)


# -- fs-socket-symlink ----------------------------------------------------------------------------

REDIRECT = """
out = {}
for port in PORTS:
    path = f'/run/kernel-sandbox/k-{port}'
    def swap():
        _os.unlink(path)
        _os.symlink(TARGET, path)
    out[str(port)] = attempt(swap)
report(**out)
"""


class Listener:
    """A host unix socket that counts who connects (the bait a planted link names)."""

    def __init__(self, path: Path):
        self.path = path
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)


def test_fs_socket_symlink(runtime, root, bait, observe, x86_64, jupyter_path, kernel_image):
    """fs-socket-symlink: links at the kernel's socket paths to a host socket; new clients."""
    cwd = Path(tempfile.mkdtemp(prefix="k-", dir=bait.root))
    target = Listener(bait.root / "host.sock")
    try:
        with probe_kernel(runtime, cwd, root) as (km, kc):
            channels = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
            ports = [km.get_connection_info()[name] for name in channels]
            code = REDIRECT.replace("PORTS", repr(ports)).replace("TARGET", repr(str(target.path)))
            got = probe(kc, code)
            fresh = km.client()  # a new client (a new browser tab, `jupyter console --existing`)
            fresh.start_channels()
            try:
                fresh.wait_for_ready(timeout=30)
                reply = run_cell(fresh, "print(6 * 7)")["stdout"].strip()
            except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                reply = f"{type(exc).__name__}: {exc}"
            finally:
                fresh.stop_channels()
            time.sleep(1.0)
    finally:
        target.close()
    record(
        observe,
        "fs-socket-symlink",
        f"links planted at its 5 socket paths: {'/'.join(sorted(set(got.values())))}; a new "
        f"client then got {reply!r}; connections to the host socket they name: "
        f"{target.connections}",
    )
    assert set(got.values()) == {"ok"}, got
    assert target.connections == 0
    if runtime == "runc":
        assert reply == "42"
    else:  # gVisor (2022) ends the sandbox when a host client reaches a socket whose path the
        # sandbox unlinked: the kernel only harms itself; the host socket still sees nothing
        assert reply == "42" or "died" in reply, reply

"""Unit tests (no engine) of the runtime directory on the host: removal of whatever a kernel
made there (tests run as root here, and as an unprivileged owner through setpriv), the tmpfs,
and the client links to the kernel's sockets."""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_sandbox.errors import KernelStartError
from kernel_sandbox.host import tmpfs
from kernel_sandbox.host.fsremove import remove_tree
from kernel_sandbox.host.owner import Lifeline
from kernel_sandbox.host.rundir import RuntimeDir

REPO = Path(__file__).resolve().parents[1]


def hostile_tree(top: Path, outside: Path, depth: int = 5000) -> None:
    """What a kernel can make: a chain ``depth`` levels deep (links to ``outside`` and FIFOs
    on the way), a mode-000 and a read-only directory, a socket, links to host files."""
    top.mkdir()
    cur = os.open(top, os.O_RDONLY)
    for level in range(depth):
        os.mkdir("d", dir_fd=cur)
        if level % 500 == 0:
            os.symlink(outside, "link", dir_fd=cur)
            os.symlink(outside.parent, "dir-link", dir_fd=cur)
            os.mkfifo("fifo", dir_fd=cur)
        nxt = os.open("d", os.O_RDONLY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(cur)
    for name, mode in (("zero", 0), ("readonly", 0o500), ("writeonly", 0o300)):
        (top / name / "inner").mkdir(parents=True)
        (top / name / "inner" / "f").write_text("x")
        (top / name / "inner").chmod(mode)
        (top / name).chmod(mode)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(top / "sock"))
    sock.close()
    os.mkfifo(top / "pipe")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    target = tmp_path / "host" / "secret.txt"
    target.parent.mkdir()
    target.write_text("host file")
    return target


def test_remove_tree_takes_any_tree_and_follows_no_link(tmp_path: Path, outside: Path) -> None:
    top = tmp_path / "rundir"
    try:
        hostile_tree(top, outside)
    finally:  # pytest's own cleanup of tmp_path would recurse into it
        started = time.monotonic()
        result = remove_tree(top)
    assert time.monotonic() - started < 30
    assert result.complete, str(result)
    assert not top.exists()
    assert outside.read_text() == "host file" and outside.parent.is_dir()


def test_remove_tree_as_the_unprivileged_owner(tmp_path: Path) -> None:
    """An owner without root (the kernel's uid is then its own): modes are fixed by chmod
    through the directory's handle."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to switch to another uid")
    base = Path("/tmp") / f"ks-fsremove-{os.getpid()}"
    base.mkdir(mode=0o755)
    os.chown(base, 65534, 65534)
    script = "\n".join(
        [
            "import os, socket, sys",
            "from pathlib import Path",
            "sys.path.insert(0, sys.argv[1])",
            "from kernel_sandbox.host.fsremove import remove_tree",
            inspect.getsource(hostile_tree),
            "top, out = Path(sys.argv[2]) / 't', Path(sys.argv[2]) / 'out'",
            "out.write_text('x')",
            "hostile_tree(top, out, 2000)",
            "r = remove_tree(top)",
            "print(r.complete, top.exists(), out.read_text())",
        ]
    )
    copy = base / "code"
    shutil.copytree(REPO / "kernel_sandbox", copy / "kernel_sandbox")
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    try:
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [sys.executable, "-I", "-c", script, str(copy), str(base)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={"PATH": os.environ["PATH"]},
        )
        if out.returncode != 0 and "Permission denied" in out.stderr and "python" in out.stderr:
            pytest.skip(f"the interpreter is not usable by another uid: {out.stderr[-200:]}")
        assert out.stdout.split() == ["True", "False", "x"], out.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_remove_tree_never_raises_and_leaves_mounts(tmp_path: Path) -> None:
    assert remove_tree(tmp_path / "missing").complete
    if not tmpfs.can_mount():
        return
    top = tmp_path / "t"
    (top / "m").mkdir(parents=True)
    tmpfs.mount(top / "m", 1024**2, (0, 0))
    try:
        (top / "m" / "kept").write_text("on another file system")
        result = remove_tree(top)
        assert not result.complete and "mount point" in str(result)
        assert (top / "m" / "kept").exists()
    finally:
        tmpfs.unmount(top / "m")
    assert remove_tree(top).complete


def test_runtime_dir_layout_tmpfs_and_removal(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "r"
    rd = RuntimeDir.create(str(root), (1000, 1000))
    assert stat.S_IMODE(rd.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(rd.host_dir.stat().st_mode) == 0o711
    assert rd.shared.is_dir() and rd.shared.parent == rd.area
    if tmpfs.can_mount():
        assert rd.capped and tmpfs.mounts_under(rd.path) == [rd.area]
        assert rd.shared.stat().st_uid == 1000
    hostile_tree(rd.shared / "planted", outside, depth=3000)
    Lifeline(rd.host_dir).listen()
    result = rd.remove()
    assert result.complete, str(result)
    assert not rd.path.exists() and tmpfs.mounts_under(root) == []
    assert outside.read_text() == "host file"


def test_runtime_dir_without_tmpfs(tmp_path: Path) -> None:
    rd = RuntimeDir.create(str(tmp_path / "r"), None, size=None)
    assert not rd.capped and tmpfs.mounts_under(rd.path) == []
    assert rd.remove().complete


def test_lifeline_close_tolerates_a_planted_directory(tmp_path: Path) -> None:
    (tmp_path / "h").mkdir()
    lifeline = Lifeline(tmp_path / "h")
    lifeline.listen()
    lifeline.path.unlink()
    lifeline.path.mkdir()
    (lifeline.path / "x").write_text("x")
    lifeline.close()  # raises nothing; the directory is left for the runtime dir's removal


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_client_links_follow_nothing_the_kernel_planted(tmp_path: Path) -> None:
    rd = RuntimeDir.create(str(tmp_path / "r"), None, size=None)
    info = {"ip": rd.client_prefix, "shell_port": 1, "iopub_port": 2, "stdin_port": 3}
    info.update({"control_port": 4, "hb_port": 5})
    host = _bind(tmp_path / "host.sock")  # a host socket the kernel would like us to reach
    kernel = [_bind(rd.kernel_socket(port)) for port in (1, 2, 3, 4)]
    os.symlink(tmp_path / "host.sock", rd.kernel_socket(5))
    assert not rd.sockets_ready(info)  # a link is never "ready"
    with pytest.raises(KernelStartError, match="not a socket"):
        rd.link_client_socket(5, os.getuid())
    assert not rd.client_socket(5).exists()
    with pytest.raises(KernelStartError, match="owned by uid"):
        rd.link_client_socket(1, os.getuid() + 1)
    rd.link_client_socket(1, os.getuid())
    assert rd.client_socket(1).stat().st_ino == rd.kernel_socket(1).stat().st_ino
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(rd.client_socket(1)))
    client.close()
    rd.kernel_socket(1).unlink()  # the kernel swaps its path: the client's link stays its socket
    os.symlink(tmp_path / "host.sock", rd.kernel_socket(1))
    host.settimeout(0.1)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(rd.client_socket(1)))
    with pytest.raises(TimeoutError):
        host.accept()
    client.close()
    rd.clear_sockets(info)  # a restart: both sides go, whatever they are
    assert sorted(os.listdir(rd.shared)) == [] and not rd.client_socket(1).exists()
    for sock in [host, *kernel]:
        sock.close()
    assert rd.remove().complete

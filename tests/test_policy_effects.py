"""Each policy value takes effect, checked from inside real sandboxed kernels; bad values
start nothing.

Kept lean for a small machine: one kernel carries most keys at once, two more cover the
workspace modes (and gVisor), and one Jupyter Server run covers real config files, ceilings,
idle_timeout and `kernel-sandbox stop` against a live owner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from support.servers import execute, jupyter_server
from traitlets.config import Config

from kernel_sandbox.engine.backend import DockerBackend, workspace_target
from kernel_sandbox.errors import PolicyError, RuntimeUnavailable
from kernel_sandbox.host.rundir import RuntimeDir
from kernel_sandbox.host.uids import DEFAULT_RANGE, UidRange

M = 1024**2
ACCOUNT_UID = 4242  # a test folder's owner: no account here, outside uid_range


FACTS = r"""
import errno, json, os
def read(path):
    try:
        return open(path).read().strip()
    except OSError:
        return None
def first(*paths):
    for path in paths:
        if os.path.exists(path):
            return read(path)
def write(path):
    try:
        with open(path, 'w') as handle:
            handle.write('written from the sandbox')
        return 'ok'
    except OSError as exc:
        return errno.errorcode[exc.errno]
def cpus():
    v2 = read('/sys/fs/cgroup/cpu.max')
    quota, period = v2.split() if v2 else (read('/sys/fs/cgroup/cpu/cpu.cfs_quota_us'),
                                          read('/sys/fs/cgroup/cpu/cpu.cfs_period_us'))
    return None if quota in (None, 'max', '-1') else int(quota) / int(period)
def size(path):
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize
modes = {}
for line in open('/proc/mounts'):
    target, options = line.split()[1], line.split()[3]
    modes[target] = options.split(',')[0]
print(json.dumps({
    'cwd': os.getcwd(), 'uid': os.getuid(), 'gid': os.getgid(),
    'memory': first('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'),
    'pids': first('/sys/fs/cgroup/pids.max', '/sys/fs/cgroup/pids/pids.max'),
    'cpus': cpus(), 'tmp_size': size('/tmp'), 'home_size': size(os.path.expanduser('~')),
    'env': dict(os.environ), 'modes': modes, 'listing': sorted(os.listdir('.')),
    'notes': read('notes.txt'), 'write_here': write('from-kernel.txt'),
    'ro_file': read('/data/ro/in.txt'), 'write_ro': write('/data/ro/x.txt'),
    'write_rw': write('/data/rw/out.txt'), 'proc_version': read('/proc/version'),
}))
"""


def facts(kc) -> dict:
    out = run_cell(kc, FACTS)
    assert out["status"] == "ok", out
    return json.loads(out["stdout"])


@pytest.fixture
def home_dir() -> Iterator[Path]:
    """A notebook folder under the home directory: a path the sandbox shows as it is."""
    folder = Path.home() / f".ks-test-{uuid.uuid4().hex[:8]}" / "project"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def world_writable(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o777)  # the kernel runs as another uid than this (root) test
    return path


def test_every_key_takes_effect_inside(
    jupyter_path, leak_check, docker_client, tmp_path, home_dir, monkeypatch
):
    os.chmod(home_dir, 0o777)
    (home_dir / "notes.txt").write_text("the notebook's own folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "in.txt").write_text("read-only data")
    rw = world_writable(tmp_path / "rw")
    monkeypatch.setenv("KS_PASS", "passed-through")
    monkeypatch.setenv("KS_NOT_LISTED", "host-secret")
    name = make_kernelspec(
        f"effects-{uuid.uuid4().hex[:6]}",
        {
            "profile": "analyst",
            "memory_limit": "300m",
            "cpu_limit": 0.5,
            "pids_limit": 64,
            "tmpfs_size": "32m",
            "workspace": "rw",
            "mounts": [f"{ro}:/data/ro", f"{rw}:/data/rw:rw"],
            "env": {"KS_SET": "from-policy"},
            "env_passthrough": ["KS_PASS"],
            "user": "1234:1234",
        },
    )
    with sandbox_kernel(name, cwd=str(home_dir)) as (km, kc):
        inside = facts(kc)
        attrs = docker_client.api.inspect_container(km.provisioner.container_id)
    # limits, as the kernel's own cgroup states them (cgroup v1 here; v2 read the same way)
    assert int(inside["memory"]) == 300 * M
    assert inside["cpus"] == pytest.approx(0.5)
    assert inside["pids"] == "64"
    assert inside["tmp_size"] == inside["home_size"] == 32 * M
    # the working directory is the notebook's folder, mounted at the same path, writable
    assert inside["cwd"] == str(home_dir) and "notes.txt" in inside["listing"]
    assert inside["notes"] == "the notebook's own folder"
    assert inside["write_here"] == "ok" and (home_dir / "from-kernel.txt").exists()
    assert inside["modes"][str(home_dir)] == "rw"
    # extra mounts: read-only unless marked rw
    assert inside["ro_file"] == "read-only data" and inside["write_ro"] == "EROFS"
    assert inside["modes"]["/data/ro"] == "ro" and inside["modes"]["/data/rw"] == "rw"
    assert inside["write_rw"] == "ok"
    assert (rw / "out.txt").read_text() == "written from the sandbox"
    # environment: the policy's, the allowed host variable, nothing else from the host
    assert inside["env"]["KS_SET"] == "from-policy"
    assert inside["env"]["KS_PASS"] == "passed-through"
    assert "KS_NOT_LISTED" not in inside["env"] and "host-secret" not in json.dumps(inside["env"])
    # thread pools (BLAS, pyarrow) sized to cpu_limit, not to the host's CPUs
    assert inside["env"]["OMP_NUM_THREADS"] == inside["env"]["OPENBLAS_NUM_THREADS"] == "1"
    # user and runtime
    assert (inside["uid"], inside["gid"]) == (1234, 1234)
    assert attrs["HostConfig"].get("Runtime") in ("runc", None, "")


def test_read_only_workspace_and_profile_env(jupyter_path, leak_check, tmp_path):
    notebooks = world_writable(tmp_path / "notebooks")
    (notebooks / "notes.txt").write_text("course notes")
    name = make_kernelspec(
        f"effects-{uuid.uuid4().hex[:6]}", {"profile": "ci", "env": {"KS_EXTRA": "1"}}
    )
    with sandbox_kernel(name, cwd=str(notebooks)) as (_km, kc):
        inside = facts(kc)
    # a notebook folder under /tmp keeps its path (mounted in the sandbox's own /tmp)
    assert inside["cwd"] == workspace_target(str(notebooks)) == str(notebooks)
    assert inside["notes"] == "course notes"
    assert inside["write_here"] == "EROFS" and inside["modes"][str(notebooks)] == "ro"
    assert not (notebooks / "from-kernel.txt").exists()
    assert int(inside["memory"]) == 2 * 1024**3  # the ci profile's limit
    assert inside["env"]["PYTHONHASHSEED"] == "0" and inside["env"]["TZ"] == "UTC"
    assert inside["env"]["KS_EXTRA"] == "1"  # env merged over the profile's
    assert inside["env"]["OMP_NUM_THREADS"] == "1"  # the profile's own value
    if os.getuid() == 0:  # a uid of its own from uid_range (kernel_sandbox.host.uids)
        assert inside["uid"] == inside["gid"] and inside["uid"] in UidRange.parse(DEFAULT_RANGE)
    else:
        assert (inside["uid"], inside["gid"]) == (os.getuid(), os.getgid())


def test_no_workspace_under_gvisor(jupyter_path, leak_check, docker_client, tmp_path):
    notebooks = world_writable(tmp_path / "notebooks")
    (notebooks / "notes.txt").write_text("not for this kernel")
    name = make_kernelspec(f"effects-{uuid.uuid4().hex[:6]}", {"profile": "untrusted"})
    with sandbox_kernel(name, cwd=str(notebooks)) as (km, kc):
        inside = facts(kc)
        attrs = docker_client.api.inspect_container(km.provisioner.container_id)
    assert inside["cwd"] == "/home/sandbox" and "notes.txt" not in inside["listing"]
    assert inside["notes"] is None and "/workspace" not in inside["modes"]
    assert str(notebooks) not in inside["modes"]
    assert attrs["HostConfig"]["Runtime"] == "runsc"
    assert inside["proc_version"] != Path("/proc/version").read_text().strip()


# -- bad values start nothing -----------------------------------------------------------------


BAD = [
    ({"image": ""}, "image: expected an image name"),
    ({"memory_limit": "lots"}, "memory_limit: expected a size"),
    ({"cpu_limit": 0}, "cpu_limit: expected a positive number"),
    ({"pids_limit": 2.5}, "pids_limit: expected a positive whole number"),
    ({"tmpfs_size": "huge"}, "tmpfs_size: expected a size"),
    ({"workspace": "sometimes"}, "workspace: expected one of none, ro, rw"),
    ({"mounts": ["/"]}, "refusing to mount /"),
    ({"mounts": ["/var/run/docker.sock"]}, "Docker socket"),
    ({"mounts": ["/proc/1/root:/host"]}, "nothing under /proc"),
    ({"mounts": ["/etc"]}, "exposes /etc as a whole"),
    ({"mounts": ["{home}"]}, "as a whole"),
    ({"mounts": ["{tmp}:/tmp"]}, "it would cover /tmp"),
    ({"env": "A=1"}, "env: expected a mapping"),
    ({"env_passthrough": "HOME"}, "env_passthrough: expected a list"),
    ({"runtime": "run c"}, "runtime: expected an OCI runtime name"),
    ({"network": "host"}, "network: expected one of none"),
    ({"idle_timeout": "soon"}, "idle_timeout: expected seconds"),
    ({"user": "0:0"}, "must not run as root"),
    ({"memroy_limit": "1g"}, "unknown provisioner config key 'memroy_limit'"),
    ({"profile": "nonexistent"}, "unknown profile 'nonexistent'"),
]


def create_events(docker_client, since: float, spec_prefix: str) -> list:
    """Containers the engine created since ``since`` for kernelspecs named ``spec_prefix*``."""
    events = docker_client.events(
        since=int(since) - 1,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "event": "create"},
    )
    return [
        e
        for e in events
        if e.get("Actor", {})
        .get("Attributes", {})
        .get("io.kernel-sandbox.kernelspec", "")
        .startswith(spec_prefix)
    ]


def test_bad_values_start_nothing(jupyter_path, leak_check, docker_client, tmp_path, monkeypatch):
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a container or runtime directory was about to be created")

    monkeypatch.setattr(DockerBackend, "start", must_not_run)
    monkeypatch.setattr(RuntimeDir, "create", must_not_run)
    prefix = f"bad-{uuid.uuid4().hex[:6]}"
    since = time.time()
    for number, (config, message) in enumerate(BAD):
        config = json.loads(
            json.dumps(config).replace("{home}", str(Path.home())).replace("{tmp}", str(tmp_path))
        )
        name = make_kernelspec(f"{prefix}-{number}", config)
        km = KernelManager(kernel_name=name)
        with pytest.raises(PolicyError) as info:
            km.start_kernel()
        assert message in str(info.value), config
        assert f"kernelspec {name}" in str(info.value)
        assert not km.has_kernel
    # the same through Jupyter config, and over an operator's ceiling
    plain = make_kernelspec(f"{prefix}-plain", {})
    big = make_kernelspec(f"{prefix}-big", {"memory_limit": "4g"})
    for name, settings, message in (
        (plain, {"memory_limit": "lots"}, "memory_limit: expected a size"),
        (
            big,
            {"ceilings": {"memory_limit": "2g"}},
            "4g (from kernelspec) exceeds the operator's ceiling of 2g",
        ),
    ):
        config = Config({"DockerSandboxProvisioner": settings})
        with pytest.raises(PolicyError, match=re.escape(message)):
            KernelManager(kernel_name=name, config=config).start_kernel()
    assert create_events(docker_client, since, prefix) == []


def test_a_runtime_the_engine_lacks_is_refused_without_a_container(
    jupyter_path, leak_check, docker_client
):
    prefix = f"bad-{uuid.uuid4().hex[:6]}"
    since = time.time()
    name = make_kernelspec(f"{prefix}-kata", {"runtime": "kata-missing"})
    with pytest.raises(RuntimeUnavailable) as info:
        KernelManager(kernel_name=name).start_kernel()
    assert "no OCI runtime 'kata-missing'" in str(info.value)
    assert "kernel-sandbox doctor" in str(info.value)
    assert create_events(docker_client, since, prefix) == []


# -- Jupyter Server: real config files, ceilings, idle_timeout, kernel-sandbox stop ----------


def server_kernels(server) -> set[str]:
    return {k["id"] for k in server.api("GET", "/api/kernels").json()}


def wait_until_gone(server, docker_client, kernel_id: str, timeout: float) -> float:
    started, deadline = time.monotonic(), time.monotonic() + timeout
    label = f"io.kernel-sandbox.kernel-id={kernel_id}"
    while time.monotonic() < deadline:
        # api.containers: one listing call (containers.list inspects each container after
        # listing, and fails when the kernel is removed in between)
        if kernel_id not in server_kernels(server) and not docker_client.api.containers(
            all=True, filters={"label": label}
        ):
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"kernel {kernel_id} still there after {timeout}s")


def test_jupyter_server_config_files_idle_timeout_and_stop(
    jupyter_path, leak_check, docker_client, tmp_path, monkeypatch
):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.py").write_text(
        "c.DockerSandboxProvisioner.profile = 'analyst'\n"
        "c.DockerSandboxProvisioner.memory_limit = '300m'\n"
        "c.DockerSandboxProvisioner.pids_limit = 100\n"
        "c.DockerSandboxProvisioner.ceilings = {'cpu_limit': 1.5}\n"
    )
    (config_dir / "jupyter_config.json").write_text(
        json.dumps({"DockerSandboxProvisioner": {"tmpfs_size": "48m"}})
    )
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))
    idle = make_kernelspec(f"server-{uuid.uuid4().hex[:6]}", {"pids_limit": 64, "idle_timeout": 5})
    plain = make_kernelspec(f"server-{uuid.uuid4().hex[:6]}", {"pids_limit": 64})
    root = world_writable(tmp_path / "root")
    if os.getuid() == 0:  # analyst's rw workspace: an account's (a root-owned one is refused)
        os.chown(root, ACCOUNT_UID, ACCOUNT_UID)
    leak_check.spec(idle)
    leak_check.spec(plain)
    with jupyter_server(root, tmp_path / "server.log") as server:
        leak_check.pids.add(server.process.pid)
        # path "": the kernel starts in the server's root folder, as a notebook there would
        kernel = server.api("POST", "/api/kernels", json={"name": idle, "path": ""}).json()["id"]
        ws = server.channels(kernel)
        try:
            result = execute(ws, FACTS)
        finally:
            ws.close()
        assert result["reply"]["status"] == "ok", result
        inside = json.loads(result["stdout"])
        assert int(inside["memory"]) == 300 * M  # jupyter_server_config.py
        assert inside["tmp_size"] == 48 * M  # jupyter_config.json
        assert inside["pids"] == "64"  # the kernelspec beats both
        assert inside["cpus"] == pytest.approx(1.5)  # the analyst profile's 2, capped
        assert inside["write_here"] == "ok"  # analyst: the workspace is rw
        assert (root / "from-kernel.txt").exists()

        other = server.api("POST", "/api/kernels", json={"name": plain, "path": ""}).json()["id"]
        stop = subprocess.run(
            ["kernel-sandbox", "stop", other], capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0, stop.stderr
        assert "shut down by its owner" in stop.stderr
        wait_until_gone(server, docker_client, other, 15)  # forgotten, not restarted

        # the idle kernel: culled by the sandbox itself and forgotten by the server
        waited = wait_until_gone(server, docker_client, kernel, 30)
        assert waited < 30
    log = (tmp_path / "server.log").read_text()
    assert "idle_timeout is 5s" in log and "stopped by an operator" in log
    assert "restarting kernel" not in log.lower()

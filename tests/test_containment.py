"""The hardened defaults, each checked from inside a real sandboxed kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.kernels import bridge_gateway, make_kernelspec, run_cell, sandbox_kernel

FACTS = r"""
import json, os, socket
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return line.split(':', 1)[1].strip()
def read(path):
    try:
        return open(path).read().strip()
    except OSError as exc:
        return f'error: {exc.__class__.__name__}'
def first(*paths):  # cgroup v2 path first, then v1
    for path in paths:
        if os.path.exists(path):
            return read(path)
    return None
def writable(path):
    try:
        with open(os.path.join(path, '.probe'), 'w') as f:
            f.write('x')
        os.remove(os.path.join(path, '.probe'))
        return True
    except OSError:
        return False
st = os.statvfs('/tmp')
facts = {
    'interfaces': sorted(os.listdir('/sys/class/net')),
    'uid': os.getuid(), 'gid': os.getgid(),
    'root_writable': writable('/'), 'usr_writable': writable('/usr'),
    'tmp_writable': writable('/tmp'), 'home_writable': writable(os.path.expanduser('~')),
    'tmp_size': st.f_blocks * st.f_frsize,
    'cap_eff': status('CapEff'), 'cap_bnd': status('CapBnd'),
    'no_new_privs': status('NoNewPrivs'), 'seccomp': status('Seccomp'),
    'pids_max': first('/sys/fs/cgroup/pids.max', '/sys/fs/cgroup/pids/pids.max'),
    'memory_max': first('/sys/fs/cgroup/memory.max',
                        '/sys/fs/cgroup/memory/memory.limit_in_bytes'),
    'cpu_max': first('/sys/fs/cgroup/cpu.max') or ' '.join(
        read(f'/sys/fs/cgroup/cpu/cpu.cfs_{n}_us') for n in ('quota', 'period')),
    'env': dict(os.environ),
    'docker_sock': [p for p in ('/var/run/docker.sock', '/run/docker.sock') if os.path.exists(p)],
    'hostname': socket.gethostname(),
    'no_new_privs_prctl': __import__('ctypes').CDLL(None).prctl(39, 0, 0, 0, 0),
}
print(json.dumps(facts))
"""


RUNTIMES = ["runc", "runsc"]


def runtime_kernel(runtime: str) -> str:
    """The kernelspec to test ``runtime`` with: the shipped one, or a runsc variant of it."""
    if runtime == "runc":
        return "python3-sandbox"
    return make_kernelspec(f"python3-sandbox-{runtime}", {"runtime": runtime})


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def facts(jupyter_path, kernel_image, docker_client, runtime) -> dict:
    os.environ["KS_TEST_SECRET"] = "hunter2-host-secret"
    try:
        with sandbox_kernel(runtime_kernel(runtime)) as (km, kc):
            out = run_cell(kc, FACTS)
            host_view = host_cgroup_limits(km.provisioner.container_id)
            host_view.update(host_process_status(docker_client, km.provisioner.container_id))
    finally:
        del os.environ["KS_TEST_SECRET"]
    assert out["status"] == "ok", out
    return {**json.loads(out["stdout"]), "host": host_view, "runtime": runtime}


def host_process_status(docker_client, container_id: str) -> dict:
    """Seccomp and no_new_privs of the container's first process as the host kernel sees it
    (for runsc that is gVisor's sandbox process, which filters its own host syscalls)."""
    pid = docker_client.api.inspect_container(container_id)["State"]["Pid"]
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {"seccomp": fields["Seccomp"].strip(), "no_new_privs": fields["NoNewPrivs"].strip()}


def host_cgroup_limits(container_id: str) -> dict:
    """The limits the host kernel enforces on the container's cgroup (v1 or v2 layout)."""
    base = Path("/sys/fs/cgroup")
    v2 = [base / "system.slice" / f"docker-{container_id}.scope", base / "docker" / container_id]
    for group in v2:
        if (group / "memory.max").exists():
            quota, period = (group / "cpu.max").read_text().split()
            return {
                "memory": int((group / "memory.max").read_text()),
                "pids": int((group / "pids.max").read_text()),
                "cpus": int(quota) / int(period),
            }

    def v1(controller: str, name: str) -> int:
        return int((base / controller / "docker" / container_id / name).read_text())

    return {
        "memory": v1("memory", "memory.limit_in_bytes"),
        "pids": v1("pids", "pids.max"),
        "cpus": v1("cpu", "cpu.cfs_quota_us") / v1("cpu", "cpu.cfs_period_us"),
    }


def test_only_loopback_interface(facts):
    assert facts["interfaces"] == ["lo"]


def test_runs_as_non_root(facts):
    assert facts["uid"] != 0 and facts["gid"] != 0


def test_root_filesystem_is_read_only(facts):
    assert not facts["root_writable"] and not facts["usr_writable"]


def test_tmp_and_home_are_writable_and_capped(facts):
    assert facts["tmp_writable"] and facts["home_writable"]
    assert 0 < facts["tmp_size"] <= 256 * 1024**2


def test_all_capabilities_dropped(facts):
    assert int(facts["cap_eff"], 16) == 0
    assert int(facts["cap_bnd"], 16) == 0


def test_no_new_privileges(facts):
    assert facts["no_new_privs_prctl"] == 1  # PR_GET_NO_NEW_PRIVS, asked from inside
    assert facts["host"]["no_new_privs"] == "1"


def test_seccomp_filter_in_force(facts):
    # 2 = filter mode; "0" would mean unconfined.  Under runsc the kernel's syscalls are
    # served by gVisor's sentry, whose host process runs under its own seccomp filter.
    assert facts["host"]["seccomp"] == "2"
    if facts["runtime"] == "runc":
        assert facts["seccomp"] == "2"


def test_resource_limits_enforced_by_host(facts):
    limits = {k: facts["host"][k] for k in ("memory", "pids", "cpus")}
    assert limits == {"memory": 1024**3, "pids": 256, "cpus": pytest.approx(1.0)}


def test_resource_limits_seen_inside(facts):
    if facts["runtime"] != "runc":
        # gVisor shows no host cgroup files inside; the limits are checked from the host above
        assert facts["pids_max"] is None
        return
    assert facts["pids_max"] == "256"
    assert int(facts["memory_max"]) == 1024**3
    quota, period = facts["cpu_max"].split()
    assert int(quota) / int(period) == pytest.approx(1.0)


def test_host_environment_does_not_leak(facts):
    assert "KS_TEST_SECRET" not in facts["env"]
    assert "hunter2-host-secret" not in json.dumps(facts["env"])
    # nothing that names the host user's world either
    for name in ("DOCKER_HOST", "SSH_AUTH_SOCK", "JUPYTER_PATH", "PWD", "USER"):
        assert name not in facts["env"], name


def test_no_docker_socket_and_own_hostname(facts):
    assert facts["docker_sock"] == []
    assert facts["hostname"] == "sandbox"


def test_engine_sees_hardened_host_config(
    jupyter_path, kernel_image, docker_client, leak_check, runtime
):
    """The engine's own record of the container agrees with what the kernel saw."""
    with sandbox_kernel(runtime_kernel(runtime)) as (km, _kc):
        attrs = docker_client.api.inspect_container(km.provisioner.container_id)
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert not any("seccomp" in opt and "unconfined" in opt for opt in host["SecurityOpt"])
    assert host["Privileged"] is False
    assert not any("docker.sock" in bind for bind in host["Binds"])
    labels = attrs["Config"]["Labels"]
    assert labels["io.kernel-sandbox.kernel-id"] == km.kernel_id
    assert labels["io.kernel-sandbox.owner-pid"] == str(os.getpid())
    assert "io.kernel-sandbox.created" in labels


def test_outbound_connection_to_host_listener_fails(
    jupyter_path, kernel_image, leak_check, runtime
):
    """A listener on the Docker bridge gateway is unreachable from inside."""
    import socket as pysocket

    gateway = bridge_gateway()
    server = pysocket.socket()
    server.bind((gateway, 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        with sandbox_kernel(runtime_kernel(runtime)) as (_km, kc):
            out = run_cell(
                kc,
                (
                    "import socket\n"
                    "s = socket.socket(); s.settimeout(3)\n"
                    f"try:\n    s.connect(('{gateway}', {port})); print('CONNECTED')\n"
                    "except OSError as e:\n    print('refused', e.errno)\n"
                ),
            )
    finally:
        server.close()
    assert "CONNECTED" not in out["stdout"]
    assert "refused" in out["stdout"]


def test_runsc_kernel_runs_on_gvisor_kernel(jupyter_path, kernel_image, leak_check):
    """Under runsc the kernel sees gVisor's application kernel, not the host's Linux."""
    host_version = open("/proc/version").read()
    with sandbox_kernel(runtime_kernel("runsc")) as (km, kc):
        out = run_cell(
            kc, "print(open('/proc/version').read()); import os; print(os.uname().release)"
        )
        assert km.provisioner.policy.runtime == "runsc"
    assert out["stdout"].split("\n")[0] != host_version.strip()
    assert "4.4.0" in out["stdout"]  # the version gVisor reports

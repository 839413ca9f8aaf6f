"""The hardened defaults, each checked from inside a real sandboxed kernel."""

from __future__ import annotations

import json
import os

import pytest

from kernels import bridge_gateway, run_cell, sandbox_kernel

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
}
print(json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(jupyter_path, kernel_image) -> dict:
    os.environ["KS_TEST_SECRET"] = "hunter2-host-secret"
    try:
        with sandbox_kernel() as (_km, kc):
            out = run_cell(kc, FACTS)
    finally:
        del os.environ["KS_TEST_SECRET"]
    assert out["status"] == "ok", out
    return json.loads(out["stdout"])


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
    assert facts["no_new_privs"] == "1"


def test_default_seccomp_profile_in_force(facts):
    assert facts["seccomp"] == "2"  # 2 = filter mode; "0" would mean unconfined


def test_resource_limits(facts):
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


def test_engine_sees_hardened_host_config(jupyter_path, kernel_image, docker_client, leak_check):
    """The engine's own record of the container agrees with what the kernel saw."""
    with sandbox_kernel() as (km, _kc):
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


def test_outbound_connection_to_host_listener_fails(jupyter_path, kernel_image, leak_check):
    """A listener on the Docker bridge gateway is unreachable from inside."""
    import socket as pysocket

    gateway = bridge_gateway()
    server = pysocket.socket()
    server.bind((gateway, 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        with sandbox_kernel() as (_km, kc):
            out = run_cell(kc, (
                "import socket\n"
                "s = socket.socket(); s.settimeout(3)\n"
                f"try:\n    s.connect(('{gateway}', {port})); print('CONNECTED')\n"
                "except OSError as e:\n    print('refused', e.errno)\n"
            ))
    finally:
        server.close()
    assert "CONNECTED" not in out["stdout"]
    assert "refused" in out["stdout"]

"""The Kubernetes backend against a real cluster (Kubernetes 1.20, tests/support/kube.py):
kernels as hardened pods driven by jupyter_client, nbclient and `kernel-sandbox run`, their
traffic captured on the pod bridge, the errors of pods that cannot start, orphans reaped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager, KernelManager
from nbclient import NotebookClient
from support import IMAGE, REPO
from support.kernels import make_kernelspec, run_cell

from kernel_sandbox.errors import EngineUnavailable, KernelStartError
from kernel_sandbox.kube.api import NETWORK_POLICIES, PODS, SECRETS, SERVICES, KubeApi
from kernel_sandbox.kube.podspec import KUBE_PREFIX
from kernel_sandbox.kube.reap import pending, sweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def kube(kube_cluster) -> Iterator[KubeApi]:
    api = KubeApi(kube_cluster.namespace, str(kube_cluster.kubeconfig))
    yield api
    api.close()


def kube_spec(kube_cluster, **config) -> str:
    """A kernelspec whose kernels are pods in the test session's namespace."""
    values = {
        "backend": "kubernetes",
        "image": IMAGE,
        "memory_limit": "512m",
        "kube_namespace": kube_cluster.namespace,
        "kube_config": str(kube_cluster.kubeconfig),
        "kube_image_pull_policy": "Never",
        "kube_request_ratio": 0.1,
        **config,
    }
    return make_kernelspec(f"kube-{uuid.uuid4().hex[:8]}", values)


def objects_of(api: KubeApi, kernel_id: str) -> list[str]:
    """Every pod, Secret and NetworkPolicy of ``kernel_id`` that still exists (not deleting)."""
    selector = f"{KUBE_PREFIX}kernel-id={kernel_id}"
    found = []
    for kind in (PODS, SECRETS, NETWORK_POLICIES, SERVICES):
        for obj in asyncio.run(api.list(kind, selector)):
            if kind == PODS and obj["metadata"].get("deletionTimestamp"):
                continue  # being deleted (the kubelet confirms it a moment later)
            found.append(f"{kind}/{obj['metadata']['name']}")
    return found


def wait_gone(api: KubeApi, kernel_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (left := objects_of(api, kernel_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind: {left}"


def pod_of(km) -> str:
    name = km.provisioner.kube.pod_name
    assert name
    return name


PROBE = textwrap.dedent(
    """
    import json, os
    lines = open("/proc/self/status").read().splitlines()
    status = dict(line.split(":\\t", 1) for line in lines if ":\\t" in line)
    try:
        open("/usr/probe", "w"); root_writable = True
    except OSError:
        root_writable = False
    mounts = [line.split() for line in open("/proc/mounts").read().splitlines()]
    print(json.dumps({
        "uid": os.getuid(), "gid": os.getgid(),
        "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
        "seccomp": status["Seccomp"].strip(), "root_writable": root_writable,
        "tmp_tmpfs": any(m[1] == "/tmp" and m[2] == "tmpfs" for m in mounts),
        "token": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"),
        "service_env": sorted(k for k in os.environ if k.endswith("_SERVICE_HOST")),
        "resolv": open("/etc/resolv.conf").read(),
        "hostname": os.uname().nodename,
    }))
    """
)


def test_a_kernel_runs_in_a_hardened_pod_and_leaves_nothing(kube_cluster, kube):
    spec = kube_spec(kube_cluster)
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    kernel_id = km.kernel_id
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        assert km.connection_info if hasattr(km, "connection_info") else True
        info = km.get_connection_info()
        assert info["transport"] == "tcp" and info["curve_publickey"]
        assert info["ip"] == km.provisioner.kube.address  # the kernel's Service
        assert info["ip"] != km.provisioner.kube.pod_ip
        seen = json.loads(run_cell(kc, PROBE)["stdout"])
        assert seen["uid"] == 1000 and seen["gid"] == 1000
        assert seen["cap_eff"] == "0000000000000000"
        assert seen["no_new_privs"] == "1"
        assert seen["seccomp"] == "2"  # a filter: RuntimeDefault
        assert seen["root_writable"] is False
        assert seen["tmp_tmpfs"] is True
        assert seen["token"] is False
        # no service links: only the API server's own address, which the kubelet always sets
        assert seen["service_env"] == ["KUBERNETES_SERVICE_HOST"]
        assert "nameserver 127.0.0.1" in seen["resolv"]
        assert seen["hostname"] == "sandbox"
        name = pod_of(km)
        pod = asyncio.run(kube.get(PODS, name))
        assert pod is not None and pod["spec"]["automountServiceAccountToken"] is False
        secret = asyncio.run(kube.get(SECRETS, name))
        policy = asyncio.run(kube.get(NETWORK_POLICIES, name))
        assert secret is not None and policy is not None
        for obj in (secret, policy):  # deleted with the pod by the cluster, whoever deletes it
            (ref,) = obj["metadata"]["ownerReferences"]
            assert ref["kind"] == "Pod" and ref["uid"] == pod["metadata"]["uid"]
        # no egress rule at all (the server leaves the empty list out)
        assert not policy["spec"].get("egress") and "Egress" in policy["spec"]["policyTypes"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"][0]["ipBlock"]["cidr"].endswith("/32")
        key = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
        assert key not in json.dumps(pod)  # the secrets are not in the pod spec
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=False)
    wait_gone(kube, kernel_id)


def test_interrupt_and_restart_a_pod_kernel(kube_cluster, kube):
    spec = kube_spec(kube_cluster)
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    kernel_id = km.kernel_id
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("import time\ntime.sleep(120)")
        time.sleep(2)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        run_cell(kc, "marker = 'first pod'")
        first, address = pod_of(km), km.get_connection_info()["ip"]
        km.restart_kernel(now=True)
        second = pod_of(km)
        assert second != first
        assert km.get_connection_info()["ip"] == address  # the Service's: clients stay put
        # the client made before the restart (as Jupyter Server's channels are) reconnects
        deadline = time.monotonic() + 60
        while True:
            try:
                seen = run_cell(kc, "print(6 * 7, 'marker' in globals())", timeout=10)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the old client never reached the new pod"
        assert seen["stdout"].split() == ["42", "False"]  # a new kernel, reached the same way
        kc.stop_channels()
        deadline = time.monotonic() + 60
        while asyncio.run(kube.get(PODS, first)) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert asyncio.run(kube.get(PODS, first)) is None
    finally:
        km.shutdown_kernel(now=True)
    wait_gone(kube, kernel_id)


def test_nbclient_runs_a_notebook_in_a_pod(kube_cluster, kube):
    spec = kube_spec(kube_cluster)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import socket\nhost = socket.gethostname()"),
        nbformat.v4.new_code_cell("print(host, sum(range(10)))"),
    ]
    client = NotebookClient(nb, kernel_name=spec, timeout=60, startup_timeout=120)
    client.execute()
    assert nb.cells[1].outputs[0]["text"].strip() == "sandbox 45"
    # nbclient shut its kernel down: nothing of the namespace's kernels is left running
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [
            p["metadata"]["name"]
            for p in asyncio.run(kube.list(PODS, f"{KUBE_PREFIX}kernelspec={spec}"))
            if not p["metadata"].get("deletionTimestamp")
        ]
        if not live:
            break
        time.sleep(0.5)
    assert not live


def test_kernel_sandbox_run_against_pods(kube_cluster, tmp_path):
    spec = kube_spec(kube_cluster)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": spec, "display_name": spec, "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "caps = open('/proc/self/status').read()\n"
            "assert 'CapEff:\\t0000000000000000' in caps\n"
            "print('in a pod')"
        )
    ]
    path = tmp_path / "pod.ipynb"
    nbformat.write(nb, path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_sandbox.cli",
            "run",
            str(path),
            "--kernel",
            spec,
            "--inplace",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = nbformat.read(path, as_version=4)
    assert "in a pod" in done.cells[0].outputs[0]["text"]


def interface_to(ip: str) -> str:
    """The interface this host reaches ``ip`` through (the pod bridge for a pod)."""
    out = subprocess.run(
        ["ip", "-o", "route", "get", ip], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[out.index("dev") + 1]


class Capture:
    """Every frame on one interface (AF_PACKET, root), kept in memory: a capture without
    tcpdump."""

    def __init__(self, interface: str):
        self.frames = bytearray()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                self.frames += self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> bytes:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        return bytes(self.frames)


def test_the_pod_traffic_on_the_bridge_carries_no_plaintext(kube_cluster):
    spec = kube_spec(kube_cluster)
    canary = f"CANARY{uuid.uuid4().hex}"
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    capture = None
    try:
        # captured from before the clients connect: their greetings and every message
        capture = Capture(interface_to(km.provisioner.kube.pod_ip))
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        assert canary * 3 in run_cell(kc, f"word = {canary!r}\nprint(word * 3)")["stdout"]
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
        wire = capture.stop() if capture is not None else b""
    assert len(wire) > 2000
    assert canary.encode() not in wire
    assert b"CURVE" in wire  # the kernel's ZMTP greetings were captured: the mechanism is Curve
    for plain in (b"execute_request", b"hmac-sha256", b"print(word"):
        assert plain not in wire


def test_an_image_the_node_lacks_fails_at_once_and_leaves_nothing(kube_cluster, kube):
    spec = kube_spec(kube_cluster, image="kernel-sandbox/python:no-such-tag")
    km = KernelManager(kernel_name=spec)
    started = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        km.start_kernel()
    assert time.monotonic() - started < 45
    message = str(info.value)
    assert "ErrImageNeverPull" in message and "kernel-sandbox/python:no-such-tag" in message
    wait_gone(kube, km.kernel_id)


def test_a_pod_that_cannot_be_scheduled_says_why_within_the_launch_timeout(kube_cluster, kube):
    spec = kube_spec(kube_cluster, memory_limit="900g", kube_request_ratio=1.0)
    from traitlets.config import Config

    config = Config()
    config.DockerSandboxProvisioner.launch_timeout = 8.0
    km = KernelManager(kernel_name=spec, config=config)
    started = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        km.start_kernel()
    assert time.monotonic() - started < 40
    assert "Insufficient memory" in str(info.value) and "launch_timeout" in str(info.value)
    wait_gone(kube, km.kernel_id)


OWNER_SCRIPT = """
import sys, time
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
print(km.kernel_id, km.provisioner.kube.pod_name, flush=True)
time.sleep(600)
"""


def test_pods_of_a_killed_owner_are_reaped(kube_cluster, kube, tmp_path):
    spec = kube_spec(kube_cluster)
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    owner = subprocess.Popen(
        [sys.executable, str(script), spec],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = owner.stdout.readline()  # type: ignore[union-attr]
        kernel_id, pod = line.split()
        assert asyncio.run(kube.get(PODS, pod)) is not None
        assert pod not in asyncio.run(sweep(kube, dry_run=True)).pods  # its owner lives
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    report = asyncio.run(sweep(kube))
    assert pod in report.pods
    assert f"secrets/{pod}" in report.others or asyncio.run(kube.get(SECRETS, pod)) is None
    wait_gone(kube, kernel_id)


class ApiRelay:
    """A TCP relay to the API server that a test can cut and restore (the server itself is
    shared with other tests)."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def restore(self) -> None:
        self.up = True


@pytest.fixture
def relayed_kubeconfig(kube_cluster, tmp_path) -> Iterator[tuple[Path, ApiRelay]]:
    import yaml

    config = yaml.safe_load(Path(kube_cluster.kubeconfig).read_text())
    server = config["clusters"][0]["cluster"]["server"]
    hostport = server.split("://", 1)[1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    relay = ApiRelay(host, int(port))
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
    path = tmp_path / "relayed.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    yield path, relay
    relay.listener.close()


def test_an_unreachable_api_server_gives_clear_errors_and_leaks_nothing(
    kube_cluster, kube, relayed_kubeconfig
):
    path, relay = relayed_kubeconfig
    spec = kube_spec(kube_cluster, kube_config=str(path), kube_api_timeout=3.0)
    # 1. down before the start: a clear error, nothing made
    relay.cut()
    km = KernelManager(kernel_name=spec)
    with pytest.raises(EngineUnavailable, match="does not answer"):
        km.start_kernel()
    assert objects_of(kube, km.kernel_id) == []
    # 2. down while a kernel runs: it keeps running (its traffic does not pass the API
    # server), poll does not call it dead, and shutdown does not raise
    relay.restore()
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    kernel_id = km.kernel_id
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    relay.cut()
    assert km.is_alive()
    assert "still here" in run_cell(kc, "print('still here')")["stdout"]
    kc.stop_channels()
    km.shutdown_kernel(now=True)  # logs what it could not delete; never raises
    api = km.provisioner.kube.api if km.provisioner else None
    assert objects_of(kube, kernel_id)  # still there: the server was away
    # 3. back: the next start of this process deletes what was left, then starts
    relay.restore()
    km2 = KernelManager(kernel_name=spec)
    km2.start_kernel()
    try:
        wait_gone(kube, kernel_id)
    finally:
        km2.shutdown_kernel(now=True)
    wait_gone(kube, km2.kernel_id)
    assert api is None or pending(api) == []


def test_several_async_kernels_start_at_once(kube_cluster, kube):
    spec = kube_spec(kube_cluster)

    async def main() -> list[str]:
        managers = [AsyncKernelManager(kernel_name=spec) for _ in range(3)]
        await asyncio.gather(*(km.start_kernel() for km in managers))
        try:
            ips = {km.get_connection_info()["ip"] for km in managers}
            assert len(ips) == 3
        finally:
            await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))
        return [km.kernel_id for km in managers]

    for kernel_id in asyncio.run(main()):
        wait_gone(kube, kernel_id)


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), "KERNEL_SANDBOX_SERVICE": "off"},
    )


def test_ps_stop_gc_and_doctor_see_kernel_pods(kube_cluster, kube):
    spec = kube_spec(kube_cluster)
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    try:
        name = pod_of(km)
        listed = cli("ps", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [r for r in json.loads(listed.stdout) if r["container"] == f"pod/{name}"]
        assert [r["kernel_id"] for r in rows] == [km.kernel_id]
        assert rows[0]["kernelspec"] == spec and rows[0]["state"] == "running"
        doctor = cli("doctor", "--json", timeout=300)
        checks = {(c["area"], c["name"]): c for c in json.loads(doctor.stdout)}
        assert checks[("kubernetes", "rights")]["status"] == "ok"
        assert checks[("kubernetes", "enforcement")]["status"] == "warn"
        stopped = cli("stop", km.kernel_id)
        assert stopped.returncode == 0, stopped.stderr
        assert f"pod {name} deleted" in stopped.stdout
        deadline = time.monotonic() + 30
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not km.is_alive()  # the owner sees its kernel gone
        swept = cli("gc", "--dry-run")
        assert swept.returncode == 0 and "orphaned pod(s) in namespace" in swept.stdout
    finally:
        km.shutdown_kernel(now=True)
    wait_gone(kube, km.kernel_id)

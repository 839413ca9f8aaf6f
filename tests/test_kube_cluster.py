"""The test Kubernetes cluster itself (.ci/k8s, tests/support/kube.py): a hardened pod from
the locally built kernel image runs on it, and exec works through the Python client.

This checks the cluster the Kubernetes backend's tests stand on, not the backend.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from kubernetes import client
from support.kube import KERNEL_UID, KubeCluster, exec_in, hardened_pod, wait_running

pytestmark = pytest.mark.integration


@pytest.fixture
def sandbox_pod(kube_cluster: KubeCluster):
    core = kube_cluster.core()
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    core.create_namespaced_pod(kube_cluster.namespace, hardened_pod(name))
    yield core, name
    core.delete_namespaced_pod(name, kube_cluster.namespace, grace_period_seconds=0)


def test_node_is_ready_and_runs_1_20(kube_cluster: KubeCluster) -> None:
    version = client.VersionApi(kube_cluster.api_client()).get_code()
    assert (version.major, version.minor) == ("1", "20")
    nodes = kube_cluster.core().list_node().items
    assert len(nodes) == 1
    if kube_cluster.managed:
        assert nodes[0].metadata.name == kube_cluster.node_name
        assert nodes[0].status.node_info.container_runtime_version.startswith("docker://")


def test_hardened_pod_runs_the_kernel_image_and_exec_works(
    kube_cluster: KubeCluster, sandbox_pod
) -> None:
    core, name = sandbox_pod
    namespace = kube_cluster.namespace
    wait_running(core, namespace, name)
    out = exec_in(
        core,
        namespace,
        name,
        [
            "python3",
            "-c",
            "import os, ipykernel\n"
            "print(os.getuid(), os.getgid())\n"
            "try:\n"
            "    open('/probe', 'w')\n"
            "    print('root-fs-writable')\n"
            "except OSError as e:\n"
            "    print('root-fs', e.errno)\n"
            "status = open('/proc/self/status').read().splitlines()\n"
            "print('cap', [l.split()[1] for l in status if l.startswith('CapEff')][0])\n"
            "print('sa-token', os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount'))\n"
            "print('ipykernel', ipykernel.__version__)\n",
        ],
    )
    lines = out.splitlines()
    assert lines[0] == f"{KERNEL_UID} {KERNEL_UID}", out
    assert lines[1] == "root-fs 30", out  # EROFS: the root file system is read-only
    assert lines[2] == "cap 0000000000000000", out
    assert lines[3] == "sa-token False", out
    assert lines[4].startswith("ipykernel "), out


def test_pod_that_asks_for_root_is_refused_by_the_kubelet(kube_cluster: KubeCluster) -> None:
    """runAsNonRoot is enforced on this cluster (an image run as root must not start)."""
    core = kube_cluster.core()
    name = f"asroot-{uuid.uuid4().hex[:8]}"
    pod = hardened_pod(name)
    pod.spec.security_context = client.V1PodSecurityContext(run_as_non_root=True, run_as_user=0)
    core.create_namespaced_pod(kube_cluster.namespace, pod)
    try:
        deadline = time.monotonic() + 60
        reason = None
        while time.monotonic() < deadline and reason is None:
            status = core.read_namespaced_pod(name, kube_cluster.namespace).status
            for cs in status.container_statuses or ():
                if cs.state.waiting and cs.state.waiting.reason == "CreateContainerConfigError":
                    reason = cs.state.waiting.message
                assert cs.state.running is None, "a runAsUser 0 pod started despite runAsNonRoot"
            time.sleep(0.5)
        assert reason and "non-root" in reason, reason
    finally:
        core.delete_namespaced_pod(name, kube_cluster.namespace, grace_period_seconds=0)


def test_pod_network_host_to_pod_pod_to_pod_and_the_api_service(
    kube_cluster: KubeCluster, sandbox_pod
) -> None:
    """What the backend needs from the network: this host reaches a pod's port (the kernel's
    ZeroMQ sockets), pods reach each other and the API server's ClusterIP (kube-proxy)."""
    core, client_pod = sandbox_pod
    namespace = kube_cluster.namespace
    server = f"listen-{uuid.uuid4().hex[:8]}"
    pod = hardened_pod(server)
    pod.spec.containers[0].command = [
        "python3",
        "-c",
        "import socket\n"
        "s = socket.create_server(('0.0.0.0', 8000))\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'pong'); c.close()\n",
    ]
    core.create_namespaced_pod(namespace, pod)
    try:
        wait_running(core, namespace, server)
        wait_running(core, namespace, client_pod)
        ip = core.read_namespaced_pod(server, namespace).status.pod_ip
        api_ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
        deadline = time.monotonic() + 30
        while True:  # the server binds a moment after the container starts
            try:
                with socket.create_connection((ip, 8000), timeout=5) as conn:
                    assert conn.recv(4) == b"pong"
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        probe = (
            "import socket, sys\n"
            "for host, port in ((sys.argv[1], 8000), (sys.argv[2], 443)):\n"
            "    s = socket.create_connection((host, port), timeout=5); print('ok', port)\n"
        )
        out = exec_in(core, namespace, client_pod, ["python3", "-c", probe, ip, api_ip])
        assert out.split("\n")[:2] == ["ok 8000", "ok 443"], out
    finally:
        core.delete_namespaced_pod(server, namespace, grace_period_seconds=0)

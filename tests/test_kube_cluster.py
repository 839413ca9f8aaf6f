"""The test Kubernetes cluster itself (.ci/k8s, tests/support/kube.py): a hardened pod from
the locally built kernel image runs on it, and exec works through the Python client.

This checks the cluster the Kubernetes backend's tests stand on, not the backend.
"""

from __future__ import annotations

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

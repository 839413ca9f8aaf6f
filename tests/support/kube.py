"""A real Kubernetes 1.20 cluster for the tests: the ``kube_cluster`` session fixture.

The cluster is the one ``.ci/k8s/`` builds and starts on this machine (single node, kubelet on
the local Docker engine through dockershim, so ``imagePullPolicy: Never`` pods run the
locally built images). The fixture

- uses the cluster ``KERNEL_SANDBOX_KUBECONFIG`` names, if set (it never starts or stops one);
- otherwise uses the machine's cluster when it runs, or starts it (``.ci/k8s/up.sh``, which
  builds the binaries first when the cache is empty: about 6 minutes on 2 cores, once);
- waits until the node is Ready and the session's namespace has its default service account;
- at the end deletes its namespace, and stops the cluster only when a fixture started it and
  no other test session on the machine still uses it (a lease per pytest process), unless
  ``KS_K8S_KEEP=1`` asks to leave it running for the next run.

A machine where the cluster cannot be built (not root, no Docker engine, no deb-src mirror)
reports it through ``unavailable()``: a failure in CI, a skip elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from support import IMAGE, REPO, unavailable

K8S_SCRIPTS = REPO / ".ci" / "k8s"
STATE = Path(os.environ.get("KS_K8S_STATE", "/var/lib/kernel-sandbox/k8s"))
CACHE = Path(os.environ.get("KS_K8S_CACHE", "/var/cache/kernel-sandbox/k8s"))
EXIT_UNAVAILABLE = 3  # .ci/k8s scripts: this machine cannot build or run the cluster
START_TIMEOUT = 1800.0  # a cold build and start on a loaded 2-core machine
KERNEL_UID = 1000  # kernel_sandbox.inside.contract.KERNEL_UID, the image's user


@dataclass
class KubeCluster:
    """What a test needs to talk to the cluster.

    ``namespace`` belongs to this test session (deleted at its end); ``pod_gateway`` is the
    host's address on the pod bridge (where a test may start a listener pods can reach) and
    ``node_ip``/``node_name`` the node's; these three are None on a cluster named by
    ``KERNEL_SANDBOX_KUBECONFIG``, which this fixture does not manage.
    """

    kubeconfig: Path
    namespace: str
    managed: bool
    node_name: str | None = None
    node_ip: str | None = None
    pod_gateway: str | None = None
    pod_cidr: str | None = None
    _api: client.ApiClient | None = field(default=None, repr=False)

    def api_client(self) -> client.ApiClient:
        """A client for the cluster, admin rights (shared by the session's tests)."""
        if self._api is None:
            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client())

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the cluster (Debian's 1.20 kubectl when the cache has it)."""
        own = CACHE / "root/usr/bin/kubectl"
        exe = str(own) if own.exists() else "kubectl"
        return subprocess.run(
            [exe, "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )


def _script(name: str, *, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(K8S_SCRIPTS / name)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cluster_facts() -> dict[str, str]:
    """Node name/address, pod CIDR and gateway as common.sh computes them."""
    out = subprocess.run(
        [
            "bash",
            "-c",
            f". {K8S_SCRIPTS}/common.sh; "
            'echo "$K8S_NODE_NAME $K8S_NODE_IP $K8S_POD_GATEWAY $K8S_POD_CIDR"'
            ' "$K8S_ADMIN_KUBECONFIG"',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return dict(zip(("node", "ip", "gateway", "cidr", "kubeconfig"), out, strict=True))


class _Leases:
    """One file per pytest process using the machine's cluster, so the last one out stops it."""

    def __init__(self) -> None:
        self.dir = STATE / "leases"
        self.mine = self.dir / str(os.getpid())
        self.started_marker = STATE / "run" / "started-by-fixture"

    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def take(self) -> None:
        fd = self._locked()
        try:
            self.mine.write_text("")
        finally:
            os.close(fd)

    def release(self, stop_if_last: Callable[[], None]) -> bool:
        """Drop this process's lease; if no live process holds one any more, call
        ``stop_if_last`` (under the lock, so a session starting meanwhile waits for it) and
        return True."""
        fd = self._locked()
        try:
            self.mine.unlink(missing_ok=True)
            for lease in self.dir.iterdir():
                if not lease.name.isdigit():
                    continue
                try:
                    os.kill(int(lease.name), 0)
                    return False
                except ProcessLookupError:
                    lease.unlink(missing_ok=True)
            stop_if_last()
            return True
        finally:
            os.close(fd)


def _wait_ready(cluster: KubeCluster, timeout: float = 180.0) -> None:
    """Node Ready and the session namespace's default service account, or fail."""
    core = cluster.core()
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            nodes = core.list_node().items
            ready = [
                n.metadata.name
                for n in nodes
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or ())
            ]
            if not ready:
                last = f"no Ready node among {[n.metadata.name for n in nodes]}"
            else:
                try:
                    core.create_namespace(
                        client.V1Namespace(
                            metadata=client.V1ObjectMeta(
                                name=cluster.namespace,
                                labels={"kernel-sandbox.test/session": str(os.getpid())},
                            )
                        )
                    )
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                try:
                    core.read_namespaced_service_account("default", cluster.namespace)
                    return
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    last = f"no default service account in {cluster.namespace} yet"
        except ApiException as exc:
            last = f"API error {exc.status}: {exc.reason}"
        except OSError as exc:  # urllib3 connection errors are OSErrors
            last = f"API unreachable: {exc}"
        time.sleep(0.5)
    pytest.fail(f"Kubernetes cluster {cluster.kubeconfig} not ready after {timeout:.0f}s: {last}")


def _delete_namespace(cluster: KubeCluster) -> None:
    core = cluster.core()
    try:
        core.delete_collection_namespaced_pod(cluster.namespace, grace_period_seconds=0)
        core.delete_namespace(cluster.namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def start_machine_cluster() -> bool:
    """Start the machine's cluster if it is not running; True if this call started it."""
    if os.geteuid() != 0:
        unavailable("the test Kubernetes cluster needs root (kubelet, iptables, cgroups)")
    if not (K8S_SCRIPTS / "up.sh").exists():
        unavailable(f"{K8S_SCRIPTS}/up.sh is missing")
    proc = _script("up.sh", timeout=START_TIMEOUT)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
    if proc.returncode == EXIT_UNAVAILABLE:
        unavailable(f"the test Kubernetes cluster cannot be built or run here:\n{tail}")
    if proc.returncode != 0:
        pytest.fail(f".ci/k8s/up.sh failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout.strip().endswith("cluster: started")


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """A Ready single-node Kubernetes 1.20 cluster and a namespace of this session."""
    namespace = f"ks-test-{os.getpid()}"
    external = os.environ.get("KERNEL_SANDBOX_KUBECONFIG")
    if external:
        cluster = KubeCluster(Path(external), namespace, managed=False)
        _wait_ready(cluster)
        yield cluster
        _delete_namespace(cluster)
        cluster.api_client().close()
        return

    leases = _Leases()
    leases.take()
    try:
        if start_machine_cluster():
            leases.started_marker.write_text(str(os.getpid()))
        facts = _cluster_facts()
        cluster = KubeCluster(
            Path(facts["kubeconfig"]),
            namespace,
            managed=True,
            node_name=facts["node"],
            node_ip=facts["ip"],
            pod_gateway=facts["gateway"],
            pod_cidr=facts["cidr"],
        )
        _wait_ready(cluster)
        yield cluster
        _delete_namespace(cluster)
        cluster.api_client().close()
    finally:
        leases.release(stop_if_last=lambda: _stop_if_started_by_a_fixture(leases))


def _stop_if_started_by_a_fixture(leases: _Leases) -> None:
    if not leases.started_marker.exists() or os.environ.get("KS_K8S_KEEP"):
        return
    proc = _script("down.sh", timeout=300)
    leases.started_marker.unlink(missing_ok=True)
    if proc.returncode != 0:
        print(f".ci/k8s/down.sh exit {proc.returncode}:\n{proc.stdout}{proc.stderr}")


# --- pods for tests -----------------------------------------------------------------------


def hardened_pod(name: str, image: str = IMAGE) -> client.V1Pod:
    """A pod shaped like a sandbox: non-root, read-only root fs, nothing extra."""
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"kernel-sandbox.test": "cluster"}),
        spec=client.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            enable_service_links=False,
            termination_grace_period_seconds=1,
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=KERNEL_UID, run_as_group=KERNEL_UID
            ),
            containers=[
                client.V1Container(
                    name="main",
                    image=image,
                    image_pull_policy="Never",
                    command=["sleep", "600"],
                    security_context=client.V1SecurityContext(
                        read_only_root_filesystem=True,
                        allow_privilege_escalation=False,
                        capabilities=client.V1Capabilities(drop=["ALL"]),
                    ),
                    resources=client.V1ResourceRequirements(
                        limits={"memory": "256Mi", "cpu": "500m"}
                    ),
                )
            ],
        ),
    )


def wait_running(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 120) -> None:
    """Wait until the pod runs; fail with its events if it does not."""
    deadline = time.monotonic() + timeout
    pod = None
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase == "Running":
            return
        if pod.status.phase in ("Failed", "Succeeded"):
            break
        time.sleep(0.5)
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    pytest.fail(
        f"pod {namespace}/{name} not Running (phase {pod and pod.status.phase}); events: "
        + "; ".join(f"{e.reason}: {e.message}" for e in events.items)
    )


def exec_in(core: client.CoreV1Api, namespace: str, name: str, argv: list[str]) -> str:
    """Run argv in the pod through the Python client's exec stream; stdout+stderr."""
    return stream(
        core.connect_get_namespaced_pod_exec,
        name,
        namespace,
        command=argv,
        stdout=True,
        stderr=True,
        stdin=False,
        tty=False,
    )

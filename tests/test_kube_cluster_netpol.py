"""NetworkPolicy on the test cluster: accepted, not enforced, and what enforcement would do.

Enforcement is the cluster network plugin's job; this cluster has none that enforces policy.
``support.kube_netpol.PolicyEnforcer`` programs the rules a policy controller would, so these
tests show (1) the policy object alone blocks nothing here, (2) the same pod is blocked once
the emulated controller programs the node, and only by that. The only target is a listener
these tests start on this machine's pod-bridge address.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client
from support import unavailable
from support.kube import KubeCluster, exec_in, hardened_pod, wait_running
from support.kube_netpol import PolicyEnforcer

pytestmark = pytest.mark.integration

CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(); s.settimeout(5)\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2]))); print('CONNECTED', s.recv(16))\n"
    "except OSError as e:\n"
    "    print('FAILED', type(e).__name__)\n"
)


@pytest.fixture
def listener(kube_cluster: KubeCluster) -> Iterator[tuple[str, int]]:
    """A TCP listener on this host's pod-bridge address that greets and closes."""
    if not kube_cluster.managed or not kube_cluster.pod_gateway:
        unavailable("needs the machine's own test cluster (its pod bridge and iptables)")
    srv = socket.create_server((kube_cluster.pod_gateway, 0))
    srv.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[:2]
    stop.set()
    thread.join(5)
    srv.close()


@pytest.fixture
def enforcer(kube_cluster: KubeCluster) -> Iterator[PolicyEnforcer]:
    api = kube_cluster.api_client()
    e = PolicyEnforcer(client.CoreV1Api(api), client.NetworkingV1Api(api))
    yield e
    e.clear()


@pytest.fixture
def labelled_pod(kube_cluster: KubeCluster) -> Iterator[str]:
    core = kube_cluster.core()
    name = f"netpol-{uuid.uuid4().hex[:8]}"
    pod = hardened_pod(name)
    pod.metadata.labels["kernel-sandbox.test/netpol"] = name
    core.create_namespaced_pod(kube_cluster.namespace, pod)
    wait_running(core, kube_cluster.namespace, name)
    yield name
    core.delete_namespaced_pod(name, kube_cluster.namespace, grace_period_seconds=0)


def deny_all_egress(name: str, pod: str) -> client.V1NetworkPolicy:
    return client.V1NetworkPolicy(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1NetworkPolicySpec(
            pod_selector=client.V1LabelSelector(match_labels={"kernel-sandbox.test/netpol": pod}),
            policy_types=["Egress"],
            egress=[],
        ),
    )


def connect_from(kube_cluster: KubeCluster, pod: str, address: tuple[str, int]) -> str:
    host, port = address
    argv = ["python3", "-c", CONNECT, host, str(port)]
    return exec_in(kube_cluster.core(), kube_cluster.namespace, pod, argv).strip()


def test_deny_all_egress_blocks_only_when_the_node_enforces_it(
    kube_cluster: KubeCluster, listener, enforcer: PolicyEnforcer, labelled_pod: str
) -> None:
    assert connect_from(kube_cluster, labelled_pod, listener) == "CONNECTED b'hello'"

    networking = client.NetworkingV1Api(kube_cluster.api_client())
    policy = f"deny-egress-{labelled_pod}"
    networking.create_namespaced_network_policy(
        kube_cluster.namespace, deny_all_egress(policy, labelled_pod)
    )
    try:
        stored = networking.read_namespaced_network_policy(policy, kube_cluster.namespace)
        assert stored.spec.policy_types == ["Egress"] and not stored.spec.egress
        time.sleep(2)  # a controller, if the cluster had one, would have acted by now
        # accepted, not enforced: the cluster's job, and this cluster does not do it
        assert connect_from(kube_cluster, labelled_pod, listener) == "CONNECTED b'hello'"

        selected = enforcer.sync(kube_cluster.namespace)
        assert selected[labelled_pod] == [policy]
        assert connect_from(kube_cluster, labelled_pod, listener) == "FAILED ConnectionRefusedError"

        enforcer.clear()  # the rules, not the policy object, were what blocked it
        assert connect_from(kube_cluster, labelled_pod, listener) == "CONNECTED b'hello'"
    finally:
        networking.delete_namespaced_network_policy(policy, kube_cluster.namespace)


def test_egress_allow_rule_opens_only_its_port(
    kube_cluster: KubeCluster, listener, enforcer: PolicyEnforcer, labelled_pod: str
) -> None:
    """Allowlist mode's shape: egress only to one address and port (e.g. the egress proxy)."""
    host, port = listener
    other = socket.create_server((host, 0))  # a second listener on the same address
    try:
        networking = client.NetworkingV1Api(kube_cluster.api_client())
        policy = deny_all_egress(f"allow-one-{labelled_pod}", labelled_pod)
        policy.spec.egress = [
            client.V1NetworkPolicyEgressRule(
                to=[client.V1NetworkPolicyPeer(ip_block=client.V1IPBlock(cidr=f"{host}/32"))],
                ports=[client.V1NetworkPolicyPort(protocol="TCP", port=port)],
            )
        ]
        networking.create_namespaced_network_policy(kube_cluster.namespace, policy)
        try:
            enforcer.sync(kube_cluster.namespace)
            assert connect_from(kube_cluster, labelled_pod, listener) == "CONNECTED b'hello'"
            blocked = connect_from(kube_cluster, labelled_pod, other.getsockname()[:2])
            assert blocked == "FAILED ConnectionRefusedError"
        finally:
            networking.delete_namespaced_network_policy(
                policy.metadata.name, kube_cluster.namespace
            )
    finally:
        other.close()

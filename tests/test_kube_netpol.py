"""The NetworkPolicy a kernel pod gets, enforced: by the stand-in policy controller of the
test cluster (tests/support/kube_netpol.py, what a plugin such as kube-router programs), since
the 1.20 cluster stores policies but enforces none. The kernel cannot reach a listener on this
host; its owner still reaches the kernel. The only target is a listener this test starts on
this host's pod-bridge address."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from jupyter_client.manager import KernelManager
from kubernetes import client
from support import unavailable
from support.kernels import run_cell
from support.kube_netpol import PolicyEnforcer
from test_kube import interface_to, kube_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CONNECT = """
import socket
try:
    with socket.create_connection(({host!r}, {port}), timeout=3) as s:
        print("CONNECTED", s.recv(5))
except OSError as exc:
    print("FAILED", type(exc).__name__)
"""


def address_of(interface: str) -> str:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", interface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[out.index("inet") + 1].split("/")[0]


@pytest.fixture
def enforcer(kube_cluster) -> Iterator[PolicyEnforcer]:
    api = kube_cluster.api_client()
    e = PolicyEnforcer(client.CoreV1Api(api), client.NetworkingV1Api(api))
    yield e
    e.clear()


def test_the_kernels_policy_denies_its_egress_and_admits_its_owner(kube_cluster, enforcer):
    km = KernelManager(kernel_name=kube_spec(kube_cluster))
    km.start_kernel()
    server = None
    try:
        interface = interface_to(km.provisioner.kube.pod_ip)
        if interface == "lo" or not interface:
            unavailable("the pods are not on a bridge of this machine")
        server = socket.create_server((address_of(interface), 0))
        server.settimeout(0.5)
        host, port = server.getsockname()[:2]
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                with conn:
                    conn.sendall(b"hello")

        threading.Thread(target=serve, daemon=True).start()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        probe = CONNECT.format(host=host, port=port)
        # stored, not enforced: the cluster's plugin would have to do it
        assert "CONNECTED b'hello'" in run_cell(kc, probe)["stdout"]
        rules = enforcer.sync(kube_cluster.namespace)
        assert km.provisioner.kube.pod_name in str(rules)
        # enforced: the kernel cannot get out, and its owner still drives it
        assert "FAILED" in run_cell(kc, probe, timeout=30)["stdout"]
        assert run_cell(kc, "print(2 + 2)")["stdout"].strip() == "4"
        kc.stop_channels()
        kc = km.client()  # new connections, made under the rules (not only older ones)
        kc.start_channels()
        kc.wait_for_ready(timeout=30)
        assert run_cell(kc, "print(3 + 3)")["stdout"].strip() == "6"
        # and nobody else may connect to its ports: a peer from another pod address is not
        # listed (the rule admits this process's own address only)
        policy = kube_cluster.api_client()
        net = client.NetworkingV1Api(policy).read_namespaced_network_policy(
            km.provisioner.kube.pod_name, kube_cluster.namespace
        )
        (rule,) = net.spec.ingress
        cidrs = [p.ip_block.cidr for p in rule._from]
        assert f"{address_of(interface)}/32" in cidrs  # this host's own addresses only
        for cidr in cidrs:
            assert subprocess.run(
                ["ip", "-o", "addr", "show", "to", cidr], capture_output=True, text=True, check=True
            ).stdout.strip(), cidr
        enforcer.clear()
        assert "CONNECTED b'hello'" in run_cell(kc, probe)["stdout"]  # the rules blocked it
        kc.stop_channels()
        stop.set()
    finally:
        km.shutdown_kernel(now=True)
        if server is not None:
            server.close()

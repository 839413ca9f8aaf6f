"""``network: allowlist`` on a pod kernel: the owner's per-kernel egress proxy, reached over
TCP with a per-kernel token, the kernel's NetworkPolicy allowing that one address and its
ports (kernel_sandbox/kube/egress.py).

Against the test cluster, with the stand-in NetworkPolicy enforcer (tests/support/kube_netpol.py)
for the enforced part. Every target is a listener this test starts on the host's pod-bridge
address (``kube_cluster.pod_gateway``), under ``.test`` names mapped by ``egress_hosts``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from kubernetes import client
from support import unavailable
from support.egress_servers import LocalTargets
from support.kernels import run_cell
from support.kube import hardened_pod, wait_running
from support.kube_netpol import PolicyEnforcer
from test_kube import Capture, interface_to, kube_spec
from traitlets.config import Config

from kernel_sandbox.egress import EgressControl
from kernel_sandbox.errors import KernelStartError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FETCH = """
import urllib.request
try:
    print("BODY", urllib.request.urlopen({url!r}, timeout=20).read().decode())
except Exception as exc:
    print("FAILED", type(exc).__name__, exc)
"""

CONNECT = """
import socket
try:
    with socket.create_connection(({host!r}, {port}), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print("CONNECTED", s.recv(12))
except OSError as exc:
    print("REFUSED", type(exc).__name__)
"""

NO_TOKEN = """
import os, socket, urllib.parse
proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
with socket.create_connection((proxy.hostname, proxy.port), timeout=10) as s:
    s.sendall(b"GET {url} HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n")
    print("ANSWER", s.recv(200).split(b"\\r\\n")[0].decode())
"""


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"hello-egress"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _has_address(address: str) -> bool:
    out = subprocess.run(["ip", "-o", "addr", "show", "to", f"{address}/32"], capture_output=True)
    return bool(out.stdout.strip())


@pytest.fixture(scope="module")
def gateway(kube_cluster) -> str:
    """The host's pod-bridge address, made to exist (the CNI bridge appears with the first
    pod): where the listener and the proxy go."""
    if not kube_cluster.pod_gateway:
        unavailable("the cluster is not this fixture's (no pod bridge address known)")
    gw = kube_cluster.pod_gateway
    if not _has_address(gw):
        core, name = kube_cluster.core(), f"bridge-{uuid.uuid4().hex[:6]}"
        core.create_namespaced_pod(kube_cluster.namespace, hardened_pod(name))
        try:
            wait_running(core, kube_cluster.namespace, name)
        finally:
            core.delete_namespaced_pod(name, kube_cluster.namespace, grace_period_seconds=0)
    assert _has_address(gw), f"{gw} is not an address of this host"
    return gw


@pytest.fixture(scope="module")
def listener(gateway) -> Iterator[tuple[str, int]]:
    """An HTTP server on the pod-bridge address: the only target."""
    server = ThreadingHTTPServer((gateway, 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield gateway, server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def egress_log(tmp_path_factory) -> Iterator[Path]:
    """Decisions of this module's proxies go to a log of their own."""
    state = tmp_path_factory.mktemp("kube-egress-state")
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state)
    yield state / "kernel-sandbox" / "egress.jsonl"
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture
def enforcer(kube_cluster) -> Iterator[PolicyEnforcer]:
    api = kube_cluster.api_client()
    e = PolicyEnforcer(client.CoreV1Api(api), client.NetworkingV1Api(api))
    yield e
    e.clear()


def tls_connect(host: str, port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection((host, port), timeout=10))


def read_log(log: Path, kernel_id: str) -> list[dict]:
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("kernel_id") == kernel_id]


def allowlist_spec(kube_cluster, gateway: str, port: int, **extra) -> str:
    return kube_spec(
        kube_cluster,
        network="allowlist",
        egress=[f"files.example.test:{port}"],
        egress_hosts={"files.example.test": gateway, "other.example.test": gateway},
        kube_egress_address=gateway,
        **extra,
    )


def started(spec: str) -> tuple[KernelManager, object]:
    km = KernelManager(kernel_name=spec)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def test_an_allowlist_pod_goes_out_only_through_its_proxy(
    kube_cluster, listener, enforcer, egress_log
):
    host, port = listener
    km, kc = started(allowlist_spec(kube_cluster, host, port))
    try:
        kube = km.provisioner.kube
        egress = kube.egress
        assert egress is not None and egress.address == host
        listed = f"http://files.example.test:{port}/"
        capture = Capture(interface_to(kube.pod_ip))  # the pod bridge: all the pod's frames
        try:
            fetched = run_cell(kc, FETCH.format(url=listed))["stdout"]
        finally:
            wire = capture.stop()
        assert "BODY hello-egress" in fetched
        # pod <-> proxy is TLS: the token, the target and the answer never cross in clear
        header = base64.b64encode(f"kernel:{egress.token}".encode())  # Proxy-Authorization
        for plain in (header, b"files.example.test", b"hello-egress", egress.token.encode()):
            assert plain not in wire, plain
        assert len(wire) > 2000 and b"\x16\x03" in wire  # TLS records were captured
        # unlisted: refused, and the Docker path's notice shows in the cell
        out = run_cell(kc, FETCH.format(url=f"http://other.example.test:{port}/"))
        assert "FAILED" in out["stdout"] and "403" in out["stdout"]
        assert (
            f"egress to other.example.test:{port} denied: not in this kernel's allowlist"
            in out["stderr"]
        )
        # without the token: 407, from the pod itself and from this host
        no_token = NO_TOKEN.format(url=listed, host=f"files.example.test:{port}")
        answer = run_cell(kc, no_token)["stdout"]
        assert "ANSWER HTTP/1.1 407" in answer, answer
        with tls_connect(host, egress.ports["proxy"]) as s:
            wrong = base64.b64encode(b"kernel:not-the-token").decode()
            s.sendall(
                f"GET {listed} HTTP/1.1\r\nHost: files.example.test:{port}\r\n"
                f"Proxy-Authorization: Basic {wrong}\r\n\r\n".encode()
            )
            assert s.recv(200).startswith(b"HTTP/1.1 407")
        # the notice port wants the token first too
        with tls_connect(host, egress.ports["notices"]) as s:
            s.sendall(b"not-the-token\n")
            s.settimeout(5)
            assert s.recv(100) == b""  # closed at once
        # the objects: one egress rule (the proxy), the token in the Secret only
        net = client.NetworkingV1Api(kube_cluster.api_client()).read_namespaced_network_policy(
            kube.pod_name, kube_cluster.namespace
        )
        (rule,) = net.spec.egress
        assert [p.ip_block.cidr for p in rule.to] == [f"{host}/32"]
        assert sorted(p.port for p in rule.ports) == sorted(egress.ports.values())
        core = kube_cluster.core()
        pod = core.read_namespaced_pod(kube.pod_name, kube_cluster.namespace)
        assert egress.token not in json.dumps(
            kube_cluster.api_client().sanitize_for_serialization(pod)
        )
        secret = core.read_namespaced_secret(kube.pod_name, kube_cluster.namespace)
        assert base64.b64decode(secret.data["egress-token"]).decode() == egress.token
        pin = base64.b64decode(secret.data["egress-tls-sha256"]).decode()
        assert pin == egress.fingerprint
        # not enforced by the cluster: the pod still connects directly to the listener
        direct = CONNECT.format(host=host, port=port)
        assert "CONNECTED" in run_cell(kc, direct)["stdout"]
        # enforced (the stand-in controller): direct is refused, the proxy still works
        rules = enforcer.sync(kube_cluster.namespace)
        assert kube.pod_name in str(rules)
        assert "REFUSED" in run_cell(kc, direct, timeout=30)["stdout"]
        assert "BODY hello-egress" in run_cell(kc, FETCH.format(url=listed))["stdout"]
        enforcer.clear()
        log = read_log(egress_log, km.kernel_id)
        decisions = {(e["decision"], e["rule"]) for e in log}
        assert ("allow", f"allow files.example.test:{port}") in decisions, decisions
        assert ("deny", "not-listed") in decisions
        assert ("deny", "proxy-auth") in decisions
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert egress.endpoint.process is None and not egress.dir.exists()
    with pytest.raises(OSError):  # the proxy is gone with the kernel
        socket.create_connection((host, egress.ports["proxy"]), timeout=3).close()


def test_ask_mode_on_a_pod_waits_for_a_person(kube_cluster, listener, egress_log):
    host, port = listener
    km, kc = started(
        allowlist_spec(kube_cluster, host, port, egress_mode="ask", egress_ask_timeout=60)
    )
    try:
        control = EgressControl()
        approved: list[str] = []

        def approve() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                for request in control.pending(km.kernel_id):
                    control.approve(request.kernel_id, request.target)
                    approved.append(request.target)
                    return
                time.sleep(0.2)

        thread = threading.Thread(target=approve, daemon=True)
        thread.start()
        url = f"http://other.example.test:{port}/"
        out = run_cell(kc, FETCH.format(url=url), timeout=90)
        thread.join(5)
        assert approved == [f"other.example.test:{port}"]
        assert "BODY hello-egress" in out["stdout"], out
        assert "kernel-sandbox egress approve" in out["stderr"]  # the notice names the command
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


SECRET = "sk-pod-3f9a1c7e5b2d8064e1a9"
SECRET_ENV = "KS_KUBE_SECRET_TEST_KEY"
GET = """
import urllib.request, urllib.error
try:
    with urllib.request.urlopen({url!r}, timeout=30) as r:   # the default trust: no context
        print("STATUS", r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print("STATUS", e.code, e.read().decode())
except Exception as e:
    print("FAILED", type(e).__name__, e)
"""


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Iterator[LocalTargets]:
    """HTTP(S) servers on this host's loopback: the proxy (on this host) connects to them."""
    servers = LocalTargets(tmp_path_factory.mktemp("kube-egress-targets"))
    yield servers
    servers.close()


def test_egress_secrets_on_a_pod_the_server_gets_the_key_the_kernel_never_does(
    kube_cluster, gateway, targets, egress_log
):
    port = targets.https_port
    os.environ[SECRET_ENV] = SECRET  # the owner's environment, which the proxy inherits
    spec = kube_spec(
        kube_cluster,
        network="allowlist",
        egress=[f"api.test:{port}", f"pypi.test:{port}"],
        egress_hosts=targets.hosts(),
        egress_secrets={f"api.test:{port}": f"env:{SECRET_ENV}"},
        kube_egress_address=gateway,
    )
    operator = Config({"DockerSandboxProvisioner": {"egress_upstream_ca": str(targets.cert)}})
    km = KernelManager(kernel_name=spec, config=operator)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kube = km.provisioner.kube
        # the kernel's CA reaches the pod through its Secret: certificates, no key
        secret = kube_cluster.core().read_namespaced_secret(kube.pod_name, kube_cluster.namespace)
        bundle = base64.b64decode(secret.data["egress-ca.pem"]).decode()
        assert "BEGIN CERTIFICATE" in bundle and "PRIVATE KEY" not in bundle
        out = run_cell(kc, GET.format(url=f"https://api.test:{port}/reflect"))["stdout"]
        assert "STATUS 200" in out, out
        seen = {k.lower(): v for k, v in targets.seen[-1]["headers"].items()}
        assert seen["authorization"] == f"Bearer {SECRET}"
        assert SECRET not in out and "*" * len(SECRET) in out  # the echo came back masked
        # a host without a secret is a plain tunnel: the kernel verifies the real server
        # itself, which the kernel's CA bundle does not vouch for (the test CA is not in it)
        plain = run_cell(kc, GET.format(url=f"https://pypi.test:{port}/hello"))["stdout"]
        assert "CERTIFICATE_VERIFY_FAILED" in plain, plain
        assert SECRET not in json.dumps(
            kube_cluster.api_client().sanitize_for_serialization(
                kube_cluster.core().read_namespaced_pod(kube.pod_name, kube_cluster.namespace)
            )
        )
        assert "inject" in {e["decision"] for e in read_log(egress_log, km.kernel_id)}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        os.environ.pop(SECRET_ENV, None)


READ = """
from kernel_sandbox import data
print("LS", sorted(data.ls("sales")))
with data.open("sales/2024.csv") as f:
    print("READ", f.read().strip().replace("\\n", "|"))
for attempt in ("data.open('sales/../outside.txt').read()", "data.ls('other')",
                "data.open('sales/new.csv', 'w')",
                "data.Client(token='not-the-token').ls('sales')"):
    try:
        print("GOT", eval(attempt))
    except Exception as exc:
        print("REFUSED", type(exc).__name__)
"""


def test_datasets_on_a_pod_through_the_broker_with_the_scoped_token(
    kube_cluster, gateway, egress_log, tmp_path
):
    root = tmp_path / "data"
    (root / "sales").mkdir(parents=True)
    (root / "sales" / "2024.csv").write_text("region,total\nnorth,12\n")
    (root / "outside.txt").write_text("not-in-the-dataset")
    spec = kube_spec(
        kube_cluster, datasets={"sales": f"{root / 'sales'}:read"}, kube_egress_address=gateway
    )
    km, kc = started(spec)
    try:
        kube = km.provisioner.kube
        assert kube.data is not None and kube.egress is None
        capture = Capture(interface_to(kube.pod_ip))  # the pod bridge: all the pod's frames
        try:
            out = run_cell(kc, READ, timeout=60)["stdout"]
        finally:
            wire = capture.stop()
        assert "LS ['sales/2024.csv']" in out, out
        # the broker's channel is TLS: neither the data nor the token crosses in clear
        assert b"north,12" not in wire and kube.data.token.encode() not in wire
        assert len(wire) > 2000 and b"\x16\x03" in wire  # TLS records were captured
        assert "READ region,total|north,12" in out
        assert "not-in-the-dataset" not in out and "GOT" not in out, out
        refused = [line.split()[1] for line in out.splitlines() if line.startswith("REFUSED")]
        assert refused == ["PathEscape", "NotInScope", "ReadOnly", "TokenInvalid"], out
        # the objects: egress to the broker's port only, its token in the Secret only
        net = client.NetworkingV1Api(kube_cluster.api_client()).read_namespaced_network_policy(
            kube.pod_name, kube_cluster.namespace
        )
        (rule,) = net.spec.egress
        assert [p.ip_block.cidr for p in rule.to] == [f"{gateway}/32"]
        assert [p.port for p in rule.ports] == [kube.data.port]
        core = kube_cluster.core()
        secret = core.read_namespaced_secret(kube.pod_name, kube_cluster.namespace)
        first = base64.b64decode(secret.data["data-token"]).decode()
        assert first == kube.data.token
        assert base64.b64decode(secret.data["data-tls-sha256"]).decode() == kube.data.fingerprint
        pod = core.read_namespaced_pod(kube.pod_name, kube_cluster.namespace)
        assert first not in json.dumps(kube_cluster.api_client().sanitize_for_serialization(pod))
        # a restart: a new token in a new Secret, the old one revoked; same port
        port = kube.data.port
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert kube.data.token != first and kube.data.port == port
        again = run_cell(kc, READ, timeout=60)["stdout"]
        assert "READ region,total|north,12" in again, again
        stale = f"print(data.Client(token={first!r}).ls('sales'))"
        assert run_cell(kc, "from kernel_sandbox import data\n" + stale)["ename"] == "TokenRevoked"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    with pytest.raises(OSError):  # not served once the kernel is gone
        socket.create_connection((gateway, port), timeout=3).close()


def test_a_failed_start_leaves_no_proxy_and_no_broker_port(kube_cluster, gateway, tmp_path):
    (tmp_path / "sales").mkdir()
    spec = kube_spec(
        kube_cluster,
        image="kernel-sandbox/python:no-such-tag",
        network="allowlist",
        egress=["files.example.test:8080"],
        datasets={"sales": f"{tmp_path / 'sales'}:read"},
        kube_egress_address=gateway,
    )
    km = KernelManager(kernel_name=spec)
    with pytest.raises(KernelStartError, match="ErrImageNeverPull"):
        km.start_kernel()
    kube = km.provisioner.kube
    assert kube.egress is None and kube.data is None  # both stopped, not left to the owner's end
    runtime_dir = Path(km.provisioner.runtime_root) / km.kernel_id
    assert not runtime_dir.exists()  # the proxy's config and control socket are gone
    assert km.kernel_id not in EgressControl().kernels()


OWNER = """
import asyncio, json, sys
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
km.client().wait_for_ready(timeout=60)
print(json.dumps(asyncio.run(km.provisioner.get_provisioner_info())), flush=True)
sys.stdin.read()  # until killed
"""


def test_an_adopted_pod_kernel_gets_its_proxy_and_data_again(
    kube_cluster, listener, egress_log, tmp_path
):
    """The owner (a Jupyter Server) is killed; a new one adopts the pod as a restarted server
    does: the same proxy ports, token and certificate, and the broker's port, come back."""
    host, port = listener
    (tmp_path / "sales").mkdir()
    (tmp_path / "sales" / "2024.csv").write_text("region,total\nnorth,12\n")
    spec = allowlist_spec(kube_cluster, host, port, datasets={"sales": f"{tmp_path}/sales:read"})
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        line = owner.stdout.readline()
        assert line, "the owner process did not start its kernel"
        info = json.loads(line)
    finally:
        owner.send_signal(signal.SIGKILL)  # its proxy (lifeline) and broker die with it
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()
    services = info["kube"]["services"]
    proxy_port = services["egress"]["ports"]["proxy"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the proxy ends once its lifeline closes
        try:
            socket.create_connection((host, proxy_port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the dead owner's proxy still listens")
    km = KernelManager(kernel_name=spec, kernel_id=info["kernel_id"])
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km
    )
    asyncio.run(provisioner.load_provisioner_info(info))
    km.provisioner = provisioner
    km.load_connection_info(provisioner.connection_info)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kube = provisioner.kube
        assert kube.egress.ports == services["egress"]["ports"]
        listed = f"http://files.example.test:{port}/"
        deadline = time.monotonic() + 10
        out = run_cell(kc, FETCH.format(url=listed))["stdout"]
        while "BODY hello-egress" not in out and time.monotonic() < deadline:
            time.sleep(0.5)  # the adopted proxy listens a moment after the adoption
            out = run_cell(kc, FETCH.format(url=listed))["stdout"]
        assert "BODY hello-egress" in out, out
        assert "READ region,total|north,12" in run_cell(kc, READ, timeout=60)["stdout"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert kube.egress is None and kube.data is None

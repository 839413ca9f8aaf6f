"""The pod side of egress and data without a cluster: the owner's proxy on TCP with a token
(kernel_sandbox/kube/egress.py), the pod's launcher (kernel_sandbox/kube/launch.py) run as a
process here, the broker on TCP, and the objects they add to a kernel's pod. Every target is
a server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.egress_servers import LocalTargets

from kernel_sandbox.kube.egress import PodEgress, egress_address, egress_launch, owner_rule
from kernel_sandbox.kube.launch import Launch, Relay
from kernel_sandbox.kube.podspec import PodRequest, network_policy_manifest, secret_manifest
from kernel_sandbox.policy.model import SandboxPolicy


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> LocalTargets:
    servers = LocalTargets(tmp_path_factory.mktemp("kube-egress-unit-targets"))
    yield servers
    servers.close()


@pytest.fixture
def pod_proxy(tmp_path, targets):
    policy = SandboxPolicy.from_mapping(
        {
            "network": "allowlist",
            "egress": [f"api.test:{targets.http_port}"],
            "egress_hosts": targets.hosts(),
        }
    )
    egress = PodEgress(tmp_path / "k1", "kernel-one", policy, str(tmp_path / "log.jsonl"), None, "")
    asyncio.run(egress.start("127.0.0.1"))
    yield egress
    asyncio.run(egress.stop())


def tls_connect(port: int, pin: str) -> socket.socket:
    """A TLS connection to the pod proxy's port, checked against its pinned certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    assert hashlib.sha256(sock.getpeercert(True)).hexdigest() == pin
    return sock


def exchange(egress: PodEgress, data: bytes) -> bytes:
    with tls_connect(egress.ports["proxy"], egress.fingerprint) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def request(url: str, host: str, auth: str | None) -> bytes:
    header = f"Proxy-Authorization: {auth}\r\n" if auth else ""
    return f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{header}Connection: close\r\n\r\n".encode()


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"kernel:{token}".encode()).decode()


def test_the_pod_proxy_wants_the_kernels_token_on_every_request(pod_proxy, targets):
    http = targets.http_port
    url, host = f"http://api.test:{http}/hello", f"api.test:{http}"
    assert (pod_proxy.dir / "egress-control").exists()  # approvals as on the Docker path
    ok = exchange(pod_proxy, request(url, host, basic(pod_proxy.token)))
    assert ok.startswith(b"HTTP/1.1 200") and b"hello from" in ok
    for auth in (None, basic("wrong"), "Bearer " + pod_proxy.token, basic(pod_proxy.token)[:-2]):
        out = exchange(pod_proxy, request(url, host, auth))
        assert out.startswith(b"HTTP/1.1 407"), (auth, out)
        assert b'Proxy-Authenticate: Basic realm="kernel-sandbox egress"' in out
    # a kept-alive connection: the second request without the token is refused too
    good = request(url, host, basic(pod_proxy.token)).replace(b"Connection: close\r\n", b"")
    out = exchange(pod_proxy, good + request(url, host, None))
    assert out.count(b"HTTP/1.1 200") == 1 and out.count(b"HTTP/1.1 407") == 1
    # the token never goes on to the target
    exchange(pod_proxy, request(f"http://api.test:{http}/headers", host, basic(pod_proxy.token)))
    assert not any("proxy-authorization" in k.lower() for k in targets.seen[-1]["headers"])
    # and in clear, the port says nothing (TLS only)
    with socket.create_connection(("127.0.0.1", pod_proxy.ports["proxy"]), timeout=10) as raw:
        raw.sendall(request(url, host, basic(pod_proxy.token)))
        assert not raw.recv(100).startswith(b"HTTP/")
    log = [json.loads(line) for line in Path(pod_proxy.endpoint.log_path).read_text().splitlines()]
    assert [e["rule"] for e in log].count("proxy-auth") == 5


def test_the_notice_port_serves_only_the_token_holder(pod_proxy, targets):
    port, pin = pod_proxy.ports["notices"], pod_proxy.fingerprint
    with tls_connect(port, pin) as wrong:
        wrong.sendall(b"nope\n")
        assert wrong.recv(100) == b""
    with tls_connect(port, pin) as reader:
        reader.sendall(pod_proxy.token.encode() + b"\n")
        time.sleep(0.3)
        url = f"http://other.test:{targets.http_port}/"
        out = exchange(pod_proxy, request(url, "other.test", basic(pod_proxy.token)))
        assert out.startswith(b"HTTP/1.1 403")
        notice = json.loads(reader.recv(65536).split(b"\n")[0])
        assert notice["message"].startswith("egress to other.test")


def test_the_launcher_sets_secrets_links_and_relays_then_execs(tmp_path):
    """The launcher as the pod runs it: variables from a Secret file, links, a relay with a
    preamble line to a TCP server here, and the kernel's argv exec'd (same pid)."""
    secret = tmp_path / "token"
    secret.write_text("tok-123\n")
    upstream = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = upstream.accept()
        with conn:
            data = b""
            while b"ping" not in data:
                data += conn.recv(100)
            received.append(data)
            conn.sendall(b"pong")

    threading.Thread(target=serve, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()  # the TCP relay's connection
    relay = str(tmp_path / "relay.sock")
    with socket.socket() as free:  # a free loopback port for the TCP relay
        free.bind(("127.0.0.1", 0))
        tcp_port = free.getsockname()[1]
    launch = Launch(
        env={"PLAIN": "1"},
        secret_env={"PROXY": ("http://kernel:{secret}@h:1", str(secret))},
        links={str(tmp_path / "link"): str(secret)},
        relays=[
            Relay(relay, "127.0.0.1", upstream.getsockname()[1], preamble=str(secret)),
            Relay(f"127.0.0.1:{tcp_port}", "127.0.0.1", upstream.getsockname()[1]),
        ],
    )
    child = (
        "import os, socket, sys, time\n"
        "for _ in range(100):\n"
        "    if os.path.exists(sys.argv[1]): break\n"
        "    time.sleep(0.05)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'ping')\n"
        "t = socket.create_connection(('127.0.0.1', int(sys.argv[3]))); t.sendall(b'ping')\n"
        "print(os.getpid(), os.environ['PROXY'], os.environ['PLAIN'], s.recv(4).decode(),\n"
        "      os.readlink(sys.argv[2]), t.recv(4).decode())\n"
    )
    argv = launch.command(
        [sys.executable, "-c", child, relay, str(tmp_path / "link"), str(tcp_port)]
    )
    assert "tok-123" not in json.dumps(argv)  # the spec names the file, never the value
    argv[0] = sys.executable
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    pid, proxy, plain, answer, link, tcp_answer = out.split()
    assert tcp_answer == "pong"
    assert int(pid) == process.pid  # exec'd, not a child
    assert proxy == "http://kernel:tok-123@h:1" and plain == "1" and answer == "pong"
    assert link == str(secret)
    assert sorted(received) == [b"ping", b"tok-123\nping"]  # the preamble: that relay's only
    upstream.close()


def test_the_egress_launch_names_the_token_file_and_the_proxy():
    launch = egress_launch("10.244.0.1", {"proxy": 4001, "notices": 4002}, ca=True)
    assert launch.secret_env["HTTPS_PROXY"] == (
        "http://kernel:{secret}@127.0.0.1:3128",
        "/run/kernel-sandbox-secret/egress-token",
    )
    assert launch.env["SSL_CERT_FILE"] == "/run/kernel-sandbox-secret/egress-ca.pem"
    assert launch.env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    proxy, notices = launch.relays
    pin = "/run/kernel-sandbox-secret/egress-tls-sha256"
    assert (proxy.path, proxy.host, proxy.port, proxy.preamble, proxy.pin) == (
        "127.0.0.1:3128",
        "10.244.0.1",
        4001,
        "",
        pin,
    )
    assert (notices.host, notices.port, notices.preamble, notices.pin) == (
        "10.244.0.1",
        4002,
        "/run/kernel-sandbox-secret/egress-token",
        pin,
    )
    assert not egress_launch("10.0.0.1", {"proxy": 1, "notices": 2}, ca=False).env.get(
        "SSL_CERT_FILE"
    )


def test_the_policy_allows_the_owners_services_only_and_the_secret_carries_the_tokens():
    request = PodRequest(
        name="ks-a",
        namespace="ns",
        policy=SandboxPolicy.from_mapping({}),
        command=["python"],
        env={},
        labels={},
        annotations={},
        user="1000:1000",
        egress_to=(owner_rule("10.244.0.1", [4002, 4001, 4001]),),
    )
    spec = network_policy_manifest(request)["spec"]
    assert spec["egress"] == [
        {
            "to": [{"ipBlock": {"cidr": "10.244.0.1/32"}}],
            "ports": [{"protocol": "TCP", "port": 4001}, {"protocol": "TCP", "port": 4002}],
        }
    ]
    assert (
        network_policy_manifest(PodRequest(**{**request.__dict__, "egress_to": ()}))["spec"][
            "egress"
        ]
        == []
    )
    data = secret_manifest(request, b"{}", {"egress-token": b"t"})["data"]
    assert set(data) == {"connection.json", "egress-token"}


def test_the_address_is_the_setting_the_owner_pod_or_the_way_to_the_service():
    assert egress_address("10.1.2.3", "10.9.9.9", "10.96.0.5") == "10.1.2.3"
    assert egress_address("auto", "10.9.9.9", "10.96.0.5") == "10.9.9.9"
    assert egress_address("auto", "", "127.0.0.5") == "127.0.0.1"  # the source toward it
    with pytest.raises(Exception, match="kube_egress_address"):
        egress_address("auto", "", "")


def test_the_broker_serves_a_pod_kernel_on_tls_by_token_and_pinned_certificate(tmp_path):
    from kernel_sandbox.broker.audit import AuditLog
    from kernel_sandbox.broker.server import DataBroker
    from kernel_sandbox.broker.tokens import Grant, TokenStore
    from kernel_sandbox.egress.ca import pinned_server_context
    from kernel_sandbox.inside.data import Client
    from kernel_sandbox.inside.wire import TokenInvalid, TokenRevoked

    (tmp_path / "sales").mkdir()
    (tmp_path / "sales" / "a.csv").write_text("secret-rows\n")
    broker = DataBroker(TokenStore(str(tmp_path / "t.sqlite")), AuditLog(str(tmp_path / "a.jsonl")))
    try:
        scope = {"sales": Grant(str(tmp_path / "sales"), "read")}
        tls, fingerprint = pinned_server_context("127.0.0.1", "data broker")
        token, _, port = broker.grant_tcp("k1", scope, 60, "127.0.0.1", tls=tls)
        right, wrong = tmp_path / "pin", tmp_path / "wrong-pin"
        right.write_text(fingerprint)
        wrong.write_text(pinned_server_context("127.0.0.1", "other")[1])  # another certificate's
        child = (
            "import sys, time, os\n"
            "from kernel_sandbox.inside.data import Client\n"
            "for path in sys.argv[1:3]:\n"
            "    while not os.path.exists(path): time.sleep(0.05)\n"
            "    try:\n"
            "        c = Client(socket_path=path, token=sys.argv[3])\n"
            "        print('READ', c.read_bytes('sales/a.csv').decode().strip())\n"
            "    except Exception as exc:\n"
            "        print('REFUSED', type(exc).__name__)\n"
        )
        good, bad = str(tmp_path / "good.sock"), str(tmp_path / "bad.sock")
        launch = Launch(
            relays=[
                Relay(good, "127.0.0.1", port, pin=str(right)),
                Relay(bad, "127.0.0.1", port, pin=str(wrong)),
            ]
        )
        argv = launch.command([sys.executable, "-c", child, good, bad, token])
        argv[0] = sys.executable
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
        lines = out.stdout.split("\n")
        assert lines[0] == "READ secret-rows", out
        assert lines[1].startswith("REFUSED"), out  # not the pinned certificate: never sent

        class Plain(Client):
            def connect(self) -> socket.socket:
                return socket.create_connection(("127.0.0.1", port), timeout=10)

        with pytest.raises(Exception):  # noqa: B017 (no plaintext: a TLS port)
            Plain(token=token).ls("sales")

        class Tls(Client):
            def connect(self) -> socket.socket:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                raw = socket.create_connection(("127.0.0.1", port), timeout=10)
                return context.wrap_socket(raw)

        # a second grant (a restart): same port, the first token no longer works
        token2, _, port2 = broker.grant_tcp("k1", scope, 60, "127.0.0.1", port, tls)
        assert port2 == port and token2 != token
        assert Tls(token=token2).ls("sales") == ["sales/a.csv"]
        with pytest.raises(TokenRevoked):
            Tls(token=token).ls("sales")
        with pytest.raises(TokenInvalid):
            Tls(token="not-a-token").ls("sales")
        broker.release("k1")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        broker.close()


def test_doctor_names_the_address_pods_reach_their_owners_services_at(jupyter_path):
    from support.kernels import jupyter_kernels_dir, make_kernelspec
    from traitlets.config import Config

    from kernel_sandbox.cli.checks import FAIL, OK
    from kernel_sandbox.cli.doctor_kube import owner_address_checks

    pod = {"backend": "kubernetes", "network": "allowlist", "egress": ["a.test"]}
    names = [
        make_kernelspec("kubeeg-here", {**pod, "kube_egress_address": "127.0.0.1"}),
        # TEST-NET-2: not an address of this machine (a bind is refused; nothing is sent)
        make_kernelspec("kubeeg-elsewhere", {**pod, "kube_egress_address": "198.51.100.7"}),
        make_kernelspec("kubeeg-nowhere", {**pod, "kube_service": False}),
        make_kernelspec("kubeeg-none", {"backend": "kubernetes"}),  # no services: no check
    ]
    try:
        found = {
            c.detail.split(":")[0]: c.status
            for c in owner_address_checks(Config())
            if c.detail.startswith("kubeeg-")
        }
    finally:  # ps, stop and gc of later tests would look for their cluster
        for name in names:
            shutil.rmtree(jupyter_kernels_dir() / name)
    assert found == {"kubeeg-here": OK, "kubeeg-elsewhere": FAIL, "kubeeg-nowhere": FAIL}

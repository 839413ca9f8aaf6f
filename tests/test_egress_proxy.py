"""The egress decision and the host-side proxy, attacked directly on the host (no containers).

The proxy runs as the provisioner runs it (EgressEndpoint: its own process, unix sockets);
the tests speak raw bytes to its socket, as code in a sandbox could through the bridge.
Targets are servers on 127.0.0.1 under ``.test`` names mapped by egress_hosts.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.egress_servers import LocalTargets

from kernel_sandbox.cli.app import build_parser
from kernel_sandbox.cli.app import main as cli_main
from kernel_sandbox.cli.install import egress_install_policy
from kernel_sandbox.egress import EgressControl, EgressControlError, EgressEndpoint
from kernel_sandbox.egress.rules import (
    Target,
    TargetError,
    address_is_public,
    decide,
    parse_authority,
    parse_rule,
)
from kernel_sandbox.errors import PolicyError
from kernel_sandbox.host.logtext import LogLimits
from kernel_sandbox.policy.model import SandboxPolicy

# -- the rules ------------------------------------------------------------------------------


def rules(*patterns: str):
    return tuple(parse_rule(p) for p in patterns)


@pytest.mark.parametrize(
    "pattern, target, allowed",
    [
        ("api.corp.test", "api.corp.test:443", True),
        ("api.corp.test", "API.Corp.Test.:80", True),
        ("api.corp.test", "api.corp.test:22", False),  # no port given: 80 and 443 only
        ("api.corp.test", "api.corp.test.evil.test:443", False),
        ("api.corp.test", "xapi.corp.test:443", False),
        ("*.corp.test", "a.corp.test:443", True),
        ("*.corp.test", "a.b.corp.test:80", True),
        ("*.corp.test", "corp.test:443", False),  # the wildcard is below the domain
        ("*.corp.test", "evilcorp.test:443", False),
        ("*.corp.test", "corp.test.evil.test:443", False),
        ("data.corp.test:8443", "data.corp.test:8443", True),
        ("data.corp.test:8443", "data.corp.test:443", False),
        ("mirror.corp.test:*", "mirror.corp.test:2222", True),
        ("127.0.0.1:8080", "127.0.0.1:8080", True),
        ("127.0.0.1:8080", "127.0.0.1:8081", False),
        ("*.corp.test", "127.0.0.1:443", False),  # wildcards never match addresses
        ("[::1]:8080", "[::1]:8080", True),
    ],
)
def test_rule_matching(pattern, target, allowed):
    assert decide(parse_authority(target), rules(pattern)).allowed is allowed


def test_unlisted_names_and_addresses_are_told_apart():
    assert decide(Target("x.test", 443), ()).rule == "not-listed"
    assert decide(Target("127.0.0.1", 443), ()).rule == "ip-literal"
    assert decide(Target("::1", 443), rules("*.corp.test")).rule == "ip-literal"


@pytest.mark.parametrize(
    "authority",
    [
        "api.test@evil.test:443",
        "evil.test%2f:443",
        "api.test/evil:443",
        "api.test:443/x",
        "2130706433:80",
        "0x7f000001:80",
        "0x7f.1:80",
        "127.1:80",
        "017.0.0.1:80",
        "127.0.0.01:80",
        "аpi.test:443",
        "a..test:443",
        "-a.test:443",
        "a_b.test:443",
        "api.test:0",
        "api.test:65536",
        "api.test:+80",
        "api.test: 80",
        "::1:80",
        "[::1%eth0]:80",
        "[127.0.0.1]:80",
        "",
        ":443",
        "api.test:443:1",
    ],
)
def test_ambiguous_authorities_are_refused(authority):
    """Whatever another parser might read differently is refused before any rule is seen."""
    with pytest.raises(TargetError):
        parse_authority(authority)


def test_authorities_are_normalised():
    assert parse_authority("API.Test.:8080") == Target("api.test", 8080)
    assert parse_authority("[0:0::1]:443") == Target("::1", 443)
    assert parse_authority("api.test", default_port=80) == Target("api.test", 80)
    assert str(Target("::1", 443)) == "[::1]:443"


@pytest.mark.parametrize(
    "pattern", ["*", "*.test", "*:443", "a.*.test", "*.127.0.0.1", "x.test:99999", ""]
)
def test_patterns_that_open_too_much_or_are_malformed(pattern):
    with pytest.raises(TargetError):
        parse_rule(pattern)


# Inputs to a pure classifier: nothing connects to any of these addresses.
@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "0.0.0.0",
        "::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
        "100.64.0.1",
        "nonsense",
    ],
)
def test_addresses_from_dns_must_be_public(address):
    assert not address_is_public(address)


def test_policy_keys():
    policy = SandboxPolicy.from_mapping(
        {
            "network": "allowlist",
            "egress": ["API.corp.test.", "*.corp.test", "data.corp.test:8443"],
            "egress_hosts": ["api.corp.test=127.0.0.1"],
            "egress_mode": "ask",
            "egress_ask_timeout": "5",
        }
    )
    assert policy.egress == ("api.corp.test", "*.corp.test", "data.corp.test:8443")
    assert policy.egress_hosts == {"api.corp.test": "127.0.0.1"}
    assert (policy.egress_mode, policy.egress_ask_timeout) == ("ask", 5.0)
    assert SandboxPolicy().network == "none" and SandboxPolicy().egress == ()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"network": "open"}, "network: expected one of none, allowlist"),
        ({"egress": "api.test"}, "egress: expected a list"),
        ({"egress": ["*"]}, "would allow every host"),
        ({"egress_hosts": {"api.test": "somewhere"}}, "not an IP address"),
        ({"egress_hosts": {"127.0.0.1": "127.0.0.1"}}, "maps names, not addresses"),
        ({"egress_mode": "maybe"}, "egress_mode: expected one of deny, ask"),
        ({"egress_ask_timeout": 0}, "egress_ask_timeout"),
        ({"egress_ask_timeout": 7200}, "at most 3600"),
    ],
)
def test_policy_errors_name_the_key(values, message):
    with pytest.raises(PolicyError, match=message):
        SandboxPolicy.from_mapping(values)


def test_install_flags():
    parser = build_parser()
    args = parser.parse_args(
        [
            "install",
            "--network",
            "allowlist",
            "--egress",
            "*.corp.test",
            "--egress",
            "API.test:8443",
            "--egress-host",
            "a.corp.test=127.0.0.1",
            "--egress-mode",
            "ask",
        ]
    )
    assert egress_install_policy(args) == {
        "network": "allowlist",
        "egress": ("*.corp.test", "api.test:8443"),
        "egress_hosts": {"a.corp.test": "127.0.0.1"},
        "egress_mode": "ask",
    }
    assert egress_install_policy(parser.parse_args(["install"])) == {}
    with pytest.raises(PolicyError, match="need --network allowlist"):
        egress_install_policy(parser.parse_args(["install", "--egress", "api.test"]))


def test_install_writes_the_policy_into_the_kernelspec(tmp_path):
    assert (
        cli_main(
            [
                "install",
                "--prefix",
                str(tmp_path),
                "--network",
                "allowlist",
                "--egress",
                "api.test",
                "--egress-mode",
                "ask",
            ]
        )
        == 0
    )
    spec = json.loads(next(tmp_path.rglob("python3-sandbox/kernel.json")).read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["network"] == "allowlist" and config["egress"] == ["api.test"]
    assert config["egress_mode"] == "ask"
    assert cli_main(["install", "--prefix", str(tmp_path), "--egress", "api.test"]) == 2


# -- the proxy, on the host -----------------------------------------------------------------


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> LocalTargets:
    servers = LocalTargets(tmp_path_factory.mktemp("egress-proxy-targets"))
    yield servers
    servers.close()


class Proxy:
    """A proxy process as the provisioner starts it, under a private runtime root."""

    def __init__(self, root: Path, targets: LocalTargets, plant=None, limits=None, **policy):
        self.root = root
        (root / "k1" / "s").mkdir(parents=True)
        if plant:
            plant(root / "k1" / "s")
        values = {
            "network": "allowlist",
            "egress": [
                f"api.test:{targets.http_port}",
                f"echo.test:{targets.echo.port}",
                f"localhost:{targets.http_port}",
            ],
            "egress_hosts": {n: a for n, a in targets.hosts().items()},
            **policy,
        }
        self.log = root / "egress.jsonl"
        self.endpoint = EgressEndpoint(
            root / "k1",
            root / "k1" / "s",
            "kernel-one",
            SandboxPolicy.from_mapping(values),
            str(self.log),
            "/run/kernel-sandbox",
            3128,
            limits,
        )
        self.endpoint.start()
        asyncio.run(self.endpoint.wait_ready())

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(self.endpoint.socket_path))
        return sock

    def exchange(self, data: bytes) -> bytes:
        """Send ``data``, read until the proxy closes."""
        with self.connect() as sock:
            sock.sendall(data)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        return out

    def decisions(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def close(self) -> None:
        asyncio.run(self.endpoint.stop())


@pytest.fixture
def proxy(tmp_path, targets) -> Proxy:
    running = Proxy(tmp_path, targets)
    yield running
    running.close()


def get(target: str, host: str | None = None, extra: str = "", close: bool = True) -> bytes:
    """A proxy request; with ``close``, the proxy ends the connection after answering."""
    host = target.split("/")[2] if host is None else host
    if close and "connection:" not in extra.lower():
        extra += "Connection: close\r\n"
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def test_forwards_and_logs(proxy, targets):
    port = targets.http_port
    out = proxy.exchange(get(f"http://api.test:{port}/hello"))
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(
        f"hello from api.test:{port} at /hello\n".encode()
    )
    entry = proxy.decisions()[-1]
    assert set(entry) >= {"time", "kernel_id", "host", "port", "decision", "rule"}
    assert (entry["kernel_id"], entry["host"], entry["port"], entry["decision"], entry["rule"]) == (
        "kernel-one",
        "api.test",
        port,
        "allow",
        f"allow api.test:{port}",
    )


def test_every_request_on_a_connection_is_decided(proxy, targets):
    """Keep-alive and pipelining: an allowed request does not open the way for the next."""
    port = targets.http_port
    out = proxy.exchange(
        b"".join(
            get(f"http://{name}:{port}/hello{n}", close=False)
            for n, name in enumerate(("api.test", "api.test", "evil.test", "api.test"))
        )
    )
    assert out.count(b"hello from api.test") == 2 and b"hello4" not in out
    assert out.endswith(
        f"egress to evil.test:{port} denied: not in this kernel's allowlist\n".encode()
    )


def test_host_header_must_name_the_target(proxy, targets):
    port = targets.http_port
    for request in (
        get(f"http://api.test:{port}/hello", host="evil.test"),
        get(f"http://api.test:{port}/hello", host=f"evil.test:{port}"),
        get(f"http://api.test:{port}/hello", host="api.test"),  # port 80 != port
        f"CONNECT api.test:{port} HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n".encode(),
        f"GET http://api.test:{port}/ HTTP/1.1\r\nHost: api.test:{port}\r\n"
        f"Host: evil.test\r\n\r\n".encode(),
    ):
        out = proxy.exchange(request)
        assert out.startswith((b"HTTP/1.1 403 ", b"HTTP/1.1 400 ")), out
        assert b"hello" not in out
    assert [e["rule"] for e in proxy.decisions()].count("host-mismatch") == 4


@pytest.mark.parametrize(
    "request_bytes, rule",
    [
        (b"GET https://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n", "scheme"),
        (b"GET ftp://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n", "scheme"),
        (b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n", "not-proxy-form"),
        (b"GET http://api.test@evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", "bad-target"),
        (b"GET http://evil.test%2eapi.test/ HTTP/1.1\r\nHost: x\r\n\r\n", "bad-target"),
        (b"CONNECT api.test HTTP/1.1\r\nHost: api.test\r\n\r\n", "bad-target"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not-http"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "not-http"),
    ],
    ids=[
        "https-url",
        "ftp-url",
        "origin-form",
        "userinfo",
        "escape",
        "connect-no-port",
        "ssh",
        "tls-hello",
    ],
)
def test_malformed_and_non_http_requests(proxy, request_bytes, rule):
    out = proxy.exchange(request_bytes)
    assert out.startswith(b"HTTP/1.1 400 ") and b"egress" in out
    assert proxy.decisions()[-1]["rule"] == rule and proxy.decisions()[-1]["decision"] == "deny"


def test_request_heads_are_bounded(proxy, targets):
    big = get(f"http://api.test:{targets.http_port}/hello", extra="X: " + "a" * 70000 + "\r\n")
    out = proxy.exchange(big)
    assert out.startswith(b"HTTP/1.1 431 ") and proxy.decisions()[-1]["rule"] == "head-too-large"


def test_ambiguous_framing_never_reaches_upstream(proxy, targets):
    """Content-Length with Transfer-Encoding (request smuggling) is refused whole."""
    port = targets.http_port
    out = proxy.exchange(
        f"POST http://api.test:{port}/hello HTTP/1.1\r\nHost: api.test:{port}\r\n"
        "Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        f"GET http://evil.test:{port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n".encode()
    )
    assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1") == 1
    assert proxy.decisions()[-1]["rule"] == "bad-framing"


def test_hop_by_hop_and_proxy_headers_are_not_forwarded(proxy, targets):
    port = targets.http_port
    out = proxy.exchange(
        get(
            f"http://api.test:{port}/headers",
            extra="Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
            "Connection: close, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n",
        )
    )
    headers = {k.lower() for k in json.loads(out.split(b"\r\n\r\n", 1)[1])}
    assert "x-kept" in headers
    assert not headers & {"proxy-authorization", "proxy-connection", "x-secret"}


def test_connect_tunnels_bytes_including_early_data(proxy, targets):
    port = targets.echo.port
    with proxy.connect() as sock:
        # HTTP/1.0 without Host (Python's http.client does this), with bytes sent right away
        sock.sendall(f"CONNECT echo.test:{port} HTTP/1.0\r\n\r\n".encode() + b"\x16early")
        data = b""
        while b"early" not in data:
            data += sock.recv(1024)
        assert data == b"HTTP/1.1 200 Connection established\r\n\r\n\x16early"
        sock.sendall(b"more")
        assert sock.recv(1024) == b"more"
    assert proxy.decisions()[-1]["method"] == "CONNECT"


def test_names_from_dns_must_not_resolve_to_the_host(proxy, targets):
    """localhost is listed but not mapped: the host resolves it to loopback, which a name from
    DNS may never reach (DNS rebinding onto the host's own services)."""
    out = proxy.exchange(get(f"http://localhost:{targets.http_port}/hello"))
    assert out.startswith(b"HTTP/1.1 403 ") and b"resolves to a non-public address" in out
    assert proxy.decisions()[-1]["rule"] == "non-public-address"


def test_denials_reach_the_notice_socket(proxy, targets):
    with socket.socket(socket.AF_UNIX) as notices:
        notices.settimeout(10)
        notices.connect(str(proxy.endpoint.shared_dir / "egress-notices"))
        time.sleep(0.2)
        proxy.exchange(get(f"http://evil.test:{targets.http_port}/"))
        notice = json.loads(notices.recv(65536).decode().splitlines()[0])
    assert (
        notice["message"]
        == f"egress to evil.test:{targets.http_port} denied: not in this kernel's allowlist"
    )
    assert notice["rule"] == "not-listed"


def test_connections_are_bounded(proxy):
    idle = [proxy.connect() for _ in range(128)]
    try:
        time.sleep(0.3)
        assert proxy.exchange(b"").startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()


def test_planted_symlinks_are_replaced_not_followed(tmp_path, targets):
    """The shared directory belongs to the kernel: what it leaves at the socket paths is
    replaced, and the host never changes the mode of what a link points to."""
    victim = tmp_path / "victim"
    victim.write_text("host file")
    victim.chmod(0o600)

    def plant(shared: Path) -> None:
        for name in ("egress", "egress-notices"):
            (shared / name).symlink_to(victim)

    running = Proxy(tmp_path / "root", targets, plant=plant)
    try:
        assert victim.stat().st_mode & 0o777 == 0o600 and victim.read_text() == "host file"
        assert not running.endpoint.socket_path.is_symlink()
        out = running.exchange(get(f"http://api.test:{targets.http_port}/hello"))
        assert b"hello from api.test" in out
    finally:
        running.close()


def test_proxy_ends_when_its_owner_does(tmp_path, targets):
    running = Proxy(tmp_path, targets)
    process = running.endpoint.process
    process.stdin.close()  # what the owner's death does to the pipe
    assert process.wait(10) == 0
    assert not running.endpoint.socket_path.exists() and not running.endpoint.control_path.exists()
    running.close()


def test_ask_mode(tmp_path, targets):
    running = Proxy(tmp_path, targets, egress_mode="ask", egress_ask_timeout=2)
    control = EgressControl(str(tmp_path))
    port = targets.http_port
    target = f"ask.test:{port}"
    try:
        assert control.kernels() == ["kernel-one"] and control.pending() == []
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(running.exchange, get(f"http://{target}/hello"))
            second = pool.submit(running.exchange, get(f"http://{target}/hello"))
            deadline = time.monotonic() + 10
            while not control.pending() or control.pending()[0].waiting < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert control.approve("kernel", target) == 2  # a unique prefix of the id will do
            assert (
                b"hello from ask.test" in first.result()
                and b"hello from ask.test" in second.result()
            )
        started = time.monotonic()
        out = running.exchange(get(f"http://{target}/hello"))  # silence denies
        assert 1.5 < time.monotonic() - started < 10 and b"no approval within 2s" in out
        with pytest.raises(EgressControlError, match="no request to"):
            control.deny("kernel-one", target)
        with pytest.raises(EgressControlError, match="no kernel"):
            control.approve("nobody", target)
        assert control.deny("kernel-one", target, always=True) == 0
        assert b"denied for this kernel" in running.exchange(get(f"http://{target}/hello"))
        assert control.approve("kernel-one", target, always=True) == 0
        assert b"hello from ask.test" in running.exchange(get(f"http://{target}/hello"))
        # hard refusals are never put to a person
        assert running.exchange(get(f"http://127.0.0.2:{port}/")).startswith(b"HTTP/1.1 403 ")
        assert control.pending() == []
    finally:
        running.close()
    rules = [e["rule"] for e in running.decisions()]
    assert rules.count("approved once") == 2 and "ask-timeout" in rules and "denied always" in rules


def test_decision_log_is_budgeted_and_rotated(tmp_path, targets):
    """A flood of denials: every one answered, 5 recorded per interval, the rest summarized."""
    limits = LogLimits(records=5, interval=1.0, max_bytes=1000, backups=5)
    proxy = Proxy(tmp_path, targets, limits=limits)
    try:
        host = "a" * 60 + ".evil.test"
        for _ in range(40):
            out = proxy.exchange(get(f"http://{host}:{targets.http_port}/" + "p" * 20_000))
            assert out.startswith(b"HTTP/1.1 403 ")
        time.sleep(1.6)  # the interval is over: the proxy writes the summary
        proxy.exchange(get(f"http://api.test:{targets.http_port}/hello"))
    finally:
        proxy.close()
    files = sorted(tmp_path.glob("egress.jsonl*"))
    assert 1 < len(files) <= 6 and all(f.stat().st_size <= 1000 for f in files)
    entries = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    summaries = [e for e in entries if e["decision"] == "suppressed"]
    assert sum(e["suppressed"] for e in summaries) == 35
    assert summaries[0]["decisions"] == {"deny": 35}

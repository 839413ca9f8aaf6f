"""egress_secrets on the host: the proxy process adds the credential, the kernel's side never
gets it (no containers; tests/test_egress_secrets_kernel.py does the same from real kernels).

The proxy runs as the provisioner runs it (EgressEndpoint, its own process, unix sockets); the
tests speak to its socket as code in a sandbox would through the bridge, trusting only the CA
bundle the proxy wrote for that kernel. Every server is on 127.0.0.1 under a ``.test`` name.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from pathlib import Path

import pytest
from support.egress_servers import LocalTargets

from kernel_sandbox.cli.app import build_parser
from kernel_sandbox.cli.app import main as cli_main
from kernel_sandbox.cli.install import egress_install_policy
from kernel_sandbox.egress import EgressControl, EgressEndpoint
from kernel_sandbox.egress.ca import KernelCA
from kernel_sandbox.egress.secrets import Application, Masker, parse_secret
from kernel_sandbox.errors import KernelStartError, PolicyError
from kernel_sandbox.policy.keys import display_value
from kernel_sandbox.policy.model import SandboxPolicy

SECRET = "sk-live-4f9a1c7e2b8d6a3f0e5c"
KERNEL_HEADERS = (
    "Authorization: Bearer kernel-guess\r\nX-Api-Key: kernel-key\r\n"
    "Cookie: session=kernel\r\nX-Custom: kept\r\n"
)

# -- the policy key and the flag ------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, value, normal",
    [
        ("API.Test", "env:KEY", ("api.test", "env:KEY:bearer")),
        (
            "api.test:8443",
            "file:/etc/k:header:X-Api-Key",
            ("api.test:8443", "file:/etc/k:header:X-Api-Key"),
        ),
        ("*.corp.test", "keyring:corp/me:basic", ("*.corp.test", "keyring:corp/me:basic")),
        ("maps.test", "env:MAPS:query:key", ("maps.test", "env:MAPS:query:key")),
        ("a.test", "file:/with:colon:bearer", ("a.test", "file:/with:colon:bearer")),
    ],
)
def test_policy_values_are_normalised(pattern, value, normal):
    policy = SandboxPolicy.from_mapping({"egress_secrets": {pattern: value}})
    assert list(policy.egress_secrets.items()) == [normal]
    listed = SandboxPolicy.from_mapping({"egress_secrets": [f"{pattern}={value}"]})
    assert listed.egress_secrets == policy.egress_secrets


@pytest.mark.parametrize(
    "value, message",
    [
        ({"api.test": "sk-pasted-by-mistake"}, "SOURCE[:HOW]"),
        ({"api.test": "env:NOT A NAME"}, "not a variable name"),
        ({"api.test": "file:relative/key"}, "absolute path"),
        ({"api.test": "keyring:only"}, "SERVICE/USER"),
        ({"api.test": "env:K:header:Bad Header"}, "not a valid name"),
        ({"api.test": "env:K:header:Host"}, "cannot go in the Host header"),
        ({"127.0.0.1:443": "env:K"}, "not an address"),
        ({"*": "env:K"}, "every host"),
        ("api.test=env:K", "mapping"),
        (["api.test"], "HOST=SOURCE"),
    ],
)
def test_policy_errors_never_quote_the_value(value, message):
    with pytest.raises(PolicyError, match="egress_secrets") as info:
        SandboxPolicy.from_mapping({"egress_secrets": value})
    assert message in str(info.value)
    assert "sk-pasted" not in str(info.value)


def test_install_flag_and_display(monkeypatch):
    monkeypatch.setenv("KS_TEST_KEY", SECRET)
    args = build_parser().parse_args(
        [
            "install",
            "--network",
            "allowlist",
            "--egress",
            "api.test",
            "--egress-secret",
            "api.test=env:KS_TEST_KEY:header:X-Api-Key",
        ]
    )
    values = egress_install_policy(args)
    assert values["egress_secrets"] == {"api.test": "env:KS_TEST_KEY:header:X-Api-Key"}
    shown = display_value("egress_secrets", values["egress_secrets"])
    assert shown == "api.test=env:KS_TEST_KEY:header:X-Api-Key" and SECRET not in shown
    bare = build_parser().parse_args(["install", "--egress-secret", "api.test=env:K"])
    with pytest.raises(PolicyError, match="--egress-secret need --network allowlist"):
        egress_install_policy(bare)


def test_policy_show_never_prints_the_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KS_TEST_KEY", SECRET)
    spec = tmp_path / "share" / "jupyter" / "kernels"
    assert (
        cli_main(
            [
                "install",
                "--prefix",
                str(tmp_path),
                "--name",
                "with-secret",
                "--network",
                "allowlist",
                "--egress",
                "api.test",
                "--egress-secret",
                "api.test=env:KS_TEST_KEY",
            ]
        )
        == 0
    )
    kernel_json = (spec / "with-secret" / "kernel.json").read_text()
    assert "env:KS_TEST_KEY" in kernel_json and SECRET not in kernel_json
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    capsys.readouterr()
    assert cli_main(["policy", "show", "with-secret"]) == 0
    out = capsys.readouterr()
    assert "api.test=env:KS_TEST_KEY:bearer" in out.out + out.err
    assert SECRET not in out.out + out.err


# -- pure parts -----------------------------------------------------------------------------


def test_masker_finds_values_split_across_chunks():
    masker = Masker(Application("bearer").forms(SECRET))
    data = b"xx" + SECRET.encode() + b"yy" + SECRET.encode()[:7]
    chunks = [data[i : i + 5] for i in range(0, len(data), 5)]
    out = (
        b"".join(masker.feed(c) for c in chunks) + masker.feed(SECRET.encode()[7:]) + masker.flush()
    )
    assert SECRET.encode() not in out and len(out) == len(data) + len(SECRET) - 7
    assert out.count(b"*" * len(SECRET)) == 2


def test_query_application_replaces_the_kernels_parameter():
    apply = parse_secret("maps.test", "env:K:query:key").apply
    assert apply.path(b"/geo?q=1&key=guess&kEy=2", "s/v") == b"/geo?q=1&kEy=2&key=s%2Fv"
    assert apply.path(b"/geo?key=guess", None) == b"/geo"


def seen_headers(targets: LocalTargets) -> dict[str, str]:
    """The headers of the last request that reached a test server, names in lower case."""
    return {k.lower(): v for k, v in targets.seen[-1]["headers"].items()}


# -- the proxy ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> LocalTargets:
    servers = LocalTargets(tmp_path_factory.mktemp("egress-secret-targets"))
    yield servers
    servers.close()


class Proxy:
    """One kernel's proxy with secrets, under a private runtime root."""

    def __init__(
        self,
        root: Path,
        targets: LocalTargets,
        secrets: dict,
        kernel_id="kernel-one",
        hosts=None,
        upstream_ca=None,
        extra_egress=(),
    ):
        self.root, self.targets = root, targets
        (root / kernel_id / "h").mkdir(parents=True)
        port = targets.https_port
        values = {
            "network": "allowlist",
            "egress": [
                f"api.test:{port}",
                f"pypi.test:{port}",
                f"echo.test:{targets.echo.port}",
                f"api.test:{targets.http_port}",
                *extra_egress,
            ],
            "egress_hosts": {**targets.hosts(), **(hosts or {})},
            "egress_secrets": secrets,
        }
        self.log = root / "egress.jsonl"
        self.endpoint = EgressEndpoint(
            root / kernel_id,
            root / kernel_id / "h",
            kernel_id,
            SandboxPolicy.from_mapping(values),
            str(self.log),
            "/run/ks",
            3128,
            upstream_ca=str(targets.cert) if upstream_ca is None else upstream_ca,
        )
        self.endpoint.start()
        asyncio.run(self.endpoint.wait_ready())
        self.bundle = root / kernel_id / "h" / "egress-ca.pem"

    def connect(self, host: str, port: int, cafile: str | None = None) -> socket.socket:
        """CONNECT host:port, then TLS trusting only ``cafile`` (default: the kernel's bundle)."""
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(15)
        raw.connect(str(self.endpoint.socket_path))
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(1)
            if not chunk:
                break
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=cafile or str(self.bundle))
        return context.wrap_socket(raw, server_hostname=host)

    def https(
        self,
        host: str,
        path: str,
        headers: str = "",
        port: int | None = None,
        cafile: str | None = None,
    ) -> tuple[int, bytes]:
        port = port or self.targets.https_port
        with self.connect(host, port, cafile) as tls:
            head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}"
            tls.sendall((head + "Connection: close\r\n\r\n").encode())
            out = b""
            while chunk := tls.recv(65536):
                out += chunk
        head, _, body = out.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def decisions(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def close(self) -> None:
        asyncio.run(self.endpoint.stop())


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("KS_TEST_KEY", SECRET)  # the proxy process inherits it, as from Jupyter


@pytest.fixture
def proxy(tmp_path, targets, secret_env) -> Proxy:
    running = Proxy(tmp_path, targets, {f"api.test:{targets.https_port}": "env:KS_TEST_KEY"})
    yield running
    running.close()


def test_the_server_gets_the_key_the_client_gets_it_masked(proxy, targets):
    status, body = proxy.https("api.test", "/reflect?x=1", KERNEL_HEADERS)
    assert status == 200
    assert targets.seen[-1]["path"] == "/reflect?x=1"
    seen = seen_headers(targets)
    assert seen["authorization"] == f"Bearer {SECRET}"
    # what the kernel sent in credential-shaped headers never went on; the rest did
    assert "x-api-key" not in seen and "cookie" not in seen and seen["x-custom"] == "kept"
    # the server echoed everything: the kernel reads stars where the key was
    echoed = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert echoed["authorization"] == "Bearer " + "*" * len(SECRET)
    assert SECRET.encode() not in body
    entry = [d for d in proxy.decisions() if d["decision"] == "inject"][-1]
    assert (entry["host"], entry["method"], entry["path"], entry["status"]) == (
        "api.test",
        "GET",
        "/reflect",
        200,
    )
    assert entry["rule"] == f"secret api.test:{targets.https_port}" and entry["masked"] >= 1
    assert sorted(entry["stripped"]) == ["authorization", "cookie", "x-api-key"]
    assert SECRET not in proxy.log.read_text()


@pytest.mark.parametrize(
    "how, header, expected",
    [
        ("header:X-Api-Key", "X-Api-Key", SECRET),
        ("basic", "Authorization", "Basic dXNlcjpzay1saXZlLTRmOWExYzdlMmI4ZDZhM2YwZTVj"),
    ],
)
def test_other_applications(tmp_path, targets, secret_env, monkeypatch, how, header, expected):
    if how == "basic":
        monkeypatch.setenv("KS_TEST_KEY", f"user:{SECRET}")
    running = Proxy(tmp_path, targets, {f"api.test:{targets.https_port}": f"env:KS_TEST_KEY:{how}"})
    try:
        status, body = running.https("api.test", "/reflect", KERNEL_HEADERS)
        assert status == 200 and seen_headers(targets)[header.lower()] == expected
        assert SECRET.encode() not in body and expected.encode() not in body
    finally:
        running.close()


def test_query_parameter(tmp_path, targets, secret_env):
    running = Proxy(
        tmp_path, targets, {f"api.test:{targets.https_port}": "env:KS_TEST_KEY:query:key"}
    )
    try:
        status, body = running.https("api.test", "/reflect?q=1&key=guess", KERNEL_HEADERS)
        assert status == 200 and targets.seen[-1]["path"] == f"/reflect?q=1&key={SECRET}"
        assert SECRET.encode() not in body
        assert [d for d in running.decisions() if d["decision"] == "inject"][-1][
            "path"
        ] == "/reflect"
    finally:
        running.close()


def test_hosts_without_a_secret_keep_the_plain_tunnel(proxy, targets):
    # pypi.test is the same server: through a tunnel the client sees the real certificate,
    # which the kernel's bundle does not vouch for, and the test CA does
    with pytest.raises(ssl.SSLCertVerificationError):
        proxy.https("pypi.test", "/headers")
    status, body = proxy.https("pypi.test", "/headers", KERNEL_HEADERS, cafile=str(targets.cert))
    assert status == 200 and json.loads(body)["Authorization"] == "Bearer kernel-guess"
    assert not [
        d for d in proxy.decisions() if d["decision"] == "inject" and d["host"] == "pypi.test"
    ]


def test_plain_http_to_a_secret_host_carries_no_credential(tmp_path, targets, secret_env):
    port = targets.http_port
    running = Proxy(tmp_path, targets, {f"api.test:{port}": "env:KS_TEST_KEY"})
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(running.endpoint.socket_path))
            sock.sendall(
                f"GET http://api.test:{port}/reflect HTTP/1.1\r\nHost: api.test:{port}\r\n"
                f"{KERNEL_HEADERS}Connection: close\r\n\r\n".encode()
            )
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        assert out.startswith(b"HTTP/1.1 200")
        seen = seen_headers(targets)
        assert "authorization" not in seen and "x-api-key" not in seen
    finally:
        running.close()


def test_host_inside_the_tunnel_must_be_the_target(proxy, targets):
    port = targets.https_port
    with proxy.connect("api.test", port) as tls:
        tls.sendall(f"GET /reflect HTTP/1.1\r\nHost: pypi.test:{port}\r\n\r\n".encode())
        out = tls.recv(65536)
    assert out.startswith(b"HTTP/1.1 403") and b"Host header" in out


def test_compressed_responses_are_not_passed_on(proxy, targets):
    status, body = proxy.https("api.test", "/gzip")
    assert status == 502 and b"compressed" in body and SECRET.encode() not in body


def test_an_invalid_server_certificate_is_refused(tmp_path, targets, secret_env):
    """A server the upstream trust does not vouch for never gets the request (nor the key)."""
    port = targets.https_port
    running = Proxy(tmp_path, targets, {f"api.test:{port}": "env:KS_TEST_KEY"}, upstream_ca="")
    try:  # the host's trust store: the test CA is not in it
        before = len(targets.seen)
        status, body = running.https("api.test", "/reflect")
        assert status == 502 and b"certificate does not verify" in body
        assert len(targets.seen) == before
        assert running.decisions()[-1]["rule"] == "upstream-certificate"
    finally:
        running.close()


def test_another_kernels_ca_is_not_trusted(tmp_path, targets, secret_env):
    """A server with a certificate from kernel two's CA: kernel one's proxy refuses it, and
    kernel one's bundle does not trust it either."""
    port = targets.https_port
    secrets = {f"api.test:{port}": "env:KS_TEST_KEY"}
    one = Proxy(tmp_path / "a", targets, secrets, kernel_id="kernel-one")
    two = Proxy(tmp_path / "b", targets, secrets, kernel_id="kernel-two")
    try:
        assert one.bundle.read_bytes() != two.bundle.read_bytes()
        other = KernelCA("kernel-two", ["api.test"])  # as kernel two's proxy makes its own
        cert, key = other.leaf("api.test")
        other_port = targets.tls_server(cert, key, "kernel-two-leaf")
        ca_file = tmp_path / "two-ca.pem"
        ca_file.write_bytes(other.pem)
        running = Proxy(
            tmp_path / "c",
            targets,
            {f"api.test:{other_port}": "env:KS_TEST_KEY"},
            extra_egress=[f"api.test:{other_port}"],
        )
        try:
            status, body = running.https("api.test", "/reflect", port=other_port)
            assert status == 502 and b"certificate does not verify" in body
        finally:
            running.close()
        # kernel one's bundle against kernel two's certificate, without a proxy in between
        context = ssl.create_default_context(cafile=str(one.bundle))
        with socket.create_connection(("127.0.0.1", other_port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                context.wrap_socket(raw, server_hostname="api.test")
    finally:
        one.close()
        two.close()


def test_the_kernel_ca_vouches_for_its_secret_hosts_only(tmp_path, targets):
    """Name Constraints: even this CA's key could not make another site look genuine."""
    ca = KernelCA("kernel-one", ["api.test"])
    cert, key = ca.leaf("evil.test")  # what a stolen key might mint
    port = targets.tls_server(cert, key, "evil-leaf")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem)
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="name constraint|permitted"):
            context.wrap_socket(raw, server_hostname="evil.test")


def test_bundle_lifecycle_and_no_key_on_disk(tmp_path, targets, secret_env):
    running = Proxy(tmp_path, targets, {f"api.test:{targets.https_port}": "env:KS_TEST_KEY"})
    bundle = running.bundle
    assert bundle.stat().st_mode & 0o777 == 0o644
    pem = bundle.read_text()
    assert pem.count("BEGIN CERTIFICATE") > 1  # the host's trust store, then the kernel's CA
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != running.log:
            text = path.read_bytes()
            assert b"PRIVATE KEY" not in text and SECRET.encode() not in text, path
    running.close()
    assert not bundle.exists()


def test_revoke_and_rotate_take_effect_on_the_next_request(tmp_path, targets, capsys):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o600)
    port = targets.https_port
    running = Proxy(tmp_path / "root", targets, {f"api.test:{port}": f"file:{key_file}"})
    root = str(tmp_path / "root")
    try:
        assert running.https("api.test", "/reflect")[0] == 200
        assert seen_headers(targets)["authorization"] == f"Bearer {SECRET}"
        key_file.write_text("sk-rotated-0000000000\n")
        assert (
            cli_main(
                [
                    "egress",
                    "secrets",
                    "rotate",
                    "kernel-one",
                    f"api.test:{port}",
                    "--runtime-root",
                    root,
                ]
            )
            == 0
        )
        assert running.https("api.test", "/reflect")[0] == 200
        assert seen_headers(targets)["authorization"] == "Bearer sk-rotated-0000000000"
        assert (
            cli_main(
                # a URL as pasted from a notebook names the host too
                [
                    "egress",
                    "secrets",
                    "revoke",
                    "kernel-one",
                    f"https://api.test:{port}/v1",
                    "--runtime-root",
                    root,
                ]
            )
            == 0
        )
        before = len(targets.seen)
        status, body = running.https("api.test", "/reflect")
        assert status == 403 and b"revoked" in body and len(targets.seen) == before
        capsys.readouterr()
        assert cli_main(["egress", "secrets", "list", "--runtime-root", root]) == 0
        out = capsys.readouterr().out
        assert "revoked" in out and f"file:{key_file}" in out and SECRET not in out
        status = EgressControl(root).secrets("kernel-one")
        assert status[0]["state"] == "revoked" and status[0]["injected"] == 2
        assert (
            cli_main(
                [
                    "egress",
                    "secrets",
                    "revoke",
                    "kernel-one",
                    "nothing.test",
                    "--runtime-root",
                    root,
                ]
            )
            == 2
        )
    finally:
        running.close()


def test_unsafe_or_missing_sources_stop_the_start(tmp_path, targets, monkeypatch):
    monkeypatch.delenv("KS_TEST_KEY", raising=False)
    port = targets.https_port
    with pytest.raises(KernelStartError, match="egress proxy exited"):
        Proxy(tmp_path / "a", targets, {f"api.test:{port}": "env:KS_TEST_KEY"})
    loose = tmp_path / "loose"
    loose.write_text(SECRET)
    loose.chmod(0o644)
    with pytest.raises(KernelStartError, match="egress proxy exited"):
        Proxy(tmp_path / "b", targets, {f"api.test:{port}": f"file:{loose}"})
    with pytest.raises(KernelStartError, match="does not cover"):
        Proxy(tmp_path / "c", targets, {"other.test": "env:KS_TEST_KEY"})


def test_the_file_source_checks_owner_and_mode(tmp_path):
    from kernel_sandbox.egress.secrets import SecretSource
    from kernel_sandbox.errors import CredentialsError

    path = tmp_path / "k"
    path.write_text(SECRET)
    path.chmod(0o640)
    with pytest.raises(CredentialsError, match="chmod 600") as info:
        SecretSource("file", str(path)).read()
    assert SECRET not in str(info.value)
    path.chmod(0o600)
    assert SecretSource("file", str(path)).read() == SECRET
    link = tmp_path / "link"
    os.symlink(path, link)
    with pytest.raises(CredentialsError):
        SecretSource("file", str(link)).read()


def test_the_keyring_source(tmp_path):
    """Through the keyring package's API, with a backend of the test's own (the host running
    the tests has no desktop keyring)."""
    import keyring
    from keyring.backend import KeyringBackend

    from kernel_sandbox.egress.secrets import SecretSource
    from kernel_sandbox.errors import CredentialsError

    class Memory(KeyringBackend):
        priority = 1  # type: ignore[assignment]
        store = {("corp/api", "me"): SECRET}

        def get_password(self, service, username):
            return self.store.get((service, username))

        def set_password(self, service, username, password):
            self.store[(service, username)] = password

        def delete_password(self, service, username):
            self.store.pop((service, username), None)

    previous = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        assert SecretSource("keyring", "corp/api/me").read() == SECRET
        with pytest.raises(CredentialsError, match="keyring set corp/api other"):
            SecretSource("keyring", "corp/api/other").read()
    finally:
        keyring.set_keyring(previous)

"""Request overhead of egress_secrets: TLS terminated and the credential added at the proxy,
against the plain CONNECT tunnel, from a sandboxed kernel.

    python bench/egress_secrets.py [--requests 100] [--size-mb 20] [--runtime runc ...]
                                   [--image kernel-sandbox/python:latest] [--json FILE]

One HTTPS server on 127.0.0.1 (nothing else is contacted) answers under two names:
``secret.test`` has a secret (the proxy terminates TLS, adds ``Authorization``, verifies the
server, masks the response) and ``plain.test`` does not (a byte tunnel; the kernel verifies the
server itself). Inside the kernel, timed there: ``--requests`` small GETs each on a new
connection (urllib, one SSL context per host made once), the same on one kept-alive
connection (http.client), and one download.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import ssl
import sys
import tempfile
import threading
from pathlib import Path

from jupyter_client.manager import KernelManager
from traitlets.config import Config

from kernel_sandbox.egress.ca import KernelCA

BLOCK = b"x" * (1024 * 1024)
MB = 1024 * 1024
SECRET_ENV = "KS_BENCH_SECRET"

KERNEL_CODE = r"""
import http.client, json, ssl, time, urllib.request
# one context each, made once: loading a full trust store costs tens of ms per context, the
# same with or without a secret (urllib's default makes one per connection)
PLAIN = ssl.create_default_context(cadata=SERVER_CA)
SECRET = ssl.create_default_context()  # SSL_CERT_FILE: the host's store and the kernel's CA
def ctx(host):
    return PLAIN if host == 'plain.test' else SECRET
def new_connections(host):
    times = []
    for _ in range(COUNT):
        t = time.perf_counter()
        url = f'https://{host}:{PORT}/small'
        with urllib.request.urlopen(url, timeout=30, context=ctx(host)) as r:
            r.read()
        times.append(time.perf_counter() - t)
    return times
def kept_alive(host):
    c = http.client.HTTPSConnection('127.0.0.1', BRIDGE, context=ctx(host), timeout=30)
    c.set_tunnel(host, PORT)
    times = []
    for _ in range(COUNT):
        t = time.perf_counter()
        c.request('GET', '/small'); c.getresponse().read()
        times.append(time.perf_counter() - t)
    c.close()
    return times
def download(host):
    t = time.perf_counter()
    n = 0
    url = f'https://{host}:{PORT}/bytes/{SIZE}'
    with urllib.request.urlopen(url, timeout=300, context=ctx(host)) as r:
        while chunk := r.read(1 << 20):
            n += len(chunk)
    return n / (time.perf_counter() - t) / (1 << 20)
out = {}
for host in ('plain.test', 'secret.test'):
    new_connections(host)  # warm up (leaf certificate minted, caches)
    out[host] = {'new': new_connections(host), 'kept': kept_alive(host), 'mb_s': download(host)}
print(json.dumps(out))
"""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are separate writes: no delayed-ACK stall

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        size = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/bytes/") else 64
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        while size > 0:
            self.wfile.write(BLOCK[: min(size, len(BLOCK))])
            size -= len(BLOCK)


def https_server(folder: Path) -> tuple[http.server.ThreadingHTTPServer, Path]:
    """The server, with a certificate for both names from a CA made for the bench."""
    ca = KernelCA("bench-server", ["secret.test", "plain.test"])
    chain = folder / "server.pem"
    cert, key = ca.leaf("secret.test")
    plain_cert, plain_key = ca.leaf("plain.test")
    chain.write_bytes(cert + key)
    (folder / "plain.pem").write_bytes(plain_cert + plain_key)
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plain.load_cert_chain(folder / "plain.pem")
    context.sni_callback = lambda sock, name, _: (
        setattr(sock, "context", plain) if name == "plain.test" else None
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, ca_file


def sandboxed(runtime: str, image: str | None, port: int, ca_file: Path, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="ks-bench-") as tmp:
        folder = Path(tmp) / "kernels" / f"egress-secrets-bench-{runtime}"
        folder.mkdir(parents=True)
        config = {
            "runtime": runtime,
            "network": "allowlist",
            "egress": [f"secret.test:{port}", f"plain.test:{port}"],
            "egress_hosts": {"secret.test": "127.0.0.1", "plain.test": "127.0.0.1"},
            "egress_secrets": {f"secret.test:{port}": f"env:{SECRET_ENV}"},
            "workspace": "none",
        }
        if image:
            config["image"] = image
        spec = {
            "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "egress secrets bench",
            "language": "python",
            "metadata": {
                "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config}
            },
        }
        (folder / "kernel.json").write_text(json.dumps(spec))
        saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "XDG_STATE_HOME", SECRET_ENV)}
        os.environ.update(JUPYTER_PATH=tmp, XDG_STATE_HOME=tmp)
        os.environ[SECRET_ENV] = "sk-bench-0123456789abcdef"
        operator = Config({"DockerSandboxProvisioner": {"egress_upstream_ca": str(ca_file)}})
        km = KernelManager(kernel_name=folder.name, config=operator)
        try:
            km.start_kernel()
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            code = (
                f"PORT, COUNT, SIZE = {port}, {args.requests}, {args.size_mb * MB}\n"
                f"BRIDGE = {km.provisioner.egress_port}\n"
                f"SERVER_CA = {ca_file.read_text()!r}\n" + KERNEL_CODE
            )
            out: list[str] = []
            reply = kc.execute_interactive(
                code,
                timeout=900,
                output_hook=lambda m: (
                    out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None
                ),
            )
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"the benchmark cell failed: {reply['content']}")
            kc.stop_channels()
            return dict(json.loads("".join(out).strip().splitlines()[-1]))
        finally:
            km.shutdown_kernel(now=True)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--size-mb", type=int, default=20)
    parser.add_argument("--runtime", action="append", default=None, help="default runc, runsc")
    parser.add_argument("--image", default=None, help="kernel image (default: the policy's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ks-bench-ca-") as tmp:
        server, ca_file = https_server(Path(tmp))
        port = server.server_address[1]
        for runtime in args.runtime or ["runc", "runsc"]:
            results[runtime] = sandboxed(runtime, args.image, port, ca_file, args)
        server.shutdown()
    print(
        f"{args.requests} small HTTPS GETs, {args.size_mb} MB download; {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"{'runtime':<8} {'path':<24} {'new conn median/p95 ms':>23} "
        f"{'kept-alive median/p95 ms':>25} {'MB/s':>7}"
    )
    for runtime, hosts in results.items():
        for host, label in (("plain.test", "tunnel (no secret)"), ("secret.test", "injected")):
            r = hosts[host]
            print(
                f"{runtime:<8} {label:<24} {ms(r['new'], 0.5):>11.1f} / {ms(r['new'], 0.95):<9.1f}"
                f" {ms(r['kept'], 0.5):>12.1f} / {ms(r['kept'], 0.95):<10.1f} {r['mb_s']:>7.0f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

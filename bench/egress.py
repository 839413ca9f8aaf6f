"""Egress throughput and latency: a sandboxed kernel through its proxy against loopback direct.

    python bench/egress.py [--size-mb 100] [--requests 100] [--runtime runc --runtime runsc]
                           [--image kernel-sandbox/python:latest] [--json FILE]

Starts one HTTP server on 127.0.0.1 (nothing else is contacted), then measures, in one run:

- **direct**: this process downloads ``--size-mb`` MB and makes ``--requests`` small requests
  (a new connection each, as urllib does) straight to the server on loopback;
- **sandbox (RUNTIME)**: a kernel with ``network: allowlist`` does the same with urllib, through
  the bridge on its loopback, the unix socket and the host-side proxy (plain HTTP forwarding),
  and downloads the same bytes once more through a ``CONNECT`` tunnel (the byte relay that
  HTTPS uses, here without TLS so that only the relay is measured).

Timings of the sandbox rows are taken inside the kernel (no Jupyter round trip in them).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from jupyter_client.manager import KernelManager

BLOCK = b"x" * (1024 * 1024)
MB = 1024 * 1024

KERNEL_CODE = r"""
import json, socket, time, urllib.request
def download(url):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as r:
        n = 0
        while chunk := r.read(1 << 20):
            n += len(chunk)
    return n, time.perf_counter() - started
def small(url, count):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
        times.append(time.perf_counter() - started)
    return times
def tunnel(host, port, path):
    started = time.perf_counter()
    s = socket.create_connection(('127.0.0.1', BRIDGE), timeout=300)
    s.sendall(f'CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n'.encode())
    head = b''
    while not head.endswith(b'\r\n\r\n'):
        head += s.recv(1)
    s.sendall(f'GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n'.encode())
    n, buf = 0, bytearray(1 << 20)
    while got := s.recv_into(buf):
        n += got
    s.close()
    return n, time.perf_counter() - started
n, seconds = download(BASE + f'/bytes/{SIZE}')
t_n, t_seconds = tunnel(HOST, PORT, f'/bytes/{SIZE}')
print(json.dumps({'bytes': n, 'seconds': seconds, 'tunnel_bytes': t_n, 'tunnel_seconds': t_seconds,
                  'small': small(BASE + '/small', COUNT)}))
"""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/bytes/"):
            size = int(self.path.rsplit("/", 1)[1])
        else:
            size = 64
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        while size > 0:
            self.wfile.write(BLOCK[: min(size, len(BLOCK))])
            size -= len(BLOCK)


def direct(base: str, size: int, count: int) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
    started = time.perf_counter()
    n = 0
    with opener.open(f"{base}/bytes/{size}", timeout=300) as response:
        while chunk := response.read(MB):
            n += len(chunk)
    seconds = time.perf_counter() - started
    times = []
    for _ in range(count):
        t = time.perf_counter()
        with opener.open(f"{base}/small", timeout=30) as response:
            response.read()
        times.append(time.perf_counter() - t)
    return {"bytes": n, "seconds": seconds, "small": times}


def sandboxed(runtime: str, image: str | None, port: int, size: int, count: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ks-bench-") as tmp:
        folder = Path(tmp) / "kernels" / f"egress-bench-{runtime}"
        folder.mkdir(parents=True)
        config = {
            "runtime": runtime,
            "network": "allowlist",
            "egress": [f"bench.test:{port}"],
            "egress_hosts": {"bench.test": "127.0.0.1"},
            "memory_limit": "1g",
        }
        if image:
            config["image"] = image
        spec = {
            "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "egress bench",
            "language": "python",
            "metadata": {
                "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config}
            },
        }
        (folder / "kernel.json").write_text(json.dumps(spec))
        old_path, old_state = os.environ.get("JUPYTER_PATH"), os.environ.get("XDG_STATE_HOME")
        os.environ["JUPYTER_PATH"] = tmp
        os.environ["XDG_STATE_HOME"] = tmp  # keep the bench's decisions out of the real log
        km = KernelManager(kernel_name=folder.name)
        try:
            km.start_kernel()
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            code = (
                f"BASE = 'http://bench.test:{port}'; SIZE = {size}; COUNT = {count}\n"
                f"HOST, PORT, BRIDGE = 'bench.test', {port}, {km.provisioner.egress_port}\n"
                + KERNEL_CODE
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
            return json.loads("".join(out).strip().splitlines()[-1])
        finally:
            km.shutdown_kernel(now=True)
            for name, value in (("JUPYTER_PATH", old_path), ("XDG_STATE_HOME", old_state)):
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def summary(name: str, result: dict) -> dict:
    small = sorted(result["small"])
    row = {
        "path": name,
        "download_mb_s": result["bytes"] / MB / result["seconds"],
        "download_s": result["seconds"],
        "small_total_s": sum(small),
        "small_median_ms": 1000 * small[len(small) // 2],
        "small_p95_ms": 1000 * small[int(len(small) * 0.95) - 1],
    }
    if "tunnel_seconds" in result:
        row["tunnel_mb_s"] = result["tunnel_bytes"] / MB / result["tunnel_seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument(
        "--runtime",
        action="append",
        default=None,
        help="runtime(s) to measure (default: runc and runsc)",
    )
    parser.add_argument("--image", default=None, help="kernel image (default: the policy's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    size = args.size_mb * MB
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    rows = [summary("direct on loopback (host)", direct(base, size, args.requests))]
    for runtime in args.runtime or ["runc", "runsc"]:
        result = sandboxed(runtime, args.image, port, size, args.requests)
        rows.append(summary(f"sandbox via proxy ({runtime})", result))
    server.shutdown()
    print(
        f"{args.size_mb} MB download, {args.requests} small requests (new connection each); "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"{'path':<30} {'MB/s':>8} {'100MB s':>8} {'tunnel MB/s':>12} {'small total s':>14} "
        f"{'median ms':>10} {'p95 ms':>8}"
    )
    for row in rows:
        tunnel = f"{row['tunnel_mb_s']:.0f}" if "tunnel_mb_s" in row else "-"
        print(
            f"{row['path']:<30} {row['download_mb_s']:>8.0f} {row['download_s']:>8.2f} "
            f"{tunnel:>12} {row['small_total_s']:>14.2f} {row['small_median_ms']:>10.2f} "
            f"{row['small_p95_ms']:>8.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

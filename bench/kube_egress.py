"""The owner's egress proxy and data broker seen from a pod kernel, against a Docker kernel.

    python bench/kube_egress.py --kubeconfig FILE --egress-address 10.244.0.1
                                [--namespace NAME] [--json FILE]

One kernel per backend, same policy (`network: allowlist`, one dataset), timed inside the
kernel: 100 small HTTP GETs through the proxy (a new connection each), a 50 MB download
through it, and a 50 MB file read through the broker (``kernel_sandbox.data``). On Docker the
path is the loopback bridge and unix sockets; on a pod the launcher's relays over pinned TLS
to the owner's ports at ``--egress-address`` (an address of this host that pods reach: the
test cluster's pod bridge). The target is an HTTP server this script starts on 127.0.0.1 (the
proxy, on this host, connects to it). Needs the test cluster of .ci/k8s and the Docker engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from jupyter_client.manager import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kube import make_namespace, write_spec  # noqa: E402 (bench/kube.py)

BIG = 50 * 1024 * 1024
CELL = """
import json, statistics, time, urllib.request
from kernel_sandbox import data
url = "http://files.example.test:{port}"
lat = []
for _ in range(100):
    t = time.perf_counter()
    urllib.request.urlopen(url + "/small", timeout=30).read()
    lat.append(time.perf_counter() - t)
t = time.perf_counter()
n = len(urllib.request.urlopen(url + "/big", timeout=300).read())
download = time.perf_counter() - t
t = time.perf_counter()
with data.open("bench/big.bin", "rb") as f:
    m = len(f.read())
read = time.perf_counter() - t
lat.sort()
print("RESULT", json.dumps({{
    "small_median_ms": round(statistics.median(lat) * 1000, 2),
    "small_p95_ms": round(lat[94] * 1000, 2),
    "download_MBps": round(n / download / 1e6, 1),
    "broker_read_MBps": round(m / read / 1e6, 1),
}}))
"""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        size = BIG if self.path == "/big" else 12
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"x" * (1024 * 1024)
        while size > 0:
            self.wfile.write(block[: min(size, len(block))])
            size -= len(block)

    def log_message(self, *args: object) -> None:
        pass


def measure(name: str, port: int) -> dict:
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        out: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        kc.execute_interactive(CELL.format(port=port), timeout=600, output_hook=hook)
        text = "".join(out)
        line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{name}: {text}")
        return dict(json.loads(line[7:]))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def drop_namespace(kubeconfig: str, namespace: str) -> None:
    from kernel_sandbox.kube.api import KubeApi

    api = KubeApi(namespace, kubeconfig)
    try:
        api._request("deleting the namespace", "DELETE", f"/api/v1/namespaces/{namespace}")
    except Exception as exc:
        print(f"namespace {namespace}: {exc}", file=sys.stderr)
    finally:
        api.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--egress-address", required=True)
    parser.add_argument("--namespace", default=f"ks-bench-egress-{os.getpid()}")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    make_namespace(args.kubeconfig, args.namespace)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bench").mkdir()
        (root / "bench" / "big.bin").write_bytes(os.urandom(BIG))
        common = {
            "image": "kernel-sandbox/python:latest",
            "memory_limit": "1g",
            "network": "allowlist",
            "egress": [f"files.example.test:{port}"],
            "egress_hosts": {"files.example.test": "127.0.0.1"},
            "datasets": {"bench": f"{root / 'bench'}:read"},
        }
        kube = {
            "backend": "kubernetes",
            "kube_config": args.kubeconfig,
            "kube_namespace": args.namespace,
            "kube_image_pull_policy": "Never",
            "kube_request_ratio": 0.05,
            "kube_egress_address": args.egress_address,
        }
        write_spec(root / "jupyter", "bench-docker", {**common, "workspace": "none"})
        write_spec(root / "jupyter", "bench-kube", {**common, **kube})
        os.environ["JUPYTER_PATH"] = str(root / "jupyter")
        os.environ["XDG_STATE_HOME"] = str(root / "state")
        for backend in ("docker", "kube"):
            results[backend] = measure(f"bench-{backend}", port)
            print(backend, results[backend], flush=True)
    server.shutdown()
    drop_namespace(args.kubeconfig, args.namespace)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Kernels as pods against kernels as Docker containers: start latency and memory, 30 of each.

    python bench/kube.py --kubeconfig FILE [--namespace ks-bench] [--kernels 30]
                         [--concurrency 5] [--json FILE]

For each backend, the same policy (strict, memory_limit 512m) through the same provisioner
(``docker-sandbox``; the policy's ``backend`` key decides), driven by jupyter_client's
``AsyncKernelManager`` as Jupyter Server drives it: ``--kernels`` kernels started
``--concurrency`` at a time, each timed from ``start_kernel`` to the first ``kernel_info``
reply (``wait_for_ready``); then, with all of them idle, the memory of each kernel's container
(the engine's figure, page cache excluded: dockershim runs pods on the same Docker engine, so
both sides are measured alike) and the resident memory of the control plane (API server,
kubelet, etcd, ...) with and without the pods; then all are shut down, timed.
Needs a cluster whose node is this machine (the test cluster of .ci/k8s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

REPO = Path(__file__).resolve().parent.parent
CONTROL_PLANE = (
    "kube-apiserver",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "etcd",
)


def write_spec(root: Path, name: str, config: dict[str, Any]) -> None:
    folder = root / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config}
        },
    }
    (folder / "kernel.json").write_text(json.dumps(spec))


def rss_mib(names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        found = subprocess.run(["pgrep", "-x", name[:15]], capture_output=True, text=True)
        pids = found.stdout.split()
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        out[name] = round(total / 1024, 1)
    return out


def container_memory_mib(prefixes: list[str]) -> list[float]:
    """Memory of the running containers whose name starts with one of ``prefixes``."""
    out = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        name, usage = line.split(" ", 1)
        if any(name.startswith(p) for p in prefixes):
            value = usage.split("/")[0].strip()
            number = float(value[:-3])
            unit = value[-3:]
            found.append(
                number / 1024 if unit == "KiB" else number * 1024 if unit == "GiB" else number
            )
    return found


Check = Callable[[AsyncKernelManager, Any], Awaitable[None]]


async def start_kernels(
    spec: str, kernels: int, concurrency: int, each: Check | None = None
) -> tuple[list[AsyncKernelManager], list[float], list[BaseException]]:
    """Start ``kernels`` kernels of ``spec``, ``concurrency`` at a time, each timed from
    ``start_kernel`` to its first kernel_info reply; ``each(km, client)`` then runs (untimed)
    before its client is closed. Returns the started managers (a kernel whose ``each`` failed
    included, for shutdown), the latencies and the failures. Also tests/test_kube_pod_scale.py.
    """
    gate = asyncio.Semaphore(concurrency)
    managers: list[AsyncKernelManager] = []
    latencies: list[float] = []

    async def start_one() -> None:
        async with gate:
            km = AsyncKernelManager(kernel_name=spec)
            began = time.monotonic()
            try:
                await km.start_kernel()
            finally:
                if km.has_kernel:
                    managers.append(km)
            kc = km.client()
            kc.start_channels()
            try:
                await kc.wait_for_ready(timeout=120)
                latencies.append(time.monotonic() - began)
                if each is not None:
                    await each(km, kc)
            finally:
                kc.stop_channels()

    results = await asyncio.gather(*(start_one() for _ in range(kernels)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    return managers, latencies, errors


async def run_backend(spec: str, kernels: int, concurrency: int) -> dict[str, Any]:
    began = time.monotonic()
    managers, latencies, failures = await start_kernels(spec, kernels, concurrency)
    wall = time.monotonic() - began
    errors = [repr(r) for r in failures]
    await asyncio.sleep(5)  # idle: the imports done, the memory settled
    names = []
    for km in managers:
        prov = km.provisioner
        kube = getattr(prov, "kube", None)
        names.append(
            f"k8s_kernel_{kube.pod_name}_" if kube is not None else str(prov.container_name)
        )
    memory = container_memory_mib(names)
    control = rss_mib(CONTROL_PLANE)
    began = time.monotonic()
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers), return_exceptions=True)
    shutdown = time.monotonic() - began
    latencies.sort()
    return {
        "kernels": len(managers),
        "errors": errors,
        "start_wall_s": round(wall, 2),
        "start_median_s": round(statistics.median(latencies), 2) if latencies else None,
        "start_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2) if latencies else None,
        "start_max_s": round(latencies[-1], 2) if latencies else None,
        "memory_median_mib": round(statistics.median(memory), 1) if memory else None,
        "memory_max_mib": round(max(memory), 1) if memory else None,
        "memory_measured": len(memory),
        "control_plane_rss_mib": control,
        "shutdown_all_s": round(shutdown, 2),
    }


def make_namespace(kubeconfig: str, namespace: str) -> None:
    from kernel_sandbox.kube.api import KubeApi

    api = KubeApi(namespace, kubeconfig)
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    try:
        api._request("creating the namespace", "POST", "/api/v1/namespaces", body=body)
    except Exception as exc:  # already there
        print(f"namespace {namespace}: {exc}", file=sys.stderr)
    finally:
        api.close()
    time.sleep(2)  # its default service account


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", default="ks-bench")
    parser.add_argument("--kernels", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    make_namespace(args.kubeconfig, args.namespace)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = {"memory_limit": "512m", "workspace": "none"}
        write_spec(root, "bench-docker", common)
        write_spec(
            root,
            "bench-kube",
            {
                **common,
                "backend": "kubernetes",
                "kube_config": args.kubeconfig,
                "kube_namespace": args.namespace,
                "kube_image_pull_policy": "Never",
                "kube_request_ratio": 0.05,
            },
        )
        os.environ["JUPYTER_PATH"] = str(root)
        idle = rss_mib(CONTROL_PLANE)
        report = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "kernels": args.kernels,
            "concurrency": args.concurrency,
            "control_plane_idle_rss_mib": idle,
            "docker": asyncio.run(run_backend("bench-docker", args.kernels, args.concurrency)),
            "kubernetes": asyncio.run(run_backend("bench-kube", args.kernels, args.concurrency)),
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()

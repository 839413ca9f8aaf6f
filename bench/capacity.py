"""How many sandboxed kernels this machine holds at once, and what each costs in memory
beyond a plain local kernel.

    python bench/capacity.py [--kernels 60] [--wave 10] [--json FILE]

Starts kernels in waves (each must become ready and execute a cell), local first, then
sandboxed, and measures the host's MemAvailable before and while they run. The memory per
kernel includes everything a kernel brings along: for the sandbox that is the container
shim, init, watchdog and the kernel itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

REPO = Path(__file__).resolve().parent.parent


def mem_available_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def setup_kernelspecs() -> None:
    data = Path(tempfile.mkdtemp(prefix="ks-bench-"))
    kernels = data / "kernels"
    kernels.mkdir()
    os.symlink(REPO / "kernelspecs" / "python3-sandbox", kernels / "python3-sandbox")
    local = kernels / "python3-local"
    local.mkdir()
    (local / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "local",
                "language": "python",
            }
        )
    )
    os.environ["JUPYTER_PATH"] = str(data)


async def start(kernel_name: str):
    km = AsyncKernelManager(kernel_name=kernel_name)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=300)
    reply = await kc.execute_interactive("x = sum(range(1000))", timeout=120)
    assert reply["content"]["status"] == "ok"
    return km, kc


async def hold(kernel_name: str, count: int, wave: int) -> dict:
    baseline = mem_available_mb()
    running: list = []
    started = time.monotonic()
    try:
        while len(running) < count:
            batch = min(wave, count - len(running))
            results = await asyncio.gather(
                *(start(kernel_name) for _ in range(batch)), return_exceptions=True
            )
            ok = [r for r in results if not isinstance(r, BaseException)]
            running += ok
            if len(ok) < batch:
                print(
                    f"  {kernel_name}: {batch - len(ok)} failed at {len(running)} running: "
                    f"{next(r for r in results if isinstance(r, BaseException))!r}"
                )
                break
            print(f"  {kernel_name}: {len(running)} running", flush=True)
        await asyncio.sleep(3)  # let memory settle
        used = baseline - mem_available_mb()
        return {
            "kernels": len(running),
            "seconds": time.monotonic() - started,
            "mb_per_kernel": used / max(1, len(running)),
        }
    finally:
        for _km, kc in running:
            kc.stop_channels()
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km, _ in running))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=int, default=60)
    parser.add_argument("--wave", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    setup_kernelspecs()
    local = await hold("python3-local", args.kernels, args.wave)
    await asyncio.sleep(3)
    sandbox = await hold("python3-sandbox", args.kernels, args.wave)
    result = {
        "local": local,
        "sandbox": sandbox,
        "extra_mb_per_sandboxed_kernel": sandbox["mb_per_kernel"] - local["mb_per_kernel"],
    }
    print(f"{'':10} {'held':>6} {'MB/kernel':>10} {'start-all s':>12}")
    for name in ("local", "sandbox"):
        r = result[name]
        print(f"{name:10} {r['kernels']:>6} {r['mb_per_kernel']:>10.1f} {r['seconds']:>12.1f}")
    print(f"extra memory per sandboxed kernel: {result['extra_mb_per_sandboxed_kernel']:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())

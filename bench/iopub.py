"""IOPub through the host-side relay: start-up and output latency, with and without it.

    python bench/iopub.py [--runs 5] [--prints 1000]

Run it from two checkouts (``PYTHONPATH=<checkout>``) to compare: the relay is part of the
provisioner, so the checkout decides. For each of ``--runs`` kernels (the installed
``python3-sandbox`` kernelspec, i.e. runc) it measures

- **ready**: ``start_kernel()`` plus ``wait_for_ready()``;
- **prints**: one cell printing ``--prints`` lines, each flushed (one stream message each), from
  ``execute`` to its idle status, the client reading every message;
- **burst**: one cell publishing 64 display_data messages of 1 MiB each (under the relay's
  default rate burst), until idle.

Prints medians and every value as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from jupyter_client.manager import KernelManager


def until_idle(kc, code: str) -> tuple[float, int]:
    count = 0

    def hook(msg: dict) -> None:
        nonlocal count
        count += 1

    started = time.perf_counter()
    kc.execute_interactive(code, output_hook=hook, timeout=120)
    return time.perf_counter() - started, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prints", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"ready": [], "prints": [], "burst": []}
    for _ in range(args.runs):
        started = time.perf_counter()
        km = KernelManager(kernel_name="python3-sandbox")
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            results["ready"].append(time.perf_counter() - started)
            until_idle(kc, "print('warm up')")
            elapsed, _ = until_idle(kc, f"for i in range({args.prints}): print(i, flush=True)")
            results["prints"].append(elapsed)
            burst = (
                "from IPython.display import display\n"
                "for _ in range(64): display({'text/plain': 'x' * (1 << 20)}, raw=True)"
            )
            results["burst"].append(until_idle(kc, burst)[0])
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.3f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""What the execution audit costs a round trip: two running sandboxes, audit on and off.

    python bench/audit.py [--blocks 20] [--executions 100] [--json FILE]

In one process it starts two kernels of the checkout's ``python3-sandbox`` kernelspec: one as
shipped (the shell relayed through the host, every execute request and reply recorded in the
hash-chained audit log, here a temporary file) and one with
``DockerSandboxProvisioner.audit_executions = False`` (clients reach the kernel's shell socket
through a link, as before issue 17). It then times ``--blocks`` blocks of ``--executions``
round trips of ``execute("1")`` (each until its reply and idle status, as in
``bench/startup.py``) on each kernel, alternating which goes first, so load on a shared machine
hits both alike. Reported: the median round trip of each and the ratio on/off (issue 17's
target: at most 1.05), with the per-block ratios' quartiles, and the records written and that
the chain verifies. Both kernels are shut down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import SANDBOX_SPEC, _iopub_connected, execute_round_trip  # noqa: E402

TARGET = 1.05


async def start(ksm: KernelSpecManager, audit: bool, log: Path) -> tuple[Any, Any]:
    config = Config()
    config.DockerSandboxProvisioner.audit_executions = audit
    config.DockerSandboxProvisioner.audit_log = str(log)
    km = AsyncKernelManager(kernel_name="python3-sandbox", kernel_spec_manager=ksm, config=config)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)
    await _iopub_connected(kc)
    for _ in range(5):
        await execute_round_trip(kc)
    return km, kc


async def block(kc: Any, executions: int) -> tuple[list[float], float]:
    """The round trips' wall times, and this process's CPU time per round trip (the relay's
    threads and the audit's writes run in it: a cost that load on the machine does not blur)."""
    cpu = time.process_time()
    walls = [await execute_round_trip(kc) for _ in range(executions)]
    return walls, (time.process_time() - cpu) / executions


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ks-bench-audit-"))
    spec_dir = tmp / "kernels" / "python3-sandbox"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(SANDBOX_SPEC.read_text())
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    log = tmp / "audit.jsonl"
    kernels: dict[str, tuple[Any, Any]] = {}
    times: dict[str, list[float]] = {"on": [], "off": []}
    block_medians: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    try:
        kernels["on"] = await start(ksm, True, log)
        kernels["off"] = await start(ksm, False, tmp / "unused.jsonl")
        for i in range(args.blocks):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for label in order:
                sample, per_trip = await block(kernels[label][1], args.executions)
                cpu[label].append(per_trip)
                times[label] += sample
                block_medians[label].append(statistics.median(sample))
            if not args.quiet:
                print(
                    f"block {i + 1:>2}/{args.blocks}  on {block_medians['on'][-1] * 1e3:.3f} ms"
                    f"  off {block_medians['off'][-1] * 1e3:.3f} ms",
                    flush=True,
                )
    finally:
        for km, kc in kernels.values():
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    from kernel_sandbox.audit.verify import verify_chain

    report = verify_chain(log)
    ratios = [a / b for a, b in zip(block_medians["on"], block_medians["off"], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    result = {
        "blocks": args.blocks,
        "executions": args.executions,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "mean_ms": {k: statistics.fmean(v) * 1e3 for k, v in times.items()},
        "ratio_median": statistics.median(times["on"]) / statistics.median(times["off"]),
        "ratio_mean": statistics.fmean(times["on"]) / statistics.fmean(times["off"]),
        "block_ratio_q1_median_q3": [q[0], statistics.median(ratios), q[2]],
        "cpu_ms_per_round_trip": {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
        "records": report.records,
        "chain_intact": report.intact,
        "total_s": {k: sum(v) for k, v in times.items()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--executions", type=int, default=100)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    median, mean = result["median_ms"], result["mean_ms"]
    print(
        f"\nround trip, median (mean): audit on {median['on']:.3f} ({mean['on']:.3f}) ms, "
        f"off {median['off']:.3f} ({mean['off']:.3f}) ms"
    )
    q1, mid, q3 = result["block_ratio_q1_median_q3"]
    verdict = "meets" if result["ratio_median"] <= TARGET else "misses"
    print(
        f"on/off: {result['ratio_median']:.3f}x median, {result['ratio_mean']:.3f}x mean "
        f"(per block {q1:.3f}-{mid:.3f}-{q3:.3f}); {verdict} <= {TARGET}x"
    )
    cpu = result["cpu_ms_per_round_trip"]
    print(
        f"client process CPU per round trip (median of blocks): on {cpu['on']:.3f} ms, off "
        f"{cpu['off']:.3f} ms: the audit adds {cpu['on'] - cpu['off']:.3f} ms"
    )
    print(f"{result['records']} records written, chain intact: {result['chain_intact']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

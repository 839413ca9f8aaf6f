"""The warm pool (issue 16): how fast a claim is, how it holds up, what idle sandboxes cost.

    python bench/pool.py claim [--runs 20] [--pool-size 2] [--no-runsc] [--no-cold] [--json F]
    python bench/pool.py burst [--claims 20] [--pool-size 2] [--runtime runc] [--json F]
    python bench/pool.py idle  [--pool-size 4] [--seconds 10] [--runtime runc] [--json F]

- **claim**: in one process, alternately, a local ipykernel (the installed ``python3``
  kernelspec, as Jupyter starts it) and the checkout's ``python3-sandbox`` with ``pool_size``
  set in its kernelspec (``pool-runc``, ``pool-runsc``), and beside them the same kernelspec
  without a pool (``cold-runc``, ``cold-runsc``). Each start is timed from
  ``AsyncKernelManager.start_kernel()`` to the ``kernel_info_reply`` on a fresh client (as
  ``startup.py``). Before every timed start the script waits until every pool is full again
  (``process_pool().counts()``), so no refill runs during any timed start. A pooled start is
  cut into phases (``phases.py``): jupyter_client before ``pre_launch``, ``pre_launch`` (the
  claim, the connection file, the relay), sending the claim, the waiter starting the kernel
  until its sockets are bound, links and relay attach, jupyter_client after ``launch_kernel``,
  and the client's first ``kernel_info`` round trip.
- **burst**: ``--claims`` starts in a row (each: kernel_info, then the shutdown Jupyter does)
  with a pool of ``--pool-size``, not waiting for refills: how many were served cold, p50/p95.
- **idle**: fills a pool of ``--pool-size`` and reads, per pooled container, its memory cgroup
  (``memory.usage_in_bytes`` and ``memory.stat``), ``docker stats`` and CPU over ``--seconds``
  (``cpuacct.usage``); an idle claimed kernel (a cold start) is measured beside it.

Every kernel and pooled sandbox is removed at the end (the pool's own close, then a sweep by
this process's owner label).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phases as phase_probe  # noqa: E402  (bench/phases.py)
from startup import (  # noqa: E402
    SANDBOX_SPEC,
    _reply,
    machine_facts,
    parse_variant,
    remove_own_containers,
)

LOCAL = "local"
POOL_PREFIX = "ks-pool-"
REFILL_TIMEOUT = 120.0
GOAL_P50 = 0.10  # issue 16: claim -> kernel_info reply


@dataclass
class Kernel:
    """One kind of kernel: a label, its kernelspec and the manager that finds it."""

    label: str
    name: str
    ksm: KernelSpecManager
    pooled: bool = False
    sandboxed: bool = True


@dataclass
class Start:
    seconds: float
    container: str | None
    served_by_pool: bool
    load: float
    phases: dict[str, Any] | None = None


@dataclass
class Series:
    kernel: Kernel
    starts: list[Start] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# -- kernels ----------------------------------------------------------------------------


def sandbox_specs(root: Path, variants: dict[str, dict[str, Any]]) -> KernelSpecManager:
    """One kernelspec per variant: the checkout's python3-sandbox with ``config`` added to
    its provisioner config."""
    template = json.loads(SANDBOX_SPEC.read_text())
    for label, config in variants.items():
        spec = json.loads(json.dumps(template))
        spec["metadata"]["kernel_provisioner"]["config"] = config
        spec["display_name"] = f"{spec['display_name']} [{label}]"
        (root / f"bench-{label}").mkdir(parents=True)
        (root / f"bench-{label}" / "kernel.json").write_text(json.dumps(spec, indent=1))
    return KernelSpecManager(kernel_dirs=[str(root)])


def pool_counts() -> dict[str, int]:
    from kernel_sandbox.host.pool import process_pool

    return process_pool().counts()


async def wait_pools_full(size: int, timeout: float = REFILL_TIMEOUT) -> float:
    """Wait until every pool holds ``size`` sandboxes; return the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        counts = pool_counts()
        if all(n >= size for n in counts.values()):
            return time.monotonic() - began
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the pools did not refill within {timeout:.0f}s: {pool_counts()}")


async def start_once(
    kernel: Kernel, probe: phase_probe.Probe | None, shutdown: str = "graceful"
) -> tuple[Start, AsyncKernelManager | None]:
    """Start ``kernel``, time it until the kernel_info reply on a fresh client; shut it down
    unless ``shutdown`` is "keep" (then the manager is returned, still running)."""
    km = AsyncKernelManager(kernel_name=kernel.name, kernel_spec_manager=kernel.ksm)
    record = probe.begin() if probe is not None and kernel.sandboxed else None
    load = os.getloadavg()[0]
    kc = None
    try:
        started = time.perf_counter()
        await km.start_kernel()
        if record is not None:
            record.mark("start_kernel returned")
        kc = km.client()
        kc.start_channels()
        await _reply(kc, kc.kernel_info())
        seconds = time.perf_counter() - started
        if record is not None:
            record.mark("kernel_info reply")
            await probe.finish(record, km, started)  # type: ignore[union-attr]
        container = getattr(km.provisioner, "container_name", None) if kernel.sandboxed else None
        result = Start(
            seconds,
            container,
            bool(container and container.startswith(POOL_PREFIX)),
            load,
            record.as_dict(started) if record is not None else None,
        )
    except BaseException:
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        raise
    kc.stop_channels()
    if shutdown == "keep":
        return result, km
    await km.shutdown_kernel(now=shutdown == "now")
    return result, None


# -- claim: alternating starts ----------------------------------------------------------


# (label, end of the previous stage, end of this one); points are spans' ends and marks
POOL_STAGES = (
    ("jupyter_client before pre_launch", "start", "pre_launch>"),
    ("pre_launch (claim, connection file, relay)", "<pre_launch", "pre_launch"),
    ("  of which WarmPool.claim", "<claim", "claim"),
    ("launch_kernel -> claim sent", "pre_launch", "send_claim"),
    ("waiter starts the kernel -> sockets bound", "send_claim", "sockets"),
    ("sockets bound -> links + relay attached", "sockets", "launch_kernel"),
    ("  of which links", "<_link_client_sockets", "_link_client_sockets"),
    ("  of which relay attach", "<wait_relay", "wait_relay"),
    ("jupyter_client after launch_kernel", "launch_kernel", "returned"),
    ("client connects -> kernel_info reply", "returned", "reply"),
)


def _pool_points(rec: dict[str, Any]) -> dict[str, float]:
    points = {"start": 0.0}
    for name, begin, end in rec["spans"]:
        points.setdefault(f"<{name}", begin)
        points[name] = end
    points["pre_launch>"] = points.get("<pre_launch", 0.0)
    for name, at in rec["marks"].items():
        if name.startswith("sockets bound"):
            points["sockets"] = at
        elif name == "start_kernel returned":
            points["returned"] = at
        elif name == "kernel_info reply":
            points["reply"] = at
    return points


def pool_stages(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phases of pooled starts, median ms (the unindented ones add up to the start)."""
    out = []
    for title, since, until in POOL_STAGES:
        values = []
        for rec in records:
            points = _pool_points(rec)
            if since in points and until in points:
                values.append((points[until] - points[since]) * 1e3)
        if values:
            out.append(
                {
                    "stage": title,
                    "median_ms": statistics.median(values),
                    "min_ms": min(values),
                    "max_ms": max(values),
                    "runs": len(values),
                }
            )
    return out


async def claim_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size = args.pool_size
    variants: dict[str, dict[str, Any]] = {"pool-runc": {"pool_size": size}}
    if args.runsc:
        variants["pool-runsc"] = {"pool_size": size, "runtime": "runsc"}
    if args.cold:
        variants["cold-runc"] = {}
        if args.runsc:
            variants["cold-runsc"] = {"runtime": "runsc"}
    for variant in args.variant:
        variants[variant.label] = {"pool_size": size, **variant.spec_config}
    ksm = sandbox_specs(tmp, variants)
    kernels = [Kernel(LOCAL, args.local_kernel, KernelSpecManager(), sandboxed=False)]
    kernels += [
        Kernel(label, f"bench-{label}", ksm, pooled=config.get("pool_size", 0) > 0)
        for label, config in variants.items()
    ]
    series = {k.label: Series(k) for k in kernels}
    probe = phase_probe.Probe() if args.phases else None
    if probe:
        probe.install()
    try:
        for kernel in kernels:  # untimed: imports, the first (cold) start that makes the pool
            await start_once(kernel, None)
        await wait_pools_full(size)
        for i in range(args.runs):
            order = kernels if i % 2 == 0 else kernels[::-1]
            for kernel in order:
                await wait_pools_full(size)
                await asyncio.sleep(args.settle)
                try:
                    start, _ = await start_once(kernel, probe)
                except Exception as exc:
                    series[kernel.label].failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    print(f"{kernel.label}: failed: {exc}", file=sys.stderr)
                    if len(series[kernel.label].failures) > 3:
                        raise
                    continue
                series[kernel.label].starts.append(start)
                if not args.quiet:
                    note = " (pool)" if start.served_by_pool else ""
                    print(
                        f"run {i + 1:>2}/{args.runs} {kernel.label:<11} {start.seconds:.3f} s"
                        f"{note}  load {start.load:.1f}",
                        flush=True,
                    )
    finally:
        if probe:
            probe.uninstall()
    out: dict[str, Any] = {"pool_size": size, "kernels": {}}
    for label, s in series.items():
        values = [x.seconds for x in s.starts]
        data: dict[str, Any] = {
            "start_s": percentiles(values),
            "starts": values,
            "served_by_pool": sum(x.served_by_pool for x in s.starts),
            "load": percentiles([x.load for x in s.starts]),
            "failures": s.failures,
        }
        records = [x.phases for x in s.starts if x.phases]
        if records and s.kernel.pooled:
            data["stages"] = pool_stages(
                [x.phases for x in s.starts if x.phases and x.served_by_pool]
            )
        elif records:
            data["stages"] = phase_probe.stages(records)
        if records:
            data["phases"] = phase_probe.summarise(records)
        out["kernels"][label] = data
    local = out["kernels"][LOCAL]["start_s"]
    for data in out["kernels"].values():
        if data["start_s"] and local:
            data["ratio_to_local_p50"] = data["start_s"]["p50"] / local["p50"]
    return out


def print_claim(out: dict[str, Any]) -> None:
    print(f"\npool_size {out['pool_size']}; start -> kernel_info reply, seconds")
    print(f"{'kernel':<12}{'p50':>8}{'p95':>8}{'min':>8}{'max':>8}{'n':>4}{'pool':>6}{'/local':>8}")
    for label, data in out["kernels"].items():
        s = data["start_s"]
        if not s:
            continue
        print(
            f"{label:<12}{s['p50']:>8.3f}{s['p95']:>8.3f}{s['min']:>8.3f}{s['max']:>8.3f}"
            f"{s['n']:>4}{data['served_by_pool']:>6}{data.get('ratio_to_local_p50', 1):>7.2f}x"
        )
    for label, data in out["kernels"].items():
        if data["served_by_pool"] and data["start_s"]:
            p50 = data["start_s"]["p50"]
            verdict = "meets" if p50 <= GOAL_P50 else "misses"
            print(f"{label}: p50 {p50:.3f} s {verdict} the goal <= {GOAL_P50} s")
    for label, data in out["kernels"].items():
        if "stages" in data:
            print(f"\n{label}: stages, median ms (min-max)")
            for row in data["stages"]:
                print(
                    f"    {row['stage']:<48} {row['median_ms']:7.1f}  "
                    f"({row['min_ms']:.0f}-{row['max_ms']:.0f})"
                )


# -- burst: claims in a row -------------------------------------------------------------


async def burst_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"pool_size": args.pool_size}
    if args.runtime != "runc":
        config["runtime"] = args.runtime
    ksm = sandbox_specs(tmp, {"burst": config})
    kernel = Kernel("burst", "bench-burst", ksm, pooled=True)
    await start_once(kernel, None)  # cold: creates the pool
    await wait_pools_full(args.pool_size)
    kept: list[AsyncKernelManager] = []
    starts: list[Start] = []
    began = time.perf_counter()
    try:
        for i in range(args.claims):
            counts = sum(pool_counts().values())
            start, km = await start_once(kernel, None, args.shutdown)
            if km is not None:
                kept.append(km)
            starts.append(start)
            if not args.quiet:
                how = "pool" if start.served_by_pool else "COLD"
                print(
                    f"claim {i + 1:>2}: {start.seconds:.3f} s {how} (waiting before: {counts})",
                    flush=True,
                )
    finally:
        wall = time.perf_counter() - began
        for km in kept:
            await km.shutdown_kernel(now=True)
    values = [s.seconds for s in starts]
    pooled = [s.seconds for s in starts if s.served_by_pool]
    cold = [s.seconds for s in starts if not s.served_by_pool]
    return {
        "pool_size": args.pool_size,
        "runtime": args.runtime,
        "shutdown": args.shutdown,
        "claims": len(starts),
        "wall_s": wall,
        "start_s": percentiles(values),
        "served_cold": len(cold),
        "pooled_start_s": percentiles(pooled),
        "cold_start_s": percentiles(cold),
        "starts": values,
        "served_by_pool": [s.served_by_pool for s in starts],
        "load": percentiles([s.load for s in starts]),
    }


def print_burst(out: dict[str, Any]) -> None:
    s = out["start_s"]
    print(
        f"\n{out['claims']} starts in a row, pool_size {out['pool_size']}, {out['runtime']}, "
        f"shutdown {out['shutdown']}: p50 {s['p50']:.3f} s, p95 {s['p95']:.3f} s, "
        f"max {s['max']:.3f} s; served cold: {out['served_cold']}; wall {out['wall_s']:.1f} s"
    )
    for what in ("pooled_start_s", "cold_start_s"):
        if out[what]:
            x = out[what]
            print(f"  {what[:-8]:<7} n={x['n']:<3} p50 {x['p50']:.3f} s  p95 {x['p95']:.3f} s")


# -- idle: what waiting sandboxes hold --------------------------------------------------

CGROUP = Path("/sys/fs/cgroup")


def cgroup_file(controller: str, container_id: str, name: str) -> Path | None:
    for parent in ("docker", "system.slice"):
        for leaf in (container_id, f"docker-{container_id}.scope"):
            path = CGROUP / controller / parent / leaf / name
            if path.exists():
                return path
    return None


def memory_of(container_id: str) -> dict[str, float]:
    out: dict[str, float] = {}
    usage = cgroup_file("memory", container_id, "memory.usage_in_bytes")
    if usage is not None:
        out["usage_mib"] = int(usage.read_text()) / 2**20
    stat = cgroup_file("memory", container_id, "memory.stat")
    if stat is not None:
        values = dict(line.split() for line in stat.read_text().splitlines())
        for key in ("total_rss", "total_cache", "total_shmem", "total_mapped_file"):
            if key in values:
                out[key.removeprefix("total_") + "_mib"] = int(values[key]) / 2**20
    return out


def cpu_ns(container_id: str) -> int | None:
    path = cgroup_file("cpuacct", container_id, "cpuacct.usage")
    return int(path.read_text()) if path is not None else None


def docker_stats(names: list[str]) -> dict[str, str]:
    fmt = "{{.Name}}\t{{.MemUsage}}\t{{.CPUPerc}}"
    result = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", fmt, *names],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    return {row[0]: f"{row[1]} cpu {row[2]}" for row in rows}


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pooled_containers() -> list[tuple[str, str]]:
    import docker

    client = docker.from_env()
    try:
        labels = ["io.kernel-sandbox.pooled=true", f"io.kernel-sandbox.owner-pid={os.getpid()}"]
        found = client.containers.list(filters={"label": labels})
        return [(c.id, c.name) for c in found]
    finally:
        client.close()


async def idle_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"pool_size": args.pool_size}
    cold_config: dict[str, Any] = {}
    if args.runtime != "runc":
        config["runtime"] = cold_config["runtime"] = args.runtime
    ksm = sandbox_specs(tmp, {"idle": config, "idle-cold": cold_config})
    available_before = mem_available_mib()
    await start_once(Kernel("idle", "bench-idle", ksm, pooled=True), None)
    await wait_pools_full(args.pool_size)
    await asyncio.sleep(args.settle_idle)  # let start-up work die down
    available_after = mem_available_mib()
    _, cold_km = await start_once(Kernel("idle-cold", "bench-idle-cold", ksm), None, "keep")
    assert cold_km is not None
    try:
        await asyncio.sleep(args.settle_idle)
        pooled = pooled_containers()
        kernel = (cold_km.provisioner.container_id, cold_km.provisioner.container_name)  # type: ignore[union-attr]
        watched = [*pooled, kernel]
        cpu_before = {cid: cpu_ns(cid) for cid, _ in watched}
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        cpu_after = {cid: cpu_ns(cid) for cid, _ in watched}
        stats = await asyncio.to_thread(docker_stats, [name for _, name in watched])
        rows = []
        for cid, name in watched:
            before, after = cpu_before[cid], cpu_after[cid]
            cpu = (after - before) / 1e9 / elapsed * 100 if before and after else None
            rows.append(
                {
                    "name": name,
                    "pooled": name.startswith(POOL_PREFIX),
                    "memory": memory_of(cid),
                    "cpu_percent": cpu,
                    "docker_stats": stats.get(name, ""),
                }
            )
    finally:
        await cold_km.shutdown_kernel(now=True)
    pooled_rows = [r for r in rows if r["pooled"]]

    def total(key: str) -> float:
        return sum(r["memory"].get(key, 0.0) for r in pooled_rows)

    return {
        "pool_size": args.pool_size,
        "runtime": args.runtime,
        "seconds": args.seconds,
        "containers": rows,
        "pooled_total": {
            "usage_mib": total("usage_mib"),
            "rss_mib": total("rss_mib"),
            "cpu_percent": sum(r["cpu_percent"] or 0.0 for r in pooled_rows),
        },
        "mem_available_drop_mib": available_before - available_after,
        "load": os.getloadavg(),
    }


def print_idle(out: dict[str, Any]) -> None:
    print(
        f"\nidle, {out['runtime']}, pool_size {out['pool_size']}, CPU over {out['seconds']} s "
        "(usage = the memory cgroup's, rss/cache from memory.stat)"
    )
    for r in out["containers"]:
        m = r["memory"]
        cpu = f"{r['cpu_percent']:.2f}%" if r["cpu_percent"] is not None else "-"
        kind = "pooled" if r["pooled"] else "kernel"
        print(
            f"  {kind:<7}{r['name']:<22} usage {m.get('usage_mib', 0):6.1f} MiB  "
            f"rss {m.get('rss_mib', 0):6.1f}  cache {m.get('cache_mib', 0):6.1f}  "
            f"cpu {cpu:>7}  [docker stats: {r['docker_stats']}]"
        )
    t = out["pooled_total"]
    print(
        f"  pool total: usage {t['usage_mib']:.1f} MiB, rss {t['rss_mib']:.1f} MiB, "
        f"cpu {t['cpu_percent']:.2f}%; MemAvailable dropped {out['mem_available_drop_mib']:.0f} "
        "MiB while the pool filled (noisy: a shared machine)"
    )


# -- shared -----------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else []
    return {
        "p50": statistics.median(values),
        "p95": cuts[18] if cuts else values[0],
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "n": len(values),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernel_sandbox.host.pool import process_pool

    tmp = Path(tempfile.mkdtemp(prefix="ks-bench-pool-"))
    facts = machine_facts()
    try:
        if args.command == "claim":
            out = await claim_run(args, tmp)
        elif args.command == "burst":
            out = await burst_run(args, tmp)
        else:
            out = await idle_run(args, tmp)
    finally:
        await asyncio.to_thread(process_pool().close)
        await asyncio.get_running_loop().shutdown_default_executor()
        remove_own_containers()
        shutil.rmtree(tmp, ignore_errors=True)
    facts["loadavg_after"] = os.getloadavg()
    return {"machine": facts, args.command: out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    claim = sub.add_parser("claim", help="claim -> kernel_info against local and cold starts")
    claim.add_argument("--runs", type=int, default=20, help="timed starts per kernel")
    claim.add_argument("--pool-size", type=int, default=2)
    claim.add_argument("--no-runsc", dest="runsc", action="store_false")
    claim.add_argument("--no-cold", dest="cold", action="store_false")
    claim.add_argument("--no-phases", dest="phases", action="store_false")
    claim.add_argument(
        "--settle", type=float, default=0.5, help="seconds after the pools are full (default 0.5)"
    )
    claim.add_argument(
        "--local-kernel", default="python3", help="the local kernelspec (default python3)"
    )
    claim.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="another pooled sandbox kernel with this provisioner config (pool_size is set "
        "unless given), e.g. warm:image=kernel-sandbox/python:test (repeatable)",
    )
    burst = sub.add_parser("burst", help="claims in a row without waiting for refills")
    burst.add_argument("--claims", type=int, default=20)
    burst.add_argument("--pool-size", type=int, default=2)
    burst.add_argument("--runtime", default="runc")
    burst.add_argument(
        "--shutdown",
        choices=("graceful", "now", "keep"),
        default="graceful",
        help="after each kernel_info: Jupyter's graceful shutdown (default), an immediate one, "
        "or keep every kernel running until the end",
    )
    idle = sub.add_parser("idle", help="memory and CPU of idle pooled sandboxes")
    idle.add_argument("--pool-size", type=int, default=4)
    idle.add_argument("--seconds", type=float, default=10.0, help="CPU sampling window")
    idle.add_argument("--settle-idle", type=float, default=5.0)
    idle.add_argument("--runtime", default="runc")
    for p in (claim, burst, idle):
        p.add_argument("--json", type=Path, help="also write all figures as JSON")
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    {"claim": print_claim, "burst": print_burst, "idle": print_idle}[args.command](
        out[args.command]
    )
    machine = out["machine"]
    print(f"load before {machine['loadavg_before']}, after {machine['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

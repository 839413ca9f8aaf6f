"""Load on this 2-core machine: many kernels at once, and many cycles that leak nothing."""

from __future__ import annotations

import asyncio
import os
import resource
import time

from jupyter_client.manager import AsyncKernelManager
from support.kernels import SANDBOX

CONCURRENT = 30
CYCLES = 200
CYCLE_WORKERS = 2


async def start_ready(index: int) -> tuple[AsyncKernelManager, object]:
    km = AsyncKernelManager(kernel_name=SANDBOX)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=300)
    return km, kc


async def execute_print(kc, value: int) -> str:
    chunks: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])

    reply = await kc.execute_interactive(f"print({value} * 2)", timeout=120, output_hook=hook)
    assert reply["content"]["status"] == "ok"
    return "".join(chunks)


async def stop(km: AsyncKernelManager, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


def test_thirty_kernels_started_at_once_all_work(jupyter_path, leak_check):
    async def main() -> float:
        started = time.monotonic()
        results = await asyncio.gather(
            *(start_ready(i) for i in range(CONCURRENT)), return_exceptions=True
        )
        ready = [r for r in results if not isinstance(r, BaseException)]
        try:
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, f"{len(errors)} of {CONCURRENT} kernels failed: {errors[0]!r}"
            elapsed = time.monotonic() - started
            outputs = await asyncio.gather(
                *(execute_print(kc, i) for i, (_, kc) in enumerate(ready))
            )
            assert outputs == [f"{i * 2}\n" for i in range(CONCURRENT)]
            return elapsed
        finally:
            await asyncio.gather(*(stop(km, kc) for km, kc in ready))

    elapsed = asyncio.run(main())
    print(f"{CONCURRENT} sandboxed kernels ready {elapsed:.1f}s after a concurrent start")


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1024**2


def test_many_cycles_leave_nothing_behind(jupyter_path, leak_check):
    async def cycle(value: int) -> None:
        km, kc = await start_ready(value)
        try:
            assert await execute_print(kc, value) == f"{value * 2}\n"
        finally:
            await stop(km, kc)

    async def worker(numbers: list[int]) -> None:
        for n in numbers:
            await cycle(n)

    async def run(count: int) -> None:
        chunks = [list(range(count))[w::CYCLE_WORKERS] for w in range(CYCLE_WORKERS)]
        await asyncio.gather(*(worker(c) for c in chunks))

    asyncio.run(run(10))  # warm up caches, thread pools and imports
    fds_before, rss_before = open_fds(), rss_mb()
    started = time.monotonic()
    asyncio.run(run(CYCLES))
    elapsed = time.monotonic() - started
    fds_after, rss_after = open_fds(), rss_mb()
    print(
        f"{CYCLES} start/execute/stop cycles in {elapsed:.0f}s; fds {fds_before}->{fds_after}; "
        f"rss {rss_before:.0f}->{rss_after:.0f} MB"
    )
    assert fds_after <= fds_before + 5
    assert rss_after - rss_before < 40

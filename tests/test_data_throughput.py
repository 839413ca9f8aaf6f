"""How fast a large file streams through the broker, against direct local reads, in one run.

A 200 MB file is generated in a temporary directory. In the same run it is read (1 MiB
reads, nothing kept): directly on the host; inside a sandboxed kernel from a read-only bind
mount of the same directory (the sandbox's own "local" read); and inside the same kernel
through its token and the broker. The figures are printed and written to
``artifacts/data-throughput-<runtime>.json``; docs/data.md quotes them.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest
from support.kernels import make_kernelspec
from test_broker import data_kernel, run_json

pytestmark = pytest.mark.integration

SIZE_MB = 200
CHUNK = 1024 * 1024
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

IN_KERNEL = r"""
import hashlib, json, time
from kernel_sandbox import data
def timed(open_file):
    started, total = time.perf_counter(), 0
    with open_file() as f:
        while chunk := f.read(%(chunk)d):
            total += len(chunk)
    return total, time.perf_counter() - started
mount_bytes, mount_s = timed(lambda: open("/mnt/bench/big.bin", "rb", buffering=0))
broker_bytes, broker_s = timed(lambda: data.open("bench/big.bin", "rb"))
tail = hashlib.sha256(data.read_bytes("bench/big.bin", %(size)d - 4096, %(size)d)).hexdigest()
print(json.dumps({"mount": [mount_bytes, mount_s], "broker": [broker_bytes, broker_s],
                  "tail": tail}))
"""


def host_read(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - started


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_stream_200mb_through_the_broker(runtime: str, tmp_path: Path, leak_check) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(bench, 0o755)
    big = bench / "big.bin"
    block = os.urandom(CHUNK)
    with open(big, "wb") as f:
        for i in range(SIZE_MB):
            f.write(block[: CHUNK - 8] + i.to_bytes(8, "big"))
    os.chmod(big, 0o644)
    size = big.stat().st_size
    tail = __import__("hashlib").sha256(big.read_bytes()[-4096:]).hexdigest()
    host_read(big)  # warm the page cache, as every read below then finds it
    name = make_kernelspec(
        f"data-bench-{runtime}",
        {
            "runtime": runtime,
            "datasets": {"bench": f"{bench}:read"},
            "mounts": [f"{bench}:/mnt/bench:ro"],
            "memory_limit": "1g",
        },
    )
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with data_kernel(name, tmp_path / "state") as (_, kc):
        host_s = host_read(big)
        got = run_json(kc, IN_KERNEL % {"chunk": CHUNK, "size": size}, timeout=240)
    peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    mb = size / 1e6
    figures = {
        "runtime": runtime,
        "file_mb": round(mb, 1),
        "host_direct_mb_s": round(mb / host_s),
        "sandbox_bind_mount_mb_s": round(mb / got["mount"][1]),
        "sandbox_broker_mb_s": round(mb / got["broker"][1]),
        "broker_seconds": round(got["broker"][1], 3),
        "owner_process_peak_rss_growth_mb": round(peak_growth_mb, 1),
    }
    print("\n" + json.dumps(figures))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"data-throughput-{runtime}.json").write_text(json.dumps(figures, indent=1) + "\n")
    assert got["mount"][0] == got["broker"][0] == size
    assert got["tail"] == tail
    assert figures["sandbox_broker_mb_s"] > 50
    # streamed, not loaded: the broker (in this process) never held the file
    assert peak_growth_mb < 100

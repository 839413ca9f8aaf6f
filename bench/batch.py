"""Batch execution: 20 small notebooks, 2 at a time, sandboxed kernels against local ones.

    python bench/batch.py [--notebooks 20] [--jobs 2] [--rounds 3] [--local-python PY]
                          [--json FILE]

One process runs the same batch through the engine of ``kernel-sandbox run``
(:class:`kernel_sandbox.batch.runner.BatchRunner`: nbclient, one fresh kernel per notebook, the
kernel shut down after each) with two kernelspecs in a temporary ``JUPYTER_PATH``:

- **sandboxed**: the checkout's ``kernelspecs/python3-sandbox`` (a new container per notebook);
- **local**: a plain ipykernel (``python -m ipykernel_launcher``) of this interpreter, or of
  ``--local-python`` (e.g. a virtual environment with nothing but ipykernel, as lean as the
  kernel image, for a like-for-like comparison).

Rounds alternate which side goes first, so drift on a shared machine hits both alike; one
untimed notebook per side warms up imports first. The figure is the wall time of a whole
batch (from the first kernel start to the last shutdown); the result is the ratio of the
median batch times. Target (issue 5): sandboxed within 1.3x of local.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parent.parent
SANDBOX, LOCAL = "python3-sandbox", "bench-local"
TARGET = 1.3
CELLS = [
    "import json, math, statistics",
    "values = [math.sin(i / 10) for i in range({size})]",
    "summary = {{'n': len(values), 'mean': statistics.fmean(values)}}\nprint(json.dumps(summary))",
    "assert summary['n'] == {size}",
]


def write_notebooks(folder: Path, count: int) -> list[tuple[Path, str]]:
    notebooks = []
    for i in range(count):
        nb = new_notebook(cells=[new_markdown_cell(f"# notebook {i}")])
        nb.cells += [new_code_cell(c.format(size=1000 + 100 * i)) for c in CELLS]
        path = folder / f"nb{i:02d}.ipynb"
        nbformat.write(nb, path)
        notebooks.append((path, path.name))
    return notebooks


def kernelspecs(data: Path, local_python: str) -> None:
    kernels = data / "kernels"
    shutil.copytree(REPO / "kernelspecs" / SANDBOX, kernels / SANDBOX)
    (kernels / LOCAL).mkdir(parents=True)
    (kernels / LOCAL / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [local_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (local, bench)",
                "language": "python",
            }
        )
    )


async def batch(notebooks: list[tuple[Path, str]], kernel: str, jobs: int) -> float:
    from kernel_sandbox.batch.runner import BatchRunner, RunOptions, kernel_config

    options = RunOptions(kernel=kernel, jobs=jobs, timeout=120, config=kernel_config(None, 60))
    started = time.perf_counter()
    results = await BatchRunner(notebooks, options).run()
    elapsed = time.perf_counter() - started
    failed = [f"{r.name}: {r.status.value} {r.summary}" for r in results if not r.ok]
    if failed:
        raise RoundFailed(f"{kernel}: notebooks did not pass:\n" + "\n".join(failed))
    return elapsed


class RoundFailed(RuntimeError):
    """A batch had a failing notebook, so its time means nothing."""


async def timed_batch(
    notebooks: list[tuple[Path, str]], kernel: str, jobs: int, attempts: int = 3
) -> float:
    """A batch's time; a batch disturbed from outside (on a shared engine, another session
    removing containers) is run again, and said so."""
    for attempt in range(1, attempts + 1):
        try:
            return await batch(notebooks, kernel, jobs)
        except RoundFailed as exc:
            if attempt == attempts:
                raise SystemExit(str(exc)) from None
            print(f"  (batch repeated: {str(exc).splitlines()[1]})", flush=True)
    raise AssertionError("unreachable")


def leftover_containers() -> int:
    import docker

    client = docker.from_env()
    try:
        labels = ["io.kernel-sandbox.managed=true", f"io.kernel-sandbox.owner-pid={os.getpid()}"]
        return len(client.containers.list(all=True, filters={"label": labels}))
    finally:
        client.close()


async def measure(args: argparse.Namespace, folder: Path) -> dict:
    notebooks = write_notebooks(folder, args.notebooks)
    for kernel in (SANDBOX, LOCAL):  # warm-up: imports, first container, page cache
        await timed_batch(notebooks[:1], kernel, 1)
    times: dict[str, list[float]] = {SANDBOX: [], LOCAL: []}
    for round_ in range(args.rounds):
        order = (SANDBOX, LOCAL) if round_ % 2 == 0 else (LOCAL, SANDBOX)
        for kernel in order:
            times[kernel].append(await timed_batch(notebooks, kernel, args.jobs))
        print(
            f"round {round_ + 1}: sandboxed {times[SANDBOX][-1]:.2f}s, "
            f"local {times[LOCAL][-1]:.2f}s",
            flush=True,
        )
    sandboxed, local = statistics.median(times[SANDBOX]), statistics.median(times[LOCAL])
    return {
        "notebooks": args.notebooks,
        "jobs": args.jobs,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "local_python": args.local_python,
        "sandboxed_s": times[SANDBOX],
        "local_s": times[LOCAL],
        "sandboxed_median_s": round(sandboxed, 3),
        "local_median_s": round(local, 3),
        "ratio": round(sandboxed / local, 3),
        "target": TARGET,
        "leftover_containers": leftover_containers(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--local-python",
        default=sys.executable,
        help="interpreter of the local kernel (default: this one)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ks-bench-batch-") as tmp:
        data, folder = Path(tmp) / "jupyter", Path(tmp) / "notebooks"
        folder.mkdir()
        kernelspecs(data, args.local_python)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [str(data), os.environ.get("JUPYTER_PATH")])
        )
        report = asyncio.run(measure(args, folder))
    print(
        f"\n{args.notebooks} notebooks, --jobs {args.jobs}, median of {args.rounds} rounds "
        f"({report['cpus']} CPUs):"
    )
    print(f"  sandboxed kernels  {report['sandboxed_median_s']:7.2f} s")
    print(f"  local kernels      {report['local_median_s']:7.2f} s  ({args.local_python})")
    verdict = "within" if report["ratio"] <= TARGET else "over"
    print(f"  ratio              {report['ratio']:7.2f}x  ({verdict} the {TARGET}x target)")
    if report["leftover_containers"]:
        print(f"  LEFT BEHIND: {report['leftover_containers']} container(s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if not report["leftover_containers"] else 1


if __name__ == "__main__":
    sys.exit(main())

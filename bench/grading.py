"""nbgrader autograde: time per submission in the sandboxed grading kernelspec against a plain
local kernel.

    python bench/grading.py [--rounds 3] [--json FILE]     (run with the Python nbgrader is in)

Builds the course of tests/test_grading.py (``tests/support/grading.py``) once, without the
two attackers' submissions (under the local kernel they would attack this machine), and grades
the three honest ones (alice, bob, carol) with one ``nbgrader autograde ps1 --force`` per side
and round, with:

- **sandboxed**: the grading kernelspec of docs/grading.md (``kernel-sandbox install --profile
  strict --memory-limit 256m ...``), direct mode;
- **local**: a plain ipykernel of this interpreter.

Rounds alternate which side goes first. Two figures, medians: ``per_submission``, the wall
time of the whole ``nbgrader autograde`` divided by the submissions (nbgrader's start and
gradebook work included), and ``execution``, one submission's execution alone (kernel start,
cells, shutdown), from "Autograding" to "Writing" in nbgrader's log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.grading import ASSIGNMENT, ATTACKERS, HONEST, KERNEL, make_course  # noqa: E402


def _environment(data: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["JUPYTER_PATH"] = os.pathsep.join(
        [str(data), str(Path(sys.base_prefix) / "share" / "jupyter")]
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["KERNEL_SANDBOX_SERVICE"] = "off"
    return env


def _kernelspecs(data: Path) -> None:
    prefix = data.parent.parent
    subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", "install", "--name", KERNEL]
        + ["--profile", "strict", "--memory-limit", "256m", "--cpu-limit", "1"]
        + ["--pids-limit", "64", "--tmpfs-size", "64m", "--workspace", "ro"]
        + ["--prefix", str(prefix)],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    local = data / "kernels" / "python3-local"
    local.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (local)",
        "language": "python",
    }
    (local / "kernel.json").write_text(json.dumps(spec))


_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) (Autograding|Writing) ")


def _execute_times(log: str) -> list[float]:
    """Seconds from each "Autograding NOTEBOOK" line to the next "Writing" line: the
    execution of one submission (kernel start, cells, shutdown), from nbgrader's own log."""
    times, started = [], None
    for line in log.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        h, mi, sec = m.group(1).split(":")
        at = int(h) * 3600 + int(mi) * 60 + float(sec)
        if m.group(2) == "Autograding":
            started = at
        elif started is not None:
            times.append(at - started)
            started = None
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        data = Path(tmp) / "share" / "jupyter"
        _kernelspecs(data)
        course = make_course(Path(tmp) / "course", _environment(data), [])
        for attacker in ATTACKERS:  # they would attack this machine under the local kernel
            shutil.rmtree(course.root / "submitted" / attacker)
        whole: dict[str, list[float]] = {"sandboxed": [], "local": []}
        execute: dict[str, list[float]] = {"sandboxed": [], "local": []}
        kernels = {"sandboxed": KERNEL, "local": "python3-local"}
        for round_ in range(args.rounds):
            sides = ["sandboxed", "local"] if round_ % 2 == 0 else ["local", "sandboxed"]
            for side in sides:
                started = time.monotonic()
                done = course.nbgrader(
                    "autograde",
                    ASSIGNMENT,
                    "--force",
                    f"--ExecutePreprocessor.kernel_name={kernels[side]}",
                    "--Application.log_format=%(asctime)s.%(msecs)03d %(message)s",
                    "--Application.log_datefmt=%H:%M:%S",
                )
                elapsed = time.monotonic() - started
                if done.returncode != 0:
                    sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
                runs = _execute_times(done.stdout + done.stderr)
                if len(runs) != len(HONEST):
                    sys.exit(f"{side}: {len(runs)} executions in the log:\n{done.stderr[-3000:]}")
                whole[side].append(elapsed / len(HONEST))
                execute[side].extend(runs)
                shown = " ".join(f"{t:.2f}" for t in runs)
                print(
                    f"round {round_ + 1} {side:9} {elapsed:6.2f} s; executions {shown}", flush=True
                )
    result: dict[str, object] = {}
    for what, table in (("per_submission", whole), ("execution", execute)):
        sandboxed, local = (statistics.median(table[s]) for s in ("sandboxed", "local"))
        result[what] = {
            "sandboxed_s": round(sandboxed, 2),
            "local_s": round(local, 2),
            "ratio": round(sandboxed / local, 2),
            "added_s": round(sandboxed - local, 2),
            "samples": {k: [round(v, 2) for v in vs] for k, vs in table.items()},
        }
        print(
            f"{what}: sandboxed {sandboxed:.2f} s, local {local:.2f} s "
            f"({sandboxed / local:.2f}x, +{sandboxed - local:.2f} s)"
        )
    result["load"] = os.getloadavg()[0]
    result["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs"
    print(f"load {result['load']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

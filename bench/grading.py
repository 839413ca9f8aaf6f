"""nbgrader autograde: time per submission in the sandboxed grading kernelspec against a plain
local kernel.

    python bench/grading.py [--rounds 3] [--json FILE]     (run with the Python nbgrader is in)

Builds the course of tests/test_grading.py (``tests/support/grading.py``) once and grades its
three honest submissions (alice, bob, carol: the attackers are left out, they would attack the
host under the local kernel) with ``nbgrader autograde ps1 --force --student S``, one nbgrader
process per submission as an instructor's loop would run it, with:

- **sandboxed**: the grading kernelspec of docs/grading.md (``kernel-sandbox install --profile
  strict --memory-limit 256m ...``), direct mode;
- **local**: a plain ipykernel of this interpreter.

Rounds alternate which side goes first. The figure is the median wall time of one
``nbgrader autograde`` of one submission (nbgrader's own start, its gradebook work and the
kernel's start, cells and shutdown); ``kernel`` is the part of it that differs, the median of
(sandboxed - local).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.grading import ASSIGNMENT, HONEST, KERNEL, make_course  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        data = Path(tmp) / "share" / "jupyter"
        _kernelspecs(data)
        course = make_course(Path(tmp) / "course", _environment(data), [])
        times: dict[str, list[float]] = {"sandboxed": [], "local": []}
        kernels = {"sandboxed": KERNEL, "local": "python3-local"}
        for round_ in range(args.rounds):
            sides = ["sandboxed", "local"] if round_ % 2 == 0 else ["local", "sandboxed"]
            for side in sides:
                for student in HONEST:
                    started = time.monotonic()
                    done = course.nbgrader(
                        "autograde",
                        ASSIGNMENT,
                        "--force",
                        "--student",
                        student,
                        f"--ExecutePreprocessor.kernel_name={kernels[side]}",
                    )
                    elapsed = time.monotonic() - started
                    if done.returncode != 0:
                        sys.exit(f"{side} {student} failed:\n{done.stderr[-3000:]}")
                    times[side].append(elapsed)
                    print(f"round {round_ + 1} {side:9} {student:6} {elapsed:6.2f} s", flush=True)
    sandboxed, local = (statistics.median(times[s]) for s in ("sandboxed", "local"))
    result = {
        "sandboxed_s": round(sandboxed, 2),
        "local_s": round(local, 2),
        "ratio": round(sandboxed / local, 2),
        "kernel_s": round(sandboxed - local, 2),
        "samples": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
        "load": os.getloadavg()[0],
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
    }
    print(
        f"one submission: sandboxed {sandboxed:.2f} s, local {local:.2f} s "
        f"({sandboxed / local:.2f}x, +{sandboxed - local:.2f} s); load {result['load']:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

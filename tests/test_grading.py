"""nbgrader autograding contained: five real submissions, two of them attacks, graded by the
real ``nbgrader autograde`` (run as root, direct mode) in a sandboxed grading kernelspec.

What is checked (issue 18, "Autograding contained"):
- the grades: honest submissions get their points, the attackers nothing;
- nothing of the instructor's (the canaries in the solutions, the unreleased assignment's
  source and release folders, the gradebook) and nothing of another student's submission
  appears in any autograded notebook, feedback page or nbgrader log;
- the attacks got nowhere: no connection reached the listeners started here (loopback and
  the Docker bridge gateway), the gradebook and the other notebooks are unchanged, the
  fork bomb, disk and memory fills stayed in their sandbox (the memory bomb's kernel is
  stopped, nbgrader reports that submission as failed and grades the next one);
- the same attack with a plain local kernel (the control) does read the canaries and reach
  the listener, so the probes can fail.

nbgrader lives in a virtual environment of its own (``.ci/run`` makes it; it adds Jupyter
Server extensions and Notebook 7 to the environment it is installed in): without it these
tests skip, unless ``KS_REQUIRE_NBGRADER=1``, under which a missing nbgrader fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest
from support import REPO
from support.leaks import no_leaks

if not os.environ.get("KS_REQUIRE_NBGRADER"):
    pytest.importorskip("nbgrader", reason="needs nbgrader (own venv: .ci/run makes it)")
import nbformat  # noqa: E402
from nbgrader.api import Gradebook  # noqa: E402
from support.grading import ASSIGNMENT, COURSE_ID, HONEST, KERNEL, Course, make_course  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


class Listener:
    """A TCP listener on one local address that records every connection it gets."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.address = (host, self.sock.getsockname()[1])
        self.got: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.got.append(conn.recv(4096))
                except OSError:
                    self.got.append(b"")

    def close(self) -> None:
        self.sock.close()


def _gateway(client: docker.DockerClient) -> str:
    return client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]


@dataclass
class Graded:
    course: Course
    autograde: subprocess.CompletedProcess[str]
    feedback: subprocess.CompletedProcess[str]
    seconds: float
    logs: str = field(init=False)

    def __post_init__(self) -> None:
        self.logs = "".join(p.stdout + p.stderr for p in (self.autograde, self.feedback))


def _environment(prefix: Path) -> dict[str, str]:
    """nbgrader's environment: this venv's scripts first (nbgrader runs its own ``alembic``),
    the grading kernelspec (and nbconvert's templates) findable, direct mode (no service)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    # nbconvert's templates (feedback) may be in the base Python's share/jupyter, which
    # a --system-site-packages venv's Jupyter does not search
    shared = [str(prefix / "share" / "jupyter"), env.get("JUPYTER_PATH")]
    shared.append(str(Path(sys.base_prefix) / "share" / "jupyter"))
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, shared))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["KERNEL_SANDBOX_SERVICE"] = "off"
    return env


def _install_kernelspec(prefix: Path, runtime: str = "runc") -> None:
    """The grading kernelspec, as docs/grading.md tells an instructor to write it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_sandbox.cli",
            "install",
            "--name",
            KERNEL,
            "--display-name",
            "Grading (sandboxed)",
            "--profile",
            "strict",
            "--memory-limit",
            "256m",
            "--cpu-limit",
            "1",
            "--pids-limit",
            # gVisor's own threads count against the limit: at 64 its sandbox does not start
            "64" if runtime == "runc" else "128",
            "--tmpfs-size",
            "64m",
            "--workspace",
            "ro",
            "--runtime",
            runtime,
            "--prefix",
            str(prefix),
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


@pytest.fixture(scope="module")
def listeners(docker_client: docker.DockerClient) -> Iterator[list[Listener]]:
    """Where mallory phones home: loopback and the Docker bridge gateway of this machine."""
    made = [Listener("127.0.0.1"), Listener(_gateway(docker_client))]
    yield made
    for listener in made:
        listener.close()


def _received(listeners: list[Listener], course: Course) -> list[bytes]:
    """What reached the listeners from a grading run of ``course``."""
    return [got for x in listeners for got in x.got if str(course.root).encode() in got]


@pytest.fixture(scope="module")
def template(
    tmp_path_factory: pytest.TempPathFactory, listeners: list[Listener], jupyter_path: Path
) -> Course:
    """The course with both assignments generated and the five submissions in, not graded;
    each test grades a copy of it."""
    base = tmp_path_factory.mktemp("grading")
    _install_kernelspec(base / "runc")
    return make_course(
        base / "template", _environment(base / "runc"), [x.address for x in listeners]
    )


@pytest.fixture(scope="module")
def graded(docker_client: docker.DockerClient, kernel_image: str, template: Course) -> Graded:
    """Autograde the five submissions once, then write the feedback; no sandbox is left."""
    course = template.copy(template.root.parent / "main", template.env)
    checker = no_leaks(docker_client)
    scope = next(checker)
    scope.spec(KERNEL)
    started = time.monotonic()
    autograde = course.nbgrader("autograde", ASSIGNMENT, "--force")
    seconds = time.monotonic() - started
    feedback = course.nbgrader("generate_feedback", ASSIGNMENT, "--force")
    for _ in checker:  # the leak check: every grading sandbox is gone
        pass
    print(f"autograde of 5 submissions in sandboxes: {seconds:.1f} s")
    return Graded(course, autograde, feedback, seconds)


def _score(course: Course, student: str) -> float:
    with Gradebook(f"sqlite:///{course.root / 'gradebook.db'}", COURSE_ID) as gb:
        return float(gb.find_submission(ASSIGNMENT, student).score)


def _outputs(path: Path) -> str:
    """Everything a notebook's cells printed or returned (not their source)."""
    nb = nbformat.read(path, as_version=4)
    return "\n".join(
        str(out) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )


def _printed(path: Path) -> list[str]:
    """The lines a notebook's cells printed."""
    nb = nbformat.read(path, as_version=4)
    return [
        line
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
        for line in out.text.splitlines()
    ]


def _files(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        if folder.exists():
            yield from (p for p in folder.rglob("*") if p.is_file())


def test_grades_honest_correct_attackers_zero(graded: Graded) -> None:
    course = graded.course
    for student, points in HONEST.items():
        assert _score(course, student) == points, (student, graded.logs[-4000:])
    assert _score(course, "mallory") == 0
    assert _score(course, "eve") == 0
    # mallory was graded (her kernel lived), eve's kernel was stopped by its memory limit:
    # nbgrader reports that one submission and exits 1 after grading the others
    assert (course.root / "autograded" / "mallory" / ASSIGNMENT / "ps1.ipynb").exists()
    eve = graded.logs[graded.logs.find("for eve") :][:6000]
    assert "out of memory (memory_limit 256m)" in graded.logs, eve
    assert "error processing assignment 'ps1' for student 'eve'" in graded.logs
    failed = [line for line in graded.logs.splitlines() if "There was an error processing" in line]
    assert all("eve" in line for line in failed), failed
    assert graded.autograde.returncode == 1


def test_nothing_of_the_instructor_or_other_students_leaks(graded: Graded) -> None:
    course, canaries = graded.course, graded.course.canaries
    autograded, feedback = course.root / "autograded", course.root / "feedback"
    files = list(_files(autograded, feedback))
    assert any(p.suffix == ".html" for p in files), graded.feedback.stderr[-2000:]
    mallory = (autograded / "mallory" / ASSIGNMENT / "ps1.ipynb").read_text()
    assert "DENIED" in mallory and "NO ROUTE" in mallory  # the probes ran
    for path in files:
        text = path.read_text(errors="replace")
        student = path.relative_to(course.root).parts[1]
        for name in ("solution", "future"):
            assert canaries[name] not in text, (name, path)
        for other in HONEST:
            if other != student:
                assert canaries[f"student-{other}"] not in text, (other, path)
    for name in ("solution", "future", *(f"student-{s}" for s in HONEST)):
        assert canaries[name] not in graded.logs, name
    # the hidden tests: nbgrader puts them into each notebook it grades (and shows them in
    # the tracebacks of failing tests and in the feedback), so the kernel grading mallory
    # could read them there and print them (her own notebook's; docs/grading.md)
    assert canaries["hidden"] in _outputs(autograded / "mallory" / ASSIGNMENT / "ps1.ipynb")


def test_attacks_reached_nothing(graded: Graded, listeners: list[Listener]) -> None:
    course = graded.course
    assert _received(listeners, course) == []
    lines = _printed(course.root / "autograded" / "mallory" / ASSIGNMENT / "ps1.ipynb")
    said = {line.split(" ")[0] for line in lines}
    assert not said & {"CONNECTED", "WROTE", "GRADEBOOK"}, lines
    assert {"NO", "CANNOT", "DENIED"} <= said, lines
    out = "\n".join(lines)
    _untouched(course)
    # the grading kernel saw its own folder only, as a uid of its own
    assert "FileNotFoundError" in out and "uid 20" in out


def _untouched(course: Course) -> None:
    """No file of the course on the host (gradebook included) has mallory's mark."""
    for path in _files(course.root):
        assert b"TAMPERED-BY-MALLORY" not in path.read_bytes(), path


def _grade_mallory(course: Course, kernel: str) -> tuple[list[str], str]:
    """Grade only mallory's submission in ``course`` with ``kernel``: what her cells printed,
    and all her outputs."""
    done = course.nbgrader(
        "autograde",
        ASSIGNMENT,
        "--student",
        "mallory",
        "--force",
        f"--ExecutePreprocessor.kernel_name={kernel}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    graded = course.root / "autograded" / "mallory" / ASSIGNMENT / "ps1.ipynb"
    return _printed(graded), _outputs(graded)


def test_the_attack_gets_nothing_under_gvisor_either(
    tmp_path: Path, template: Course, listeners: list[Listener], leak_check
) -> None:
    """The same probes with the grading kernelspec on runsc."""
    _install_kernelspec(tmp_path / "runsc", runtime="runsc")
    leak_check.spec(KERNEL)
    course = template.copy(tmp_path / "course", _environment(tmp_path / "runsc"))
    lines, out = _grade_mallory(course, KERNEL)
    assert _score(course, "mallory") == 0
    said = {line.split(" ")[0] for line in lines}
    assert "CONNECTED" not in said and {"NO", "CANNOT", "DENIED"} <= said, lines
    # gVisor makes the workspace's parent folders in the sandbox's /tmp writable to the
    # kernel: a file "written" at the gradebook's path is the sandbox's own, never the host's
    wrote = [line for line in lines if line.startswith("WROTE")]
    assert all("/autograded/mallory/" not in line for line in wrote), wrote
    _untouched(course)
    assert _received(listeners, course) == []
    for name in ("solution", "future", "student-alice", "student-bob"):
        assert course.canaries[name] not in out, name


def test_control_the_same_attack_with_a_local_kernel_leaks(
    tmp_path: Path, template: Course, listeners: list[Listener]
) -> None:
    """Without the sandbox, mallory's submission reads the instructor's files, the other
    students' work and the gradebook, and phones home: the probes above can fail."""
    course = template.copy(tmp_path / "course", template.env)
    lines, out = _grade_mallory(course, "python3-local")
    canaries = course.canaries
    assert canaries["solution"] in out and canaries["future"] in out
    assert canaries["student-alice"] in out
    assert {"CONNECTED", "WROTE", "GRADEBOOK"} <= {line.split(" ")[0] for line in lines}
    sent = _received(listeners, course)
    assert sent and canaries["solution"].encode() in sent[0]
    with pytest.raises(AssertionError, match="TAMPERED"):
        _untouched(course)

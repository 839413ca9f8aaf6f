"""`kernel-sandbox run`: the real command against real sandboxed kernels.

Misbehaving notebooks (failing, hanging, killing their kernel) are written into each test's
tmp dir; every test that starts kernels checks that no container or runtime dir is left.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import docker
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from support.kernels import make_kernelspec
from support.leaks import assert_nothing_left, containers_of

from kernel_sandbox.batch.runner import (
    BatchRunner,
    RunOptions,
    Status,
    discover,
    inject_parameters,
    kernel_config,
    parse_value,
    write_junit,
)
from kernel_sandbox.cli.app import main
from kernel_sandbox.cli.run import exit_code
from kernel_sandbox.host.uids import DEFAULT_RANGE, UidRange

# as root a kernel runs as a uid of its own from uid_range; otherwise as the user
_RANGE = UidRange.parse(DEFAULT_RANGE)
KERNEL_UID_CHECK = (
    f"{_RANGE.first} <= facts[1] <= {_RANGE.last}"
    if os.getuid() == 0
    else f"facts[1] == {os.getuid()}"
)
CONTAINED = (
    "import os\n"
    "facts = (sorted(os.listdir('/sys/class/net')), os.getuid())\n"
    "print('facts', facts)\n"
    f"assert facts[0] == ['lo'] and {KERNEL_UID_CHECK}, facts"
)


def notebook(path: Path, *cells: str, tags: dict[int, list[str]] | None = None) -> Path:
    """Write a notebook of code cells (a markdown cell first, as real notebooks have)."""
    nb = new_notebook(cells=[new_markdown_cell("# test notebook")])
    for index, source in enumerate(cells):
        cell = new_code_cell(source)
        if tags and index in tags:
            cell.metadata["tags"] = tags[index]
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def command() -> list[str]:
    script = shutil.which("kernel-sandbox")
    return [script] if script else [sys.executable, "-m", "kernel_sandbox.cli"]


def run(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`kernel-sandbox run ARGS`; fails if that process left a container or runtime dir."""
    argv = [*command(), "run", *map(str, args)]
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert_nothing_left(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def junit_cases(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    return {case.get("name"): case for case in suites[0].findall("testcase")}


def outputs(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(
        out.get("text", "") + "".join(out.get("traceback", []))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


# -- fast checks of the pieces ----------------------------------------------------------------


def test_parse_value_reads_values_as_papermill_does():
    assert parse_value("True") is True and parse_value("False") is False
    assert parse_value("None") is None
    assert parse_value("5") == 5 and parse_value("2.5") == 2.5
    assert parse_value("hello") == "hello" and parse_value("5x") == "5x"


def test_inject_parameters_after_the_tagged_cell_and_replaces_an_old_injection(tmp_path):
    path = notebook(
        tmp_path / "p.ipynb", "import os", "limit = 1", "print(limit)", tags={1: ["parameters"]}
    )
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, {"limit": 5, "name": "x y"})
    sources = [c.source for c in nb.cells]
    assert sources[3] == "# Parameters\nlimit = 5\nname = 'x y'\n"
    assert nb.cells[3].metadata["tags"] == ["injected-parameters"]
    inject_parameters(nb, {"limit": 7})
    assert [c.source for c in nb.cells].count("# Parameters\nlimit = 7\n") == 1
    assert len(nb.cells) == len(sources)
    nbformat.validate(nb)


def test_discover_walks_folders_and_refuses_what_is_not_a_notebook(tmp_path):
    notebook(tmp_path / "b.ipynb", "1")
    notebook(tmp_path / "sub" / "a.ipynb", "1")
    notebook(tmp_path / ".ipynb_checkpoints" / "b-checkpoint.ipynb", "1")
    notebook(tmp_path / "out" / "b.ipynb", "1")
    names = [name for _, name in discover([tmp_path], tmp_path / "out")]
    assert names == ["b.ipynb", "sub/a.ipynb"]
    with pytest.raises(FileNotFoundError):
        discover([tmp_path / "missing"])
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="not a notebook"):
        discover([tmp_path / "x.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no notebooks"):
        discover([tmp_path / "empty"])


# -- the real command ---------------------------------------------------------------------------


def test_a_bad_notebook_does_not_stop_the_others(tmp_path, leak_check, docker_client):
    """Failing, hanging and kernel-killing notebooks next to good ones, two at a time."""
    src = tmp_path / "nbs"
    notebook(src / "a_fails.ipynb", "print('before the error')", "1/0", "print('never')")
    notebook(src / "b_hangs.ipynb", "import time\ntime.sleep(600)")
    notebook(src / "c_kills_kernel.ipynb", "import os\nos._exit(3)")
    notebook(src / "d_passes.ipynb", CONTAINED, "x = 6 * 7", "print('answer', x)")
    notebook(src / "sub" / "e_passes.ipynb", CONTAINED)
    report, out = tmp_path / "report.xml", tmp_path / "out"

    started = time.monotonic()
    proc = run(src, "--jobs", "2", "--timeout", "5", "--junit", report, "--output-dir", out)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert elapsed < 90

    # plain log lines (stderr is not a terminal) and the summary table
    log = proc.stderr
    assert "PASSED     d_passes.ipynb" in log and "PASSED     sub/e_passes.ipynb" in log
    assert "FAILED     a_fails.ipynb" in log and "ZeroDivisionError" in log
    assert "TIMED OUT  b_hangs.ipynb" in log
    assert "FAILED     c_kills_kernel.ipynb" in log and "exit status 3" in log
    assert "3 of 5 notebook(s) did not pass" in log
    for name in ("a_fails.ipynb", "b_hangs.ipynb", "c_kills_kernel.ipynb", "sub/e_passes.ipynb"):
        assert name in proc.stdout  # the summary table
    assert "2 passed, 2 failed, 1 timed out" in proc.stdout

    # the JUnit report: one case per notebook, failing cell and traceback in the failure
    cases = junit_cases(report)
    assert sorted(cases) == [
        "a_fails.ipynb",
        "b_hangs.ipynb",
        "c_kills_kernel.ipynb",
        "d_passes.ipynb",
        "sub/e_passes.ipynb",
    ]
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "3", "0")
    failure = cases["a_fails.ipynb"].find("failure")
    assert failure is not None and failure.get("type") == "ZeroDivisionError"
    assert "cell 3 (code cell 2 of 3)" in failure.get("message", "")
    assert "1/0" in (failure.text or "") and "Traceback" in (failure.text or "")
    assert "\x1b" not in (failure.text or "")  # no terminal colour codes in the XML
    timeout = cases["b_hangs.ipynb"].find("failure")
    assert timeout is not None and timeout.get("type") == "CellTimeoutError"
    assert "time.sleep(600)" in (timeout.text or "")
    died = cases["c_kills_kernel.ipynb"].find("failure")
    assert died is not None and died.get("type") == "DeadKernelError"
    assert "os._exit(3)" in (died.text or "")
    for name in ("d_passes.ipynb", "sub/e_passes.ipynb"):
        assert cases[name].find("failure") is None and cases[name].find("error") is None
    assert "before the error" in (cases["a_fails.ipynb"].findtext("system-out") or "")

    # executed notebooks, failed ones included, with their outputs (the kernel was contained)
    assert "facts (['lo'], " in outputs(out / "d_passes.ipynb")
    assert "answer 42" in outputs(out / "d_passes.ipynb")
    assert "facts (['lo'], " in outputs(out / "sub" / "e_passes.ipynb")
    assert "ZeroDivisionError" in outputs(out / "a_fails.ipynb")
    assert not any(
        c.outputs for c in nbformat.read(src / "d_passes.ipynb", 4).cells if c.cell_type == "code"
    )  # sources untouched without --inplace


def test_parameters_allow_errors_and_inplace(tmp_path, leak_check):
    path = notebook(
        tmp_path / "params.ipynb",
        "limit = 1\nname = 'default'\nflag = False",
        "print('got', limit, name, flag, type(limit).__name__)",
        "raise ValueError('tolerated')",
        "print('went on')",
        tags={0: ["parameters"]},
    )
    proc = run(
        path,
        "-p",
        "limit",
        "5",
        "-p",
        "name",
        "hello world",
        "-p",
        "flag",
        "True",
        "--allow-errors",
        "--inplace",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nb = nbformat.read(path, as_version=4)
    injected = nb.cells[2]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert injected.source == "# Parameters\nlimit = 5\nname = 'hello world'\nflag = True\n"
    text = outputs(path)
    assert "got 5 hello world True int" in text
    assert "ValueError" in text and "went on" in text


def test_in_process_main_exit_codes(tmp_path, leak_check):
    good = notebook(tmp_path / "good.ipynb", CONTAINED)
    bad = notebook(tmp_path / "bad.ipynb", "assert False, 'nope'")
    client = docker.from_env()
    before = set(containers_of(client, os.getpid()))  # earlier tests in this process
    assert main(["run", str(good)]) == 0
    assert main(["run", str(good), str(bad), "--jobs", "1"]) == 1
    assert set(containers_of(client, os.getpid())) <= before, "run left containers behind"
    client.close()


def test_profile_really_takes_effect(tmp_path, leak_check):
    """--profile ci sets its environment; --profile analyst makes the workspace writable."""
    ci = notebook(
        tmp_path / "ci" / "env.ipynb",
        "import os\nassert os.environ.get('TZ') == 'UTC', os.environ.get('TZ')\n"
        "assert os.environ.get('PYTHONHASHSEED') == '0'",
    )
    assert run(ci, "--profile", "ci").returncode == 0
    assert run(ci).returncode == 1  # the default (strict) profile sets neither

    write = notebook(
        tmp_path / "rw" / "write.ipynb", "open('written-by-kernel.txt', 'w').write('hi')"
    )
    if os.getuid() == 0:  # the kernel runs as the rw folder's owner: an account, not root
        os.chown(tmp_path / "rw", 1000, 1000)
    strict = run(write)
    assert strict.returncode == 1 and "Read-only file system" in strict.stderr
    assert not (tmp_path / "rw" / "written-by-kernel.txt").exists()
    analyst = run(write, "--profile", "analyst")
    assert analyst.returncode == 0, analyst.stdout + analyst.stderr
    assert (tmp_path / "rw" / "written-by-kernel.txt").read_text() == "hi"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--kernel", "no-such-kernel"], "kernel-sandbox install"),
        (["--profile", "no-such-profile"], "unknown profile"),
        (["--kernel", "python3-local", "--profile", "ci"], "needs a sandboxed kernelspec"),
    ],
)
def test_usage_errors_exit_2_with_what_to_do(tmp_path, args, expected):
    path = notebook(tmp_path / "n.ipynb", "1")
    proc = run(path, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and "[1/1] start" not in proc.stderr


def test_missing_paths_are_usage_errors(tmp_path):
    proc = run(tmp_path / "nope.ipynb")
    assert proc.returncode == 2 and "no such notebook or folder" in proc.stderr


def test_engine_down_exits_2(tmp_path):
    path = notebook(tmp_path / "n.ipynb", "1")
    proc = run(path, env={"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reach the Docker engine" in proc.stderr and "Traceback" not in proc.stderr


def test_image_missing_exits_2(tmp_path, jupyter_path, kernel_image):
    name = make_kernelspec("run-missing-image", {"image": "kernel-sandbox/nope:missing"})
    proc = run(notebook(tmp_path / "n.ipynb", "1"), "--kernel", name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "kernel-sandbox/nope:missing" in proc.stderr
    assert "kernel-sandbox image build" in proc.stderr
    assert "[1/1] start" not in proc.stderr  # stopped before any kernel


def test_a_setup_error_at_kernel_start_stops_the_batch(tmp_path, monkeypatch, jupyter_path):
    """Past the pre-flight check (engine gone later): the rest is skipped, exit 2, reported."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    notebooks = [(notebook(tmp_path / f"n{i}.ipynb", "1"), f"n{i}.ipynb") for i in range(3)]
    runner = BatchRunner(notebooks, RunOptions(jobs=1, config=kernel_config(None, 30)))
    results = asyncio.run(runner.run())
    assert [r.status for r in results] == [Status.ERROR, Status.SKIPPED, Status.SKIPPED]
    assert "cannot reach the Docker engine" in results[0].summary
    assert exit_code(results, runner.setup_error) == 2
    write_junit(results, tmp_path / "r.xml")
    cases = junit_cases(tmp_path / "r.xml")
    assert cases["n0.ipynb"].find("error") is not None
    assert cases["n1.ipynb"].find("skipped") is not None


def _read_pty(fd: int, proc: subprocess.Popen[bytes], limit: float) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data


def test_live_progress_on_a_terminal(tmp_path, leak_check):
    path = notebook(tmp_path / "slow.ipynb", "import time", "time.sleep(2)", "time.sleep(2)")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("CI", None)
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [*command(), "run", str(path)], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    try:
        screen = _read_pty(master, proc, 120).decode(errors="replace")
        assert proc.wait(30) == 0, screen
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_nothing_left(proc.pid)
    assert "starting kernel" in screen
    assert "running cell 2 of 3" in screen and "running cell 3 of 3" in screen
    assert "\x1b[" in screen  # drawn with terminal control sequences, not log lines
    assert "[1/1] start" not in screen
    assert "1 passed" in screen  # the summary


def cell_running(client: docker.DockerClient, pid: int, command: str) -> bool:
    """True once a container of process ``pid`` runs ``command`` (a cell's subprocess)."""
    for cid in containers_of(client, pid):
        try:
            processes = client.api.top(cid)["Processes"] or []
        except docker.errors.APIError:  # not running (yet, or any more)
            continue
        if any(row[-1] == command for row in processes):
            return True
    return False


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_container(tmp_path, leak_check, docker_client, signum, code):
    # the cell's `sleep 600` shows in the container's process list once the cell runs
    path = notebook(tmp_path / "hang.ipynb", "import subprocess\nsubprocess.run(['sleep', '600'])")
    proc = subprocess.Popen(
        [*command(), "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not cell_running(docker_client, proc.pid, "sleep 600"):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("no sandbox container ran the cell")
            time.sleep(0.2)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    assert_nothing_left(proc.pid)

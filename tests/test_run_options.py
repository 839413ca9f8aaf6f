"""`kernel-sandbox run`'s options for CI jobs, each against real sandboxed kernels: a
parameters file, a notebook's own timeout and skip, a whole-notebook timeout, retries of a
kernel that failed to start, heartbeat lines, a kernel killed for memory, the sandbox
recorded in the executed notebook, setup errors (exit 2), and the honest demo notebooks.
"""

from __future__ import annotations

import asyncio
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import docker
import nbformat
import pytest
from support.kernels import make_kernelspec
from test_run import CONTAINED, junit_cases, notebook, outputs, run

from kernel_sandbox.batch.metadata import load_parameters, settings_of
from kernel_sandbox.batch.notebooks import CellMap
from kernel_sandbox.batch.runner import BatchRunner, RunOptions, Status, kernel_config
from kernel_sandbox.cli.run import exit_code

REPO = Path(__file__).resolve().parent.parent
IMAGE = "kernel-sandbox/python:latest"


def with_metadata(path: Path, **settings: object) -> Path:
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernel-sandbox"] = settings
    nbformat.write(nb, path)
    return path


# -- fast checks of the pieces ------------------------------------------------------------------


def test_parameters_files_yaml_and_json(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "limit: 5\nname: hello world\nratios: [0.5, 1]\nday: 2024-01-31\n"
    )
    assert load_parameters(tmp_path / "p.yaml") == {
        "limit": 5,
        "name": "hello world",
        "ratios": [0.5, 1],
        "day": "2024-01-31",  # a YAML date: passed as its ISO text
    }
    (tmp_path / "p.json").write_text('{"limit": 7, "flag": true}')
    assert load_parameters(tmp_path / "p.json") == {"limit": 7, "flag": True}
    (tmp_path / "empty.yaml").write_text("")
    assert load_parameters(tmp_path / "empty.yaml") == {}
    for name, text, error in [
        ("list.yaml", "- 1\n- 2\n", "mapping"),
        ("bad.yaml", "a: [1,\n", "not valid YAML"),
        ("bad.json", "{limit: 1}", "not valid JSON"),
        ("name.yaml", "not-a-name: 1\n", "not an identifier"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=error):
            load_parameters(tmp_path / name)
    with pytest.raises(ValueError, match="cannot read"):
        load_parameters(tmp_path / "missing.yaml")


def test_notebook_settings_are_checked(tmp_path):
    nb = nbformat.v4.new_notebook()
    assert settings_of(nb).skip is None and settings_of(nb).timeout is None
    nb.metadata["kernel-sandbox"] = {"timeout": 30, "notebook_timeout": 0, "skip": True}
    settings = settings_of(nb)
    assert (settings.timeout, settings.notebook_timeout, settings.skip) == (30, 0, "skipped")
    nb.metadata["kernel-sandbox"] = {"skip": "needs a GPU"}
    assert settings_of(nb).skip == "needs a GPU"
    for bad, error in [
        ({"timeout": "30"}, "number of seconds"),
        ({"timeout": -1}, "number of seconds"),
        ({"skip": 1}, "true, false or a reason"),
        ({"timout": 3}, "unknown key"),
    ]:
        nb.metadata["kernel-sandbox"] = bad
        with pytest.raises(ValueError, match=error):
            settings_of(nb)


def test_cell_numbers_are_the_users_whatever_was_injected():
    # markdown, parameters, [injected], code, code
    cells = CellMap(code=(1, 3, 4), injected=2)
    assert cells.label(1) == "cell 2 (code cell 1 of 3)"
    assert cells.label(2) == "the injected parameters cell (-p/-f)"
    assert cells.label(3) == "cell 3 (code cell 2 of 3)"
    assert cells.label(4) == "cell 4 (code cell 3 of 3)"
    assert CellMap(code=(1,)).label(1) == "cell 2 (code cell 1 of 1)"


def test_the_demo_notebooks_tag_no_cell_raises_exception_that_should_pass():
    """A cell tagged raises-exception may raise unnoticed; the demos' cells are meant to pass."""
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            assert "raises-exception" not in cell.metadata.get("tags", []), (path, cell.source)


# -- the real command ---------------------------------------------------------------------------


def test_parameters_file_cell_numbers_and_sandbox_record(tmp_path, leak_check, docker_client):
    """-f YAML and JSON, -p winning; a failure names the user's cell although a parameters
    cell was injected before it; the executed notebook says which sandbox ran it."""
    path = notebook(
        tmp_path / "nb" / "p.ipynb",
        "limit = 1\nname = 'default'\nratio = 0.0",
        "print('got', limit, name, ratio)",
        "assert limit < 5, f'limit is {limit}'",
        tags={0: ["parameters"]},
    )
    (tmp_path / "params.yaml").write_text("limit: 3\nname: from yaml\nratio: 0.5\n")
    (tmp_path / "more.json").write_text('{"name": "from json"}')
    out, report = tmp_path / "out", tmp_path / "r.xml"
    args = ["-f", tmp_path / "params.yaml", "-f", tmp_path / "more.json"]
    proc = run(path, *args, "-p", "limit", "9", "--output-dir", out, "--junit", report)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "got 9 from json 0.5" in outputs(out / "p.ipynb")
    # cells as written: markdown, parameters, print, assert (the injected one is not counted)
    assert "FAILED     p.ipynb" in proc.stderr
    assert "cell 4 (code cell 3 of 3): AssertionError: limit is 9" in proc.stderr
    failure = junit_cases(report)["p.ipynb"].find("failure")
    assert failure is not None
    assert failure.get("message") == "failed: cell 4 (code cell 3 of 3): AssertionError: limit is 9"

    executed = nbformat.read(out / "p.ipynb", as_version=4)
    record = executed.metadata["kernel-sandbox"]["executed"]
    assert record["kernelspec"] == "python3-sandbox"
    assert record["profile"] == "strict"
    assert record["image"] == IMAGE
    assert record["image_id"] == docker_client.images.get(IMAGE).id
    assert record["runtime"] == "runc"
    assert executed.cells[2].metadata["tags"] == ["injected-parameters"]

    # a bad parameters file is a usage error before any kernel starts
    (tmp_path / "bad.yaml").write_text("- a list\n")
    bad = run(path, "-f", tmp_path / "bad.yaml")
    assert bad.returncode == 2 and "mapping of parameter names" in bad.stderr
    assert "[1/1] start" not in bad.stderr


def test_notebook_metadata_timeouts_skip_and_heartbeat(tmp_path, leak_check):
    src = tmp_path / "nbs"
    with_metadata(notebook(src / "a_skipped.ipynb", "1/0"), skip="needs a GPU")
    with_metadata(notebook(src / "b_cell_limit.ipynb", "import time", "time.sleep(60)"), timeout=3)
    notebook(
        src / "c_whole_limit.ipynb",
        "import time",
        "time.sleep(4)",
        "time.sleep(4)",
        "time.sleep(4)",
        "print('never')",
    )
    with_metadata(
        notebook(src / "d_own_whole_limit.ipynb", "import time", "time.sleep(60)"),
        notebook_timeout=4,
    )
    notebook(src / "e_passes.ipynb", CONTAINED)
    report = tmp_path / "r.xml"
    proc = run(src, "-j", "4", "--notebook-timeout", "9", "--heartbeat", "2", "--junit", report)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = proc.stderr
    assert "SKIPPED    a_skipped.ipynb" in log and "needs a GPU" in log
    assert "TIMED OUT  b_cell_limit.ipynb" in log
    assert "cell 3 (code cell 2 of 2): no reply within 3s (its metadata)" in log
    assert "TIMED OUT  c_whole_limit.ipynb" in log
    assert "the notebook ran past 9s (--notebook-timeout)" in log
    assert "TIMED OUT  d_own_whole_limit.ipynb" in log
    assert "the notebook ran past 4s (its metadata)" in log
    assert "PASSED     e_passes.ipynb" in log
    # heartbeats of the long one: the cell it is in, and for how long
    beats = [line for line in log.splitlines() if "running    c_whole_limit.ipynb" in line]
    assert len(beats) >= 2, log
    assert any("(code cell" in line and "running for" in line for line in beats), beats

    cases = junit_cases(report)
    skipped = cases["a_skipped.ipynb"].find("skipped")
    assert skipped is not None and skipped.get("message") == "needs a GPU"
    whole = cases["c_whole_limit.ipynb"].find("failure")
    assert whole is not None and whole.get("type") == "NotebookTimeout"
    assert "time.sleep(4)" in (whole.text or "")

    # a skipped notebook on its own passes the job; a typo in the settings fails it
    alone = run(src / "a_skipped.ipynb")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    typo = with_metadata(notebook(tmp_path / "typo.ipynb", "1"), timout=3)
    proc = run(typo)
    assert proc.returncode == 1 and "unknown key(s)" in proc.stderr


def test_heartbeat_zero_is_silent(tmp_path, leak_check):
    path = notebook(tmp_path / "slow.ipynb", "import time\ntime.sleep(4)")
    proc = run(path, "--heartbeat", "0")
    assert proc.returncode == 0, proc.stderr
    assert "running    slow.ipynb" not in proc.stderr


def test_retries_start_new_kernels_only_for_a_failed_start(tmp_path, jupyter_path, leak_check):
    # the kernel dies starting the first time, and starts the second (a marker in the
    # workspace, which --profile analyst mounts writable, tells the tries apart)
    flaky = make_kernelspec(
        "run-flaky-start",
        argv=[
            "sh",
            "-c",
            "if [ -e started-once ]; then exec python -m ipykernel_launcher -f "
            "{connection_file}; fi; touch started-once; echo 'no kernel this time'; exit 3",
        ],
    )
    folder = tmp_path / "flaky"
    path = notebook(folder / "n.ipynb", "print('ran')")
    if os.getuid() == 0:  # the kernel runs as the folder's owner: an account, not root
        os.chown(folder, 1000, 1000)
    proc = run(path, "--kernel", flaky, "--profile", "analyst", "--retries", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("retry      n.ipynb: the kernel failed to start") == 1
    assert "PASSED     n.ipynb" in proc.stderr

    dead = make_kernelspec(
        "run-dead-start", argv=["python", "-c", "import sys; print('no kernel'); sys.exit(3)"]
    )
    proc = run(notebook(tmp_path / "d.ipynb", "1"), "--kernel", dead, "--retries", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("retry      d.ipynb") == 2
    assert "the kernel failed to start 3 times: --retries" in proc.stderr

    # a failing cell is the notebook's own: never retried
    proc = run(notebook(tmp_path / "f.ipynb", "1/0"), "--retries", "2")
    assert proc.returncode == 1
    assert "retry" not in proc.stderr and proc.stderr.count("[1/1] start") == 1


def test_a_kernel_killed_for_memory_names_its_limit(tmp_path, jupyter_path, leak_check):
    name = make_kernelspec("run-small-memory", {"memory_limit": "256m"})
    path = notebook(tmp_path / "big.ipynb", "x = bytearray(900 * 1024 * 1024)\nprint(len(x))")
    report = tmp_path / "r.xml"
    proc = run(path, "--kernel", name, "--junit", report)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "FAILED     big.ipynb" in x)
    assert "cell 2 (code cell 1 of 1)" in line and "out of memory" in line
    assert "memory_limit of 256m" in line and "--memory-limit" in line
    failure = junit_cases(report)["big.ipynb"].find("failure")
    assert failure is not None and failure.get("type") == "KernelOutOfMemory"


def test_a_cpu_limit_the_engine_refuses_is_a_setup_error(tmp_path, jupyter_path, kernel_image):
    cpus = docker.from_env().info()["NCPU"]
    name = make_kernelspec("run-too-many-cpus", {"cpu_limit": cpus + 8})
    good = notebook(tmp_path / "n.ipynb", "1")
    proc = run(good, "--kernel", name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cpu_limit"), proc.stderr
    assert f"{cpus} CPU(s)" in lines[0] and "Traceback" not in proc.stderr


def test_an_engine_refusal_at_kernel_start_stops_the_batch(tmp_path, jupyter_path, leak_check):
    """Past the pre-flight check, the engine refusing the container is a setup error too:
    exit 2, the notebook not FAILED, the rest skipped."""
    cpus = docker.from_env().info()["NCPU"]
    name = make_kernelspec("run-refused-at-start", {"cpu_limit": cpus + 8})
    notebooks = [(notebook(tmp_path / f"n{i}.ipynb", "1"), f"n{i}.ipynb") for i in range(2)]
    options = RunOptions(kernel=name, jobs=1, retries=2, config=kernel_config(None, 30))
    runner = BatchRunner(notebooks, options)
    results = asyncio.run(runner.run())
    assert [r.status for r in results] == [Status.ERROR, Status.SKIPPED]
    assert results[0].retries == []  # a setup error is not retried
    assert "refused" in results[0].summary and "kernel-sandbox policy show" in results[0].summary
    assert exit_code(results, runner.setup_error) == 2


def test_the_data_demo_passes_with_its_dataset_and_not_without(tmp_path, jupyter_path, leak_check):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    state = tmp_path / "state"
    (config_dir / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "DockerSandboxProvisioner": {
                    "token_db": str(state / "tokens.sqlite"),
                    "audit_log": str(state / "audit.jsonl"),
                }
            }
        )
    )
    env = {"JUPYTER_CONFIG_DIR": str(config_dir)}
    name = make_kernelspec(
        "run-data-demo", {"datasets": {"sales": f"{REPO / 'notebooks' / 'data' / 'sales'}:read"}}
    )
    out, report = tmp_path / "out", tmp_path / "r.xml"
    demo = REPO / "notebooks" / "data-demo.ipynb"
    proc = run(demo, "--kernel", name, "--output-dir", out, "--junit", report, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = outputs(out / "data-demo.ipynb")
    assert " north   8,000" in text and " total  15,700" in text
    assert "NotInScope: dataset 'hr' is not in this kernel's scope" in text
    assert "ReadOnly: dataset 'sales' is read-only for this kernel" in text
    assert not any(
        out.get("output_type") == "error"
        for cell in nbformat.read(out / "data-demo.ipynb", as_version=4).cells
        for out in cell.get("outputs", [])
    )
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"

    # the whole folder with the plain kernelspec: the data demo fails, and says why
    proc = run(REPO / "notebooks", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PASSED     demo.ipynb" in proc.stderr and "PASSED     parameters.ipynb" in proc.stderr
    assert "FAILED     data-demo.ipynb" in proc.stderr
    assert "policy grants no datasets" in proc.stderr

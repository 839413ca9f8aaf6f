"""The notebook's folder keeps its host path inside the sandbox wherever it can, and where it
cannot, the kernel's log, `kernel-sandbox policy show` and the notebook say so.

A folder under /tmp is mounted at its own path inside the sandbox's own /tmp (a tmpfs), so
the absolute paths a user sees in JupyterLab work in the kernel; /tmp itself, and folders
under the image's own paths (/usr, /etc, /opt, /var, ...), appear at /workspace, and the
first cell run says why. Real kernels through jupyter_client, under runc and runsc.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support import IMAGE, REPO
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from test_containment import RUNTIMES

from kernel_sandbox.engine.container import (
    ContainerRequest,
    container_options,
    reserved_for,
    workspace_note,
    workspace_target,
)
from kernel_sandbox.inside.contract import WORKSPACE_FALLBACK, WORKSPACE_NOTE_ENV
from kernel_sandbox.policy import SandboxPolicy

# The image with the hints extension that shows the note (kernel_sandbox/inside/hints.py);
# KS_PATHS_IMAGE points these tests at another build of it.
IMAGE_UNDER_TEST = os.environ.get("KS_PATHS_IMAGE", IMAGE)
RESERVED_FOLDER = "/usr/share"  # exists on every host, read-only for the strict profile


# -- where the workspace goes (no engine) -------------------------------------------------------


@pytest.mark.parametrize(
    "host, inside",
    [
        ("/tmp/nb", "/tmp/nb"),
        ("/tmp/a/b c", "/tmp/a/b c"),
        ("/home/sandbox/nb", "/home/sandbox/nb"),  # the sandbox's home is a tmpfs too
        ("/srv/notebooks", "/srv/notebooks"),
        ("/tmpfoo/nb", "/tmpfoo/nb"),
        ("/tmp", WORKSPACE_FALLBACK),
        ("/home/sandbox", WORKSPACE_FALLBACK),
        ("/usr/share/nb", WORKSPACE_FALLBACK),
        ("/opt/x", WORKSPACE_FALLBACK),
        ("/var/lib/jupyter", WORKSPACE_FALLBACK),
        ("/run/user/1000/nb", WORKSPACE_FALLBACK),
    ],
)
def test_where_the_workspace_appears(host, inside):
    assert workspace_target(host) == inside
    note = workspace_note(host)
    if inside == host:
        assert note is None and reserved_for(host) is None
    else:
        reserved = reserved_for(host)
        assert reserved is not None and (host == reserved or host.startswith(reserved + "/"))
        assert note is not None and note.startswith("kernel-sandbox: ")
        assert host in note and WORKSPACE_FALLBACK in note and "\n" not in note


def _request(workspace: str | None, mode: str = "ro", path: str | None = None):
    policy = SandboxPolicy.from_mapping({"workspace": mode})
    return ContainerRequest(
        name="ks-test",
        policy=policy,
        command=["python"],
        env={"A": "1"},
        labels={},
        runtime_dir="/run/ks/x",
        user="1000:1000",
        workspace=workspace,
        workspace_path=path,
    )


def test_the_kernel_gets_the_note_only_when_the_path_moves():
    kept = container_options(_request("/tmp/nb"))
    assert kept["working_dir"] == "/tmp/nb" and kept["volumes"]["/tmp/nb"]["bind"] == "/tmp/nb"
    assert kept["environment"] == {"A": "1"} and "/tmp" in kept["tmpfs"]
    moved = container_options(_request("/usr/share/nb"))
    assert moved["working_dir"] == WORKSPACE_FALLBACK
    assert moved["environment"][WORKSPACE_NOTE_ENV] == workspace_note("/usr/share/nb")
    # the service's staged bind is mounted at the caller's path: that path decides
    staged = container_options(_request("/run/ks-staging/3", path="/tmp/caller"))
    assert (
        staged["working_dir"] == "/tmp/caller" and WORKSPACE_NOTE_ENV not in staged["environment"]
    )
    none = container_options(_request("/usr/share/nb", mode="none"))
    assert WORKSPACE_NOTE_ENV not in none["environment"]


def _policy_show(cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", "policy", "show", "python3-sandbox"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_policy_show_says_where_the_notebook_folder_is_inside(jupyter_path, tmp_path):
    kept = _policy_show(str(tmp_path))
    assert kept.returncode == 0, kept.stderr
    assert f"a notebook in {tmp_path} runs in {tmp_path} inside\n" in kept.stdout
    moved = _policy_show(RESERVED_FOLDER)
    assert moved.returncode == 0, moved.stderr
    line = next(x for x in moved.stdout.splitlines() if x.startswith("workspace"))
    assert f"a notebook in {RESERVED_FOLDER} runs in /workspace inside, not at its own path" in line
    assert "(/usr is the sandbox's own there)" in line and "relative" in line
    as_json = subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", "policy", "show", "python3-sandbox", "--json"],
        cwd=RESERVED_FOLDER,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    facts = json.loads(as_json.stdout)["workspace_here"]
    assert facts == {"host": RESERVED_FOLDER, "inside": "/workspace"}


# -- real kernels -------------------------------------------------------------------------------

WHERE = "import os; print(os.getcwd()); print(open({probe!r}).read(), end='')"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_notebook_folder_under_tmp_keeps_its_path(
    jupyter_path, leak_check, kernel_image, tmp_path, runtime
):
    folder = tmp_path / "project"
    folder.mkdir()
    tmp_path.chmod(0o755)
    probe = folder / "data.csv"
    probe.write_text("a,b\n")
    probe.chmod(0o644)
    name = make_kernelspec(
        f"paths-{runtime}-{uuid.uuid4().hex[:6]}", {"image": IMAGE_UNDER_TEST, "runtime": runtime}
    )
    with sandbox_kernel(name, cwd=str(folder)) as (_km, kc):
        # the absolute path the user sees in JupyterLab works inside
        first = run_cell(kc, WHERE.format(probe=str(probe)), timeout=60)
        tmp_is_writable = run_cell(kc, "open('/tmp/scratch', 'w').write('x')")
    assert first["status"] == "ok", first
    assert first["stdout"].splitlines() == [str(folder), "a,b"]
    assert "kernel-sandbox" not in first["stderr"]  # nothing to explain
    assert tmp_is_writable["status"] == "ok", tmp_is_writable  # /tmp is still the sandbox's


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_reserved_path_is_explained_in_the_log_and_the_first_cell(
    jupyter_path, leak_check, kernel_image, runtime
):
    name = make_kernelspec(
        f"paths-moved-{runtime}-{uuid.uuid4().hex[:6]}",
        {"image": IMAGE_UNDER_TEST, "runtime": runtime},
    )
    lines = _Lines()
    logger = logging.getLogger("traitlets")  # jupyter_client's (and so the provisioner's) log
    logger.addHandler(lines)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with sandbox_kernel(name, cwd=RESERVED_FOLDER) as (_km, kc):
            first = run_cell(kc, "import os; print(os.getcwd())", timeout=60)
            second = run_cell(kc, "print('again')")
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    note = workspace_note(RESERVED_FOLDER)
    assert note is not None
    assert first["stdout"].strip() == "/workspace"
    assert first["stderr"].strip() == note  # one line, in the first cell
    assert second["stderr"] == "" and second["stdout"] == "again\n"  # once
    logged = [line for line in lines.lines if RESERVED_FOLDER in line and "/workspace" in line]
    assert logged and logged[0].endswith(note.removeprefix("kernel-sandbox: ")), lines.lines


def test_no_workspace_no_note(jupyter_path, leak_check, kernel_image):
    # without a workspace the kernel starts in its home: nothing moved, nothing to say
    name = make_kernelspec(
        f"paths-none-{uuid.uuid4().hex[:6]}",
        {"image": IMAGE_UNDER_TEST, "workspace": "none"},
    )
    with sandbox_kernel(name, cwd=RESERVED_FOLDER) as (_km, kc):
        first = run_cell(kc, "import os; print(os.getcwd())", timeout=60)
    assert first["stdout"].strip() == "/home/sandbox" and first["stderr"] == ""


def test_docs_name_the_rule():
    text = (REPO / "docs" / "configuration.md").read_text()
    assert "/workspace" in text and "/tmp" in text
    assert Path(REPO / "docs" / "notices.md").read_text().count("keep notebooks outside") >= 1

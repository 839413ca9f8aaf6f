"""Real, unchanged Jupyter clients drive sandboxed kernels.

Each client is the tool users already run, started the way they start it: a Jupyter Server
process driven over its REST and websocket channels APIs, nbclient's ``jupyter execute``,
``papermill``, nbclient as a library, and the nbmake pytest plugin. None of them knows the
kernel is in a container; the tests read back facts only a sandbox shows (no network interface
but ``lo``, a non-root uid) and check that no container or runtime directory is left behind.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import docker
import nbformat
import pexpect
import pytest
import websocket
from nbclient import NotebookClient
from support import REPO
from support.kernels import SANDBOX, SANDBOX_UID_PATTERN, is_sandbox_uid
from support.leaks import assert_nothing_left
from support.servers import Server, jupyter_server

pytestmark = pytest.mark.integration

NOTEBOOKS = REPO / "notebooks"
# The notebooks that run in the plain python3-sandbox kernelspec. data-demo.ipynb needs a
# kernelspec granting it the `sales` dataset (tests/test_data_notebook.py sets one up).
PLAIN_NOTEBOOKS = ("demo.ipynb", "parameters.ipynb")
KERNEL_LABEL = "io.kernel-sandbox.kernel-id"
OWNER_PID_LABEL = "io.kernel-sandbox.owner-pid"
# Printed by a cell: what a sandbox shows and a host does not.
FACTS_CODE = (
    "import json, os\n"
    "print(json.dumps({'net': sorted(os.listdir('/sys/class/net')), 'uid': os.getuid()}))"
)
# The uid a kernel gets when the server runs as root (the provisioner's default).


def kernel_containers(client: docker.DockerClient, kernel_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{KERNEL_LABEL}={kernel_id}"})


def run_tool(
    args: list[str], cwd: Path, client: docker.DockerClient, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run a client's CLI with this interpreter's environment (JUPYTER_PATH included).

    Besides its exit status, check that the tool left none of its own sandboxes behind (found
    by the owner-pid label, so kernels of other processes on this machine do not count).
    """
    tool = " ".join(map(str, args[1:3]))
    with subprocess.Popen(
        args,
        cwd=cwd,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            pytest.fail(
                f"{tool} did not finish within {timeout}s\n{stdout[-2000:]}\n{stderr[-2000:]}"
            )
    done = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited with {done.returncode}\n"
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    assert_nothing_left(process.pid, f"{tool} exited but", client)
    return done


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def all_stream_text(nb) -> str:
    return "".join(stream_text(c) for c in nb.cells if c.cell_type == "code")


def assert_demo_outputs(nb) -> None:
    """The executed notebooks/demo.ipynb shows a contained kernel and ordinary results."""
    text = all_stream_text(nb)
    assert "network interfaces: ['lo']" in text
    assert re.search(rf"uid: {SANDBOX_UID_PATTERN}\n", text), text
    assert "root file system: Read-only file system" in text
    assert "connect: Connection refused" in text
    assert "name lookup:" in text
    assert "285\n" in text  # sum of squares below the default limit of 10
    last = nb.cells[-1].outputs
    results = [o for o in last if o.output_type == "execute_result"]
    assert results and results[0].data["text/plain"] == "[0, 1, 4, 9, 16]"
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors, errors


# -- Jupyter Server: REST + websocket channels ------------------------------------------------


@pytest.fixture(scope="module")
def server(jupyter_path, kernel_image, tmp_path_factory):
    """One real `jupyter server` on 127.0.0.1 for this module, stopped whatever happens."""
    root = tmp_path_factory.mktemp("clients-root")
    log = root.parent / "clients-server.log"
    with jupyter_server(root, log, "--ServerApp.open_browser=False") as srv:
        yield srv


def send_request(ws: websocket.WebSocket, msg_type: str, content: dict) -> str:
    """Send a request on the shell channel; return its msg_id."""
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": msg_type,
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": content,
            }
        )
    )
    return msg_id


def send_execute(ws: websocket.WebSocket, code: str) -> str:
    """Send an execute_request on the shell channel; return its msg_id."""
    return send_request(
        ws,
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )


def wait_for_iopub(ws: websocket.WebSocket, timeout: float = 60) -> None:
    """After a restart, ask for kernel_info until its idle status arrives, as frontends do.

    The server's iopub subscription reconnects to the new kernel on ZeroMQ's own schedule
    (every 100 ms); what the kernel publishes before that is lost, for local kernels too.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            collect(ws, send_request(ws, "kernel_info_request", {}), timeout=1)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def collect(ws: websocket.WebSocket, msg_id: str, until: str = "done", timeout: float = 60) -> dict:
    """Read the channels websocket until ``msg_id``'s reply and idle status arrived.

    ``until="stdout"`` returns as soon as the cell printed something (it is running).
    """
    out: dict = {"stdout": "", "error": None, "reply": None, "idle": False}
    deadline = time.monotonic() + timeout
    while not (out["reply"] and out["idle"]):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {until} for request {msg_id} within {timeout}s: {out}")
        # short waits: the server's websocket pings (every 30 s) would restart a long one
        ws.settimeout(min(remaining, 5))
        try:
            msg = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException:
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            out["stdout"] += content["text"]
            if until == "stdout":
                return out
        elif kind == "error":
            out["error"] = content
        elif kind.endswith("_reply"):
            out["reply"] = content
        elif kind == "status" and content["execution_state"] == "idle":
            out["idle"] = True
    return out


def run(ws: websocket.WebSocket, code: str, timeout: float = 60) -> dict:
    return collect(ws, send_execute(ws, code), timeout=timeout)


@pytest.mark.timeout(150)
def test_jupyter_server_rest_and_websocket(server: Server, docker_client, leak_check):
    specs = server.api("GET", "/api/kernelspecs").json()["kernelspecs"]
    assert specs[SANDBOX]["spec"]["display_name"] == "Python 3 (sandboxed)"
    created = server.api("POST", "/api/kernels", json={"name": SANDBOX})
    assert created.status_code == 201, created.text
    kernel = created.json()
    kernel_id = kernel["id"]
    assert kernel["name"] == SANDBOX
    ws = None
    deleted = False
    try:
        (container,) = kernel_containers(docker_client, kernel_id)
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        runtime_dir = Path(container.labels["io.kernel-sandbox.runtime-dir"])
        assert runtime_dir.is_dir()
        ws = server.channels(kernel_id)

        # 1. facts only a sandbox shows, read back from iopub stream messages
        facts = run(ws, FACTS_CODE)
        assert facts["reply"]["status"] == "ok", facts
        seen = json.loads(facts["stdout"])
        assert seen["net"] == ["lo"] and is_sandbox_uid(seen["uid"])
        assert seen["uid"] != 0
        assert run(ws, "marker = 'kept across an interrupt'")["reply"]["status"] == "ok"

        # 2. interrupt over REST: the sleeping cell gets KeyboardInterrupt, the kernel lives on
        sleeper = send_execute(ws, "import time\nprint('sleeping', flush=True)\ntime.sleep(600)")
        assert collect(ws, sleeper, until="stdout")["stdout"] == "sleeping\n"
        started = time.monotonic()
        interrupted = server.api("POST", f"/api/kernels/{kernel_id}/interrupt")
        assert interrupted.status_code == 204, interrupted.text
        result = collect(ws, sleeper, timeout=30)  # its reply, before any new request
        assert result["reply"]["status"] == "error"
        assert result["reply"]["ename"] == "KeyboardInterrupt"
        assert result["error"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 15
        after = run(ws, "print(marker)")
        assert after["stdout"] == "kept across an interrupt\n", after  # not a restart
        (same,) = kernel_containers(docker_client, kernel_id)
        assert same.id == container.id

        # 3. restart over REST: a new container, same websocket, fresh state
        restarted = server.api("POST", f"/api/kernels/{kernel_id}/restart")
        assert restarted.status_code == 200, restarted.text
        (fresh,) = kernel_containers(docker_client, kernel_id)
        assert fresh.id != container.id
        wait_for_iopub(ws)
        again = run(ws, "print('marker' in dir())\n" + FACTS_CODE)
        assert again["reply"]["status"] == "ok", again
        first_line, facts_line = again["stdout"].splitlines()
        assert first_line == "False"
        assert json.loads(facts_line) == seen  # the same uid after an interrupt

        # 4. delete over REST: the container is gone
        gone = server.api("DELETE", f"/api/kernels/{kernel_id}")
        assert gone.status_code == 204, gone.text
        deleted = True
        assert kernel_containers(docker_client, kernel_id) == []
        assert not runtime_dir.exists()
        assert server.api("GET", f"/api/kernels/{kernel_id}").status_code == 404
    finally:
        if ws is not None:
            ws.close()
        if not deleted:
            server.api("DELETE", f"/api/kernels/{kernel_id}")


# -- jupyter console (a terminal frontend) -------------------------------------------------


@pytest.mark.timeout(120)
def test_jupyter_console_runs_and_interrupts(tmp_path, docker_client, leak_check):
    """In a real terminal: a cell runs in the sandbox, Ctrl-C interrupts a long one, and
    leaving the console removes the container."""
    console = pexpect.spawn(
        sys.executable,
        ["-m", "jupyter", "console", "--simple-prompt", "--kernel", SANDBOX],
        cwd=str(tmp_path),
        env=os.environ.copy(),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    try:
        console.expect(r"In \[1\]: ")
        console.sendline(
            "import os, time; print('facts', os.getuid(), os.listdir('/sys/class/net'))"
        )
        console.expect(r"facts (\d+) \['lo'\]")
        assert is_sandbox_uid(int(console.match.group(1)))
        console.expect(r"In \[2\]: ")
        console.sendline("print('asleep', 6 * 7); time.sleep(600)")
        # The cell's own output, never the echo of the typed line: once it shows, the console
        # is waiting on the cell, so Ctrl-C goes to the kernel rather than to the console.
        console.expect("asleep 42")
        console.sendintr()  # Ctrl-C: the console interrupts the kernel through the provisioner
        console.expect("KeyboardInterrupt")
        console.expect(r"In \[\d+\]: ")
        assert "escaped interact" not in console.before, "Ctrl-C hit the console, not the kernel"
        console.sendline("print('still', 6 * 7)")  # the same kernel, not a restart
        console.expect("still 42")
        console.sendline("exit")
        console.expect(pexpect.EOF)
    finally:
        console.close(force=True)
    assert_nothing_left(console.pid, "jupyter console exited but", docker_client)


# -- nbclient's CLI, papermill, nbclient as a library, nbmake ---------------------------------


@pytest.mark.timeout(120)
def test_jupyter_execute_cli(tmp_path, docker_client, leak_check):
    shutil.copy(NOTEBOOKS / "demo.ipynb", tmp_path / "demo.ipynb")
    run_tool(
        [
            sys.executable,
            "-m",
            "jupyter",
            "execute",
            "--kernel_name",
            SANDBOX,
            "--output",
            "demo-executed",
            "demo.ipynb",
        ],
        cwd=tmp_path,
        client=docker_client,
    )
    executed = nbformat.read(tmp_path / "demo-executed.ipynb", as_version=4)
    assert_demo_outputs(executed)
    source = nbformat.read(tmp_path / "demo.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in source.cells)  # the input is left as it was


@pytest.mark.timeout(120)
def test_papermill_injects_parameters(tmp_path, docker_client, leak_check):
    shutil.copy(NOTEBOOKS / "parameters.ipynb", tmp_path / "in.ipynb")
    run_tool(
        [
            sys.executable,
            "-m",
            "papermill",
            "--no-progress-bar",
            "-k",
            SANDBOX,
            "in.ipynb",
            "out.ipynb",
            "-p",
            "name",
            "CI",
            "-p",
            "n",
            "7",
        ],
        cwd=tmp_path,
        client=docker_client,
    )
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    injected = [c for c in out.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert 'name = "CI"' in injected[0].source and "n = 7" in injected[0].source
    text = all_stream_text(out)
    assert "hello CI: 7 squared is 49\n" in text  # not the defaults' "world: 3 ... 9"
    assert "network interfaces: ['lo']" in text
    assert re.search(rf"uid: {SANDBOX_UID_PATTERN}\n", text), text
    assert out.metadata.papermill.parameters == {"name": "CI", "n": 7}
    assert out.metadata.papermill.exception is None


@pytest.mark.timeout(120)
def test_nbclient_library(tmp_path, docker_client, leak_check):
    nb = nbformat.read(NOTEBOOKS / "demo.ipynb", as_version=4)
    mine = {"label": f"{OWNER_PID_LABEL}={os.getpid()}"}
    before = {c.id for c in docker_client.containers.list(all=True, filters=mine)}
    client = NotebookClient(
        nb,
        kernel_name=SANDBOX,
        timeout=60,
        startup_timeout=60,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    after = {c.id for c in docker_client.containers.list(all=True, filters=mine)}
    assert after <= before, "nbclient finished but left its container behind"
    assert_demo_outputs(nb)
    assert nb.metadata.kernelspec.name == SANDBOX
    assert nb.metadata.language_info.name == "python"


@pytest.mark.timeout(180)
def test_nbmake_plugin(tmp_path, docker_client, leak_check):
    folder = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    notebooks = [f"notebooks/{name}" for name in PLAIN_NOTEBOOKS]
    # pin pytest's rootdir and config to the tmp dir, away from this project's settings
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    report = tmp_path / "report.xml"
    done = run_tool(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbmake",
            f"--nbmake-kernel={SANDBOX}",
            "--nbmake-timeout=120",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={report}",
            *notebooks,
        ],
        cwd=tmp_path,
        client=docker_client,
        timeout=170,
    )
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": len(notebooks), "failures": 0, "errors": 0, "skipped": 0}, (
        done.stdout[-3000:]
    )
    assert f"{len(notebooks)} passed" in done.stdout

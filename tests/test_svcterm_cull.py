"""Why a kernel ended, shown to the student, through the sandbox service (issue 18).

A student's locked-down Jupyter Server (no engine access) runs its kernels through the
service. When the operator's ``idle_timeout`` ceiling ends an idle kernel, or an instructor
(an operator group) stops a student's kernel with ``kernel-sandbox stop``, the notebook's
client (the real channels websocket, as JupyterLab holds it) gets the reason under the cell
that ran last, the server forgets the kernel as its own culler would (no restart), and the
server's log says why.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
import websocket
from support import service as svc
from support.servers import Server, execute
from test_service_isolation import home, server_as

pytestmark = pytest.mark.integration

A, OPERATOR = "kstalice", "kstcarol"
IDLE = 6  # seconds: the operator's ceiling for Alice's group
LOCKDOWN = "--ServerApp.jpserver_extensions={'kernel_sandbox.lockdown': True}"
CLI = "import sys\nfrom kernel_sandbox.cli.app import main\nsys.exit(main({argv!r}))\n"


def policy(idle: int | None) -> str:
    return (f"[group.{A}]\nidle_timeout = {idle}\n\n" if idle else "") + (
        f"[group.{OPERATOR}]\noperator = true\n"
    )


@pytest.fixture(scope="module")
def env(sandbox_service: svc.ServiceProcess) -> Iterator[dict[str, str]]:
    yield {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}
    sandbox_service.write_policy("")


@pytest.fixture(scope="module")
def alice(test_users, env) -> Iterator[Server]:
    work = home(A) / "cullwork"
    work.mkdir(exist_ok=True)
    subprocess.run(["chown", f"{A}:{A}", str(work)], check=True)
    with server_as(test_users, A, env, work, LOCKDOWN, "--SandboxLockdown.terminals=off") as server:
        yield server


def send_execute(ws: websocket.WebSocket, code: str) -> str:
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "student",
        "session": uuid.uuid4().hex,
        "version": "5.3",
        "date": "",
    }
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}}
    ws.send(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": {**content, "allow_stdin": False, "stop_on_error": True},
            }
        )
    )
    return msg_id


def told(ws: websocket.WebSocket, timeout: float) -> list[dict]:
    """The stream messages the client gets until the server closes the channels (it does,
    once the kernel has ended for a reason) or ``timeout``."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    ws.settimeout(1)
    while time.monotonic() < deadline:
        try:
            msg = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, ConnectionError, ValueError):
            return got
        if msg.get("msg_type") == "stream":
            got.append(msg)
    raise AssertionError(f"the server did not close the channels; got {got}")


def dead_with_reason(server: Server, kernel_id: str) -> str:
    """The reason the kernel's model gives right after its channels closed (what JupyterLab
    fetches then, and shows in a dialog when the kernel is dead)."""
    model = server.api("GET", f"/api/kernels/{kernel_id}").json()
    assert model.get("execution_state") == "dead", model
    return str(model.get("reason", ""))


def wait_forgotten(server: Server, kernel_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.api("GET", f"/api/kernels/{kernel_id}").status_code != 404:
        assert time.monotonic() < deadline, "the server still has the kernel"
        time.sleep(0.3)


def sandbox_of(test_users, env: dict[str, str], kernel_id: str) -> tuple[str, Path]:
    """The kernel's container (id, as the operator's ``ps`` lists it) and runtime directory."""
    listed = test_users.run_as(OPERATOR, CLI.format(argv=["ps", "--json"]), env=env, check=False)
    container_id = {r["kernel_id"]: r for r in json.loads(listed.stdout)}[kernel_id]["container_id"]
    client = docker.from_env()
    try:
        labels = client.api.inspect_container(container_id)["Config"]["Labels"]
    finally:
        client.close()
    runtime_dir = Path(labels["io.kernel-sandbox.runtime-dir"])
    assert runtime_dir.is_dir(), runtime_dir
    return container_id, runtime_dir


def assert_cleaned(container_id: str, runtime_dir: Path, timeout: float = 40) -> None:
    """The service removes the container and runtime directory of a kernel it ended, whatever
    the client does (a Jupyter Server that forgets a dead kernel sends no cleanup)."""
    client = docker.from_env()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.api.inspect_container(container_id)
                container = True
            except docker.errors.NotFound:
                container = False
            if not container and not runtime_dir.exists():
                return
            assert time.monotonic() < deadline, (
                f"{timeout:.0f} s after the kernel ended: container {container_id[:12]} "
                f"{'remains' if container else 'gone'}, runtime dir {runtime_dir} "
                f"{'remains' if runtime_dir.exists() else 'gone'}"
            )
            time.sleep(0.5)
    finally:
        client.close()


def notices(messages: list[dict]) -> list[tuple[str, str]]:
    return [
        (m["content"]["text"], m["parent_header"].get("msg_id", ""))
        for m in messages
        if "kernel-sandbox: this kernel was shut down" in m["content"].get("text", "")
    ]


def test_an_idle_kernel_is_culled_and_the_student_told_why(test_users, sandbox_service, env, alice):
    sandbox_service.write_policy(policy(IDLE))
    time.sleep(1.5)  # the service re-reads the file when it changes
    created = alice.api("POST", "/api/kernels", json={"name": "python3-sandbox", "path": ""})
    assert created.status_code == 201, created.text
    kernel_id = created.json()["id"]
    ws = alice.channels(kernel_id)
    try:
        assert execute(ws, "print('working')")["stdout"] == "working\n"
        container_id, runtime_dir = sandbox_of(test_users, env, kernel_id)
        msg_id = send_execute(ws, "x = 1")  # the last cell run; then nothing for IDLE s
        started = time.monotonic()
        said = notices(told(ws, 90))
        elapsed = time.monotonic() - started
        reason = dead_with_reason(alice, kernel_id)
    finally:
        ws.close()
    assert said, "the client was not told why its kernel ended"
    text, parent = said[0]
    assert f"idle for {IDLE}s" in text or "idle for" in text, text
    assert f"idle_timeout is {IDLE}s" in text, text
    assert parent == msg_id  # under the cell that ran last
    assert reason.startswith("kernel-sandbox: this kernel was shut down: idle for"), reason
    wait_forgotten(alice, kernel_id)  # shut down as a culler does: no restart
    assert_cleaned(container_id, runtime_dir)
    log = alice.log_path.read_text()  # type: ignore[attr-defined]
    assert f"kernel {kernel_id}: idle for" in log, log[-3000:]
    assert "restarting kernel" not in log.lower()
    print(f"told {elapsed:.1f} s after the last cell (idle_timeout {IDLE} s)")


def test_an_instructor_stops_a_students_kernel_and_the_student_is_told(
    test_users, sandbox_service, env, alice
):
    sandbox_service.write_policy(policy(None))
    time.sleep(1.5)
    created = alice.api("POST", "/api/kernels", json={"name": "python3-sandbox", "path": ""})
    assert created.status_code == 201, created.text
    kernel_id = created.json()["id"]
    ws = alice.channels(kernel_id)
    try:
        assert execute(ws, "print('working')")["stdout"] == "working\n"
        container_id, runtime_dir = sandbox_of(test_users, env, kernel_id)
        msg_id = send_execute(ws, "import time\nprint('long', flush=True)\ntime.sleep(600)")
        listed = test_users.run_as(
            OPERATOR, CLI.format(argv=["ps", "--json"]), env=env, check=False
        )
        rows = {r["kernel_id"]: r for r in json.loads(listed.stdout)}
        assert rows[kernel_id]["owner"] == A, listed.stdout  # the instructor sees whose
        stopped = test_users.run_as(
            OPERATOR, CLI.format(argv=["stop", kernel_id[:8]]), env=env, check=False
        )
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped kernel {kernel_id}" in stopped.stdout and A in stopped.stdout
        said = notices(told(ws, 60))
        reason = dead_with_reason(alice, kernel_id)
    finally:
        ws.close()
    assert f"stopped by {OPERATOR}" in reason, reason
    assert said, "the student was not told why the kernel ended"
    text, parent = said[0]
    assert f"stopped by {OPERATOR}" in text, text
    assert parent == msg_id  # in the cell that was running
    wait_forgotten(alice, kernel_id)
    assert_cleaned(container_id, runtime_dir)
    log = alice.log_path.read_text()  # type: ignore[attr-defined]
    assert f"kernel {kernel_id}: stopped by {OPERATOR}" in log, log[-3000:]

"""The user is told why, where they look: real kernels, real nbclient, a real Jupyter Server.

- a kernel killed for memory: the running cell gets an error naming the memory limit and how
  to raise it (nbclient's notebook, a Jupyter Server websocket client), before the kernel is
  reported dead;
- an idle-culled kernel: a client listening on its websocket gets the reason;
- a network attempt under ``network: none``: a note under the traceback;
- ``%pip install`` / ``!pip install`` / ``python -m pip install``: the message, nothing run.
"""

from __future__ import annotations

import json
import time
import uuid

import nbformat
import pytest
import websocket
from nbformat.v4 import new_code_cell, new_notebook
from support.kernels import bridge_gateway, make_kernelspec, run_cell, sandbox_kernel
from support.servers import jupyter_server

pytestmark = pytest.mark.integration

HOG = (
    "print('filling', flush=True)\n"
    "blocks = []\n"
    "while True:\n"
    "    blocks.append(bytearray(16 * 1024 * 1024))"
)
LIMIT = "160m"


def send(
    ws: websocket.WebSocket, code: str, msg_type: str = "execute_request", channel: str = "shell"
) -> str:
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "username": "test",
        "session": uuid.uuid4().hex,
        "version": "5.3",
        "date": "",
    }
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}}
    if msg_type != "execute_request":
        content = {}
    ws.send(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "channel": channel,
                "content": content,
            }
        )
    )
    return msg_id


def wait_until_answering(ws: websocket.WebSocket, timeout: float = 90) -> None:
    """Ask for kernel_info until the (restarted) kernel replies."""
    deadline = time.monotonic() + timeout
    while True:
        asked = send(ws, "", "kernel_info_request")
        try:
            read_until(ws, lambda m, a=asked: m["parent_header"].get("msg_id") == a, timeout=2)
            return
        except AssertionError:
            assert time.monotonic() < deadline, "the restarted kernel never answered"


def read_until(ws: websocket.WebSocket, done, timeout: float = 90) -> list[dict]:
    """Messages from the channels websocket until ``done(msg)`` (included)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            kinds = [(m["msg_type"], m.get("content", {}).get("execution_state")) for m in seen]
            raise AssertionError(f"timed out; saw {kinds}")
        ws.settimeout(min(left, 5))
        try:
            msg = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException:
            continue
        seen.append(msg)
        if done(msg):
            return seen


# -- out of memory ---------------------------------------------------------------------------


def test_oom_in_nbclient_names_the_memory_limit(jupyter_path, tmp_path, leak_check):
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    name = make_kernelspec(f"oom-{uuid.uuid4().hex[:6]}", {"memory_limit": LIMIT})
    leak_check.spec(name)
    nb = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell(HOG)])
    client = NotebookClient(nb, kernel_name=name, timeout=120)
    with pytest.raises(DeadKernelError):
        client.execute()
    outputs = nb.cells[1].outputs
    errors = [o for o in outputs if o.output_type == "error"]
    assert len(errors) == 1, outputs
    assert errors[0].ename == "KernelOutOfMemory"
    text = "\n".join(errors[0].traceback)
    assert "memory limit (160m)" in text
    assert "memory_limit" in text and "c.DockerSandboxProvisioner.memory_limit" in text
    nbformat.write(nb, tmp_path / "out.ipynb")  # what papermill would save: it is in the file
    assert "memory limit (160m)" in (tmp_path / "out.ipynb").read_text()


def test_oom_reaches_a_jupyter_server_client_before_the_restart(jupyter_path, tmp_path, leak_check):
    name = make_kernelspec(f"oom-{uuid.uuid4().hex[:6]}", {"memory_limit": LIMIT})
    leak_check.spec(name)
    with jupyter_server(tmp_path, tmp_path / "server.log") as server:
        leak_check.pids.add(server.process.pid)
        kernel = server.api("POST", "/api/kernels", json={"name": name}).json()["id"]
        ws = server.channels(kernel)
        try:
            cell = send(ws, HOG)
            seen = read_until(
                ws,
                lambda m: (
                    m["msg_type"] == "status" and m["content"]["execution_state"] == "restarting"
                ),
            )
            # the restarted kernel works, on the same websocket, once it answers (as JupyterLab
            # does: a request sent while the server restarts it may be lost, in any Jupyter)
            wait_until_answering(ws)
            after = send(ws, "print('back')")
            # until IOPub's idle for it: the reply (shell) may overtake the output (IOPub)
            back = read_until(
                ws,
                lambda m: (
                    m["parent_header"].get("msg_id") == after
                    and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle"
                ),
            )
            assert any(m["msg_type"] == "stream" and m["content"]["text"] == "back\n" for m in back)
        finally:
            ws.close()
            server.api("DELETE", f"/api/kernels/{kernel}")
    errors = [m for m in seen if m["msg_type"] == "error"]
    assert len(errors) == 1, [m["msg_type"] for m in seen]
    (error,) = errors
    assert error["parent_header"]["msg_id"] == cell  # shown in the cell that ran
    assert error["content"]["ename"] == "KernelOutOfMemory"
    assert "memory limit (160m)" in error["content"]["evalue"]
    assert seen.index(error) < len(seen) - 1  # before the server says "restarting"
    log = (tmp_path / "server.log").read_text()
    assert "out of memory (memory_limit 160m)" in log
    assert "told 1 listener(s) why it ended" in log or "listener(s) why it ended" in log


# -- idle_timeout ----------------------------------------------------------------------------


def test_idle_cull_tells_a_listening_client(jupyter_path, tmp_path, leak_check):
    name = make_kernelspec(f"idle-{uuid.uuid4().hex[:6]}", {"idle_timeout": 4})
    leak_check.spec(name)
    with jupyter_server(tmp_path, tmp_path / "server.log") as server:
        leak_check.pids.add(server.process.pid)
        kernel = server.api("POST", "/api/kernels", json={"name": name}).json()["id"]
        ws = server.channels(kernel)
        try:
            cell = send(ws, "print('working')")
            notice = read_until(
                ws,
                lambda m: m["msg_type"] == "stream" and "shut down" in m["content"]["text"],
                timeout=60,
            )[-1]
        finally:
            ws.close()
        deadline = time.monotonic() + 30
        while kernel in {k["id"] for k in server.api("GET", "/api/kernels").json()}:
            assert time.monotonic() < deadline, "the idle kernel was not forgotten"
            time.sleep(0.25)
    text = notice["content"]["text"]
    assert notice["content"]["name"] == "stderr"
    assert "idle_timeout is 4s" in text and "Its variables are gone" in text
    assert notice["parent_header"]["msg_id"] == cell  # the last cell the client ran
    log = (tmp_path / "server.log").read_text()
    assert "idle_timeout is 4s" in log and "why it ended" in log
    assert "restarting kernel" not in log.lower()


# -- no network, no pip ----------------------------------------------------------------------


def failure(kc, code: str) -> dict:
    """Run ``code``; its error's name and traceback as plain text (colours removed)."""
    import re

    errors: list[dict] = []
    kc.execute_interactive(
        code,
        timeout=60,
        output_hook=lambda m: errors.append(m["content"]) if m["msg_type"] == "error" else None,
    )
    assert len(errors) == 1, errors
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0]["traceback"]))
    return {"ename": errors[0]["ename"], "traceback": text}


NOTE = "kernel-sandbox: this kernel has no network by policy (network: none)"


def test_network_attempts_under_no_egress_are_explained(jupyter_path, leak_check):
    gateway = bridge_gateway()  # this machine's own address: nothing leaves it
    with sandbox_kernel() as (_km, kc):
        lookup = failure(kc, "import socket\nsocket.getaddrinfo('sandbox-test.invalid', 80)")
        connect = failure(
            kc, f"import urllib.request\nurllib.request.urlopen('http://{gateway}:9/', timeout=5)"
        )
        refused = failure(kc, "import socket\nsocket.create_connection(('127.0.0.1', 9))")
        other = failure(kc, "open('/nonexistent/file')")
        syntax = failure(kc, "def broken(:")
    assert lookup["ename"] == "gaierror"
    assert connect["ename"] == "URLError"
    assert refused["ename"] == "ConnectionRefusedError"
    for result in (lookup, connect, refused):
        assert NOTE in result["traceback"], result
        assert "network: allowlist" in result["traceback"]
        # the note comes last, under the usual traceback
        assert result["traceback"].rstrip().endswith("(kernel-sandbox's docs/egress.md).")
    # other errors are shown exactly as before
    assert other["ename"] == "FileNotFoundError" and "kernel-sandbox" not in other["traceback"]
    assert syntax["ename"] == "SyntaxError" and "kernel-sandbox" not in syntax["traceback"]


def test_network_note_is_in_the_error_nbclient_raises(jupyter_path, leak_check):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = new_notebook(
        cells=[new_code_cell("import socket\nsocket.getaddrinfo('sandbox-test.invalid', 443)")]
    )
    with pytest.raises(CellExecutionError) as info:
        NotebookClient(nb, kernel_name="python3-sandbox", timeout=60).execute()
    assert "this kernel has no network by policy (network: none)" in str(info.value)


def test_pip_install_is_explained_and_nothing_runs(jupyter_path, leak_check):
    with sandbox_kernel() as (_km, kc):
        magic = run_cell(kc, "%pip install ipykernel surely-not-a-package")
        shell = run_cell(kc, "!pip install requests && touch /tmp/ran")
        module = run_cell(kc, "!python3 -m pip install --user six; touch /tmp/ran")
        captured = run_cell(kc, "out = !pip3 install six\nprint(list(out))")
        conda = run_cell(kc, "%conda install -c conda-forge numpy")
        ran = run_cell(kc, "import os\nprint(os.path.exists('/tmp/ran'))")
        listing = run_cell(kc, "!echo pip install is only words")
        missing = run_cell(kc, "import surely_not_a_module")
    for result in (magic, shell, module, conda):
        assert "kernel-sandbox: nothing was installed" in result["stderr"], result
        assert "binder/requirements.txt" in result["stderr"]
        assert "kernel-sandbox image build" in result["stderr"]
        assert "restart the kernel to use updated packages" not in result["stdout"]
    assert "Already in the image: ipykernel " in magic["stderr"]
    assert "Add surely-not-a-package to binder/requirements.txt" in magic["stderr"]
    assert "nothing was installed" in captured["stderr"] and "[]" in captured["stdout"]
    assert ran["stdout"] == "False\n"  # no part of a refused command line ran
    assert listing["stdout"].strip() == "pip install is only words"  # not an install: it runs
    assert missing["ename"] == "ModuleNotFoundError"


def test_hints_extension_and_network_mode_reach_the_kernel(jupyter_path, leak_check, docker_client):
    with sandbox_kernel() as (km, _kc):
        container = docker_client.containers.get(km.provisioner.container_id)
        command = container.attrs["Config"]["Cmd"]
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    assert "--ext=kernel_sandbox.inside.hints" in command
    assert env["KERNEL_SANDBOX_NETWORK"] == "none"

"""The host-side audit with real kernels and real clients (issue 17, part 3).

Every client drives a sandboxed kernel the way users do; the test then reads the hash-chained
audit log the provisioner's process wrote (a file of the test's own: the ``audit_log`` trait,
or ``XDG_DATA_HOME`` for a client started as a process) and checks that each execute request
is there with its code, who sent it and which client, its start, end and status, that the
chain verifies (``kernel-sandbox audit verify``) and that ``audit show`` pairs the records.
Clients: jupyter_client (interrupt, restart, a kernel that dies), nbclient, a Jupyter Server
over REST and websocket, ``kernel-sandbox run`` and ``kernel-sandbox mcp`` (a real MCP client
session), a warm-pool kernel across a restart; rotation and retention on a live kernel.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from support import REPO
from support.kernels import SANDBOX, make_kernelspec, run_cell, sandbox_kernel
from support.servers import execute, jupyter_server
from traitlets.config import Config

from kernel_sandbox.audit.chain import anchor_path, chain_files
from kernel_sandbox.audit.show import rows
from kernel_sandbox.audit.verify import verify_chain
from kernel_sandbox.cli.app import main

pytestmark = pytest.mark.integration


def audit_config(log: Path, **traits: Any) -> Config:
    return Config({"DockerSandboxProvisioner": {"audit_log": str(log), **traits}})


def executions(log: Path, kernel_id: str | None = None) -> list[dict[str, Any]]:
    """The execute rows of ``log`` (one kernel's if given); the chain must verify."""
    report = verify_chain(log)
    assert report.intact, report.broken
    assert report.records > 0
    return [r for r in rows([log], kernel_id) if r["event"] == "execute"]


def events(log: Path, kernel_id: str, event: str) -> list[dict[str, Any]]:
    return [r for r in rows([log], kernel_id) if r["event"] == event]


def test_jupyter_client_requests_interrupt_restart_and_death(
    jupyter_path, tmp_path, leak_check, capsys
):
    log = tmp_path / "audit.jsonl"
    with sandbox_kernel(SANDBOX, config=audit_config(log), cwd=str(tmp_path)) as (km, kc):
        assert run_cell(kc, "x = 6 * 7\nprint(x)")["stdout"] == "42\n"
        assert run_cell(kc, "1 / 0")["status"] == "error"
        on_control = kc.session.msg(
            "execute_request",
            {"code": "print('on control')", "silent": False, "store_history": False},
        )
        kc.control_channel.send(on_control)
        assert kc.get_control_msg(timeout=60)["content"]["status"] == "ok"
        kc.execute("import time\ntime.sleep(60)")
        time.sleep(1.5)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error"  # KeyboardInterrupt
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        assert run_cell(kc, "print('after restart')")["status"] == "ok"
        kc.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        deadline = time.monotonic() + 60
        while km.is_alive():
            assert time.monotonic() < deadline, "the kernel did not die"
            time.sleep(0.5)
        kernel_id = km.kernel_id
    found = executions(log, kernel_id)
    codes = [r["code"] for r in found]
    assert codes[:2] == ["x = 6 * 7\nprint(x)", "1 / 0"]
    assert (found[2]["code"], found[2]["channel"]) == ("print('on control')", "control")
    assert [r["status"] for r in found[:4]] == ["ok", "error", "ok", "error"]
    assert found[1]["ename"] == "ZeroDivisionError"
    assert found[3]["ename"] == "KeyboardInterrupt"
    after = found[codes.index("print('after restart')")]
    assert after["status"] == "ok"
    assert found[-1]["code"].endswith("os.kill(os.getpid(), signal.SIGKILL)")
    assert found[-1]["status"] == "no-reply"
    for row in found:
        assert row["uid"] == os.getuid() and row["kernel_id"] == kernel_id
        assert row["start"] <= row["end"] and row["session"] and "KernelManager" in row["client"]
        assert len(row["code_sha256"]) == 64
    assert events(log, kernel_id, "interrupt")
    starts = events(log, kernel_id, "kernel_start")
    assert [s["restart"] for s in starts] == [False, True]
    exits = events(log, kernel_id, "kernel_exit")
    assert [e["exit_code"] == 0 for e in exits] == [True, False]  # the restart's, the kill's
    assert main(["audit", "verify", "--log", str(log)]) == 0
    assert main(["audit", "show", "--log", str(log), "--kernel", kernel_id[:8]]) == 0
    shown = capsys.readouterr().out
    assert "ZeroDivisionError" not in shown  # ename is kept in the record, not the table
    assert "x = 6 * 7 (+1 lines)" in shown and "error" in shown


def answer_input(kc, answer: str) -> dict:
    """Run a cell that asks for input; answer its ``input_request``; return the reply."""
    kc.execute("x = input('name? '); print('got', x)", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "name? "
    kc.input(answer)
    return kc.get_shell_msg(timeout=30)


def test_input_reaches_the_client_through_the_relays(jupyter_path, tmp_path, leak_check):
    # ipykernel sends input_request to the shell request's routing path, which now begins
    # with the relay's id: stdin must come back through a relay with that id
    log = tmp_path / "audit.jsonl"
    with sandbox_kernel(SANDBOX, config=audit_config(log), cwd=str(tmp_path)) as (km, kc):
        assert answer_input(kc, "ada")["content"]["status"] == "ok"
        assert run_cell(kc, "print(x)")["stdout"] == "ada\n"
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        assert answer_input(kc, "grace")["content"]["status"] == "ok"
        assert run_cell(kc, "print(x)")["stdout"] == "grace\n"
    assert any("input(" in record["code"] for record in executions(log))


def test_nbclient_notebook(jupyter_path, tmp_path, leak_check):
    log = tmp_path / "audit.jsonl"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import math\nmath.sqrt(16)"),
        nbformat.v4.new_code_cell("raise ValueError('on purpose')"),
        nbformat.v4.new_code_cell("print('last')"),
    ]
    client = NotebookClient(
        nb,
        kernel_name=SANDBOX,
        config=audit_config(log),
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # starts its own kernel manager, and shuts it down
    found = executions(log)
    assert [r["code"] for r in found] == [c.source for c in nb.cells]
    assert [r["status"] for r in found] == ["ok", "error", "ok"]
    assert len({r["session"] for r in found}) == len({r["kernel_id"] for r in found}) == 1


def test_jupyter_server_over_rest_and_websocket(jupyter_path, tmp_path, leak_check, monkeypatch):
    """The server's provisioner writes the audit; the records name the websocket client's
    header username and session."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    log = tmp_path / "data" / "kernel-sandbox" / "audit.jsonl"
    root = tmp_path / "root"
    root.mkdir()
    with jupyter_server(root, tmp_path / "server.log") as server:
        kernel = server.api("POST", "/api/kernels", json={"name": SANDBOX}).json()
        ws = server.channels(kernel["id"])
        try:
            assert execute(ws, "print(6 * 7)")["stdout"] == "42\n"
            assert execute(ws, "undefined_name")["reply"]["status"] == "error"
        finally:
            ws.close()
        assert server.api("DELETE", f"/api/kernels/{kernel['id']}").status_code == 204
    found = executions(log, kernel["id"])
    assert [(r["code"], r["status"]) for r in found] == [
        ("print(6 * 7)", "ok"),
        ("undefined_name", "error"),
    ]
    assert all(r["username"] == "test" for r in found)  # support.servers.execute's header
    assert "ServerKernelManager" in found[0]["client"]
    assert "jupyter_server" in found[0]["client"]


def test_kernel_sandbox_run(jupyter_path, tmp_path, leak_check):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    notebook = REPO / "notebooks" / "demo.ipynb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_sandbox.cli",
            "run",
            str(notebook),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = tmp_path / "data" / "kernel-sandbox" / "audit.jsonl"
    found = executions(log)
    cells = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    ran = [r["code"] for r in found if not r["silent"]]
    assert [c for c in cells if c.strip()] == [c for c in ran if c in cells]
    assert all(r["client"].startswith("kernel-sandbox run") for r in found)
    assert all(r["status"] == "ok" for r in found)


def test_kernel_sandbox_mcp(jupyter_path, tmp_path, leak_check, monkeypatch):
    from test_mcp_server import ok, stdio_session

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    log = tmp_path / "data" / "kernel-sandbox" / "audit.jsonl"

    async def go() -> None:
        async with stdio_session(tmp_path / "mcp.log") as session:
            assert "42" in await ok(session, "run_code", code="print(6 * 7)")

    asyncio.run(go())
    found = executions(log)
    assert "print(6 * 7)" in [r["code"] for r in found]
    assert all(r["client"].startswith("kernel-sandbox mcp") for r in found)


def test_a_warm_pool_kernel_across_a_restart(jupyter_path, tmp_path, leak_check):
    from kernel_sandbox.host.pool import process_pool

    spec = make_kernelspec("audit-pool", {"pool_size": 1})
    log = tmp_path / "audit.jsonl"
    try:
        with sandbox_kernel(spec, config=audit_config(log), cwd=str(tmp_path)) as (km, kc):
            assert km.provisioner._pool_reason is None  # served by the pool
            assert run_cell(kc, "print('first sandbox')")["status"] == "ok"
            first = km.provisioner.container_id
            km.restart_kernel()
            kc.wait_for_ready(timeout=90)
            assert km.provisioner.container_id != first
            assert run_cell(kc, "print('second sandbox')")["status"] == "ok"
            kernel_id = km.kernel_id
    finally:
        process_pool().close()
    found = executions(log, kernel_id)
    assert [(r["code"], r["status"]) for r in found] == [
        ("print('first sandbox')", "ok"),
        ("print('second sandbox')", "ok"),
    ]


def test_rotation_and_retention_on_a_live_kernel(jupyter_path, tmp_path, leak_check, capsys):
    log = tmp_path / "audit.jsonl"
    config = audit_config(log, log_max_bytes=3000, log_backups=2)
    with sandbox_kernel(SANDBOX, config=config, cwd=str(tmp_path)) as (km, kc):
        for i in range(25):
            assert run_cell(kc, f"cell_{i} = {i}  # {'pad' * 30}")["status"] == "ok"
        kernel_id = km.kernel_id
    assert len(chain_files(log)) == 3 and anchor_path(log).exists()
    assert main(["audit", "verify", "--log", str(log)]) == 0
    assert "intact" in capsys.readouterr().out
    found = executions(log, kernel_id)
    assert found[-1]["code"].startswith("cell_24 = 24")
    assert found[0]["code"] != "cell_0 = 0"  # retired by retention, anchored


def test_through_the_service_the_service_writes_what_the_user_cannot_touch(
    sandbox_service, test_users
):
    """The caller's kernel is audited in the service's log directory, under the caller's uid;
    the caller can neither read nor write it, and `audit verify --log-dir` holds."""
    from test_service import kernel_script

    home = test_users.add("kstalice").pw_dir
    env = {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}
    result = test_users.run_as(
        "kstalice", kernel_script("print('through the service')", cwd=home), env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernel_id = json.loads(result.stdout.strip().splitlines()[-1])["kernel_id"]
    log_dir = Path(sandbox_service.base) / "log"
    found = executions(log_dir / "audit.jsonl", kernel_id)
    assert [(r["code"], r["status"]) for r in found] == [("print('through the service')", "ok")]
    account = test_users.add("kstalice")
    assert found[0]["uid"] == account.pw_uid and found[0]["user"] == "kstalice"
    assert found[0]["client"].endswith("(through the service)")
    assert "KernelManager" in found[0]["client"]  # the caller's own label, as it claims it
    attempt = test_users.run_as(
        "kstalice",
        "import sys\n"
        "for mode in ('r', 'a'):\n"
        "    try:\n"
        f"        open({str(log_dir / 'audit.jsonl')!r}, mode)\n"
        "        print(mode, 'opened')\n"
        "    except PermissionError:\n"
        "        print(mode, 'denied')\n",
        check=False,
    )
    assert attempt.stdout.split() == ["r", "denied", "a", "denied"], attempt.stderr
    assert main(["audit", "verify", "--log-dir", str(log_dir)]) == 0


INPUT_SCRIPT = """
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name="python3-sandbox")
km.start_kernel(cwd={cwd!r})
kc = km.client()
kc.start_channels()
try:
    kc.wait_for_ready(timeout=60)
    kc.execute("x = input('name? '); print('got', x)", allow_stdin=True)
    print(kc.get_stdin_msg(timeout=30)["content"]["prompt"])
    kc.input("ada")
    print(kc.get_shell_msg(timeout=30)["content"]["status"])
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""


def test_input_through_the_service(sandbox_service, test_users):
    home = test_users.add("kstalice").pw_dir
    result = test_users.run_as(
        "kstalice",
        INPUT_SCRIPT.format(cwd=home),
        env={"KERNEL_SANDBOX_SERVICE": sandbox_service.socket},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["name? ", "ok"]


def _audit_show_as(test_users, user: str, socket: str, *args: str) -> tuple[int, list[dict]]:
    """`kernel-sandbox audit show --json ARGS` run by ``user`` through the service."""
    code = (
        "import sys\nfrom kernel_sandbox.cli.app import main\n"
        f"sys.exit(main(['audit', 'show', '--json', *{list(args)!r}]))\n"
    )
    result = test_users.run_as(user, code, env={"KERNEL_SANDBOX_SERVICE": socket}, check=False)
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, found


def test_through_the_service_users_read_their_own_runs_and_an_operator_everyones(
    sandbox_service, test_users
):
    """The instructor's view: the service reads its audit for its callers. A student gets the
    records of their own kernels only; an operator (operator = true) everyone's, or one
    student's with --user; a non-operator asking for another user is refused."""
    from test_service import kernel_script

    home = test_users.add("kstalice").pw_dir
    env = {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}
    ran = test_users.run_as(
        "kstalice", kernel_script("print('alice was here')", cwd=home), env=env, check=False
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    kernel_id = json.loads(ran.stdout.strip().splitlines()[-1])["kernel_id"]
    socket = sandbox_service.socket

    status, own = _audit_show_as(test_users, "kstalice", socket, "--kernel", kernel_id)
    assert status == 0
    assert [r["code"] for r in own if r["event"] == "execute"] == ["print('alice was here')"]

    status, bobs = _audit_show_as(test_users, "kstbob", socket)
    assert status == 0
    assert all(r.get("kernel_id") != kernel_id for r in bobs)
    assert all(r.get("user") in (None, "kstbob") for r in bobs)
    status, _ = _audit_show_as(test_users, "kstbob", socket, "--user", "kstalice")
    assert status == 2  # one error line: only an operator reads other users' records

    sandbox_service.write_policy("[user.kstcarol]\noperator = true\n")
    try:
        deadline = time.monotonic() + 20
        while True:  # the service reloads its policy file when it changes
            status, alices = _audit_show_as(test_users, "kstcarol", socket, "--user", "kstalice")
            if status == 0 and alices or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 0
        assert "print('alice was here')" in [r.get("code") for r in alices]
        assert {r["user"] for r in alices if "user" in r} == {"kstalice"}
    finally:
        sandbox_service.write_policy("")

"""Terminals through the sandbox service (issue 18): a student's server holds only a pty.

A student (kstalice, no docker group, no engine access) runs a locked-down Jupyter Server of
her own whose kernels go through the service; its terminals do too: the service makes the
container under its rules for her and passes the pty. Through the real REST API and terminal
websocket: the shell runs in a sandbox as her uid (her folder is mounted read-write, so what
she makes is hers), sees her files and not another user's home, the engine socket or any
network; closing the terminal, its shell exiting, an operator's stop and her server being
killed all remove the container. Another student neither sees nor closes it; an operator
(kstcarol's group) sees it with its owner.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from support import service as svc
from support.lockdown import terminal_run
from support.servers import Server
from test_service_isolation import home, server_as

pytestmark = pytest.mark.integration

A, B, OPERATOR = "kstalice", "kstbob", "kstcarol"
POLICY = f"""
[group.{OPERATOR}]
operator = true
"""
LOCKDOWN = "--ServerApp.jpserver_extensions={'kernel_sandbox.lockdown': True}"
CLI = "import sys\nfrom kernel_sandbox.cli.app import main\nsys.exit(main({argv!r}))\n"
ASK = (
    "import json\nfrom kernel_sandbox.service.client import ServiceClient\n"
    "from kernel_sandbox.errors import SandboxError\n"
    "try:\n    print(json.dumps(ServiceClient({socket!r}).ask(**{request!r})))\n"
    "except SandboxError as exc:\n    print(json.dumps({{'error': type(exc).__name__}}))\n"
)

# What the shell says about where it runs: uid, her file, network interfaces (from
# /proc/net/dev: gVisor has no /sys/class/net), the engine socket, another home, a file made
# here, the terminal's size (the websocket's set_size, through the pty to the container).
SHELL = (
    "echo FACTS $(id -u) $(cat mine.txt) "
    "$(sed -n 's/^ *\\([^:]*\\):.*/\\1/p' /proc/net/dev | tr '\\n' ,) "
    "$(test -e /var/run/docker.sock && echo sock || echo nosock) "
    "$(cat {other}/secret-of-bob.txt 2>/dev/null || echo no-other-home) "
    "$(touch made-in-terminal && echo made) $(hostname) $(stty size | tr ' ' x) END"
)
SHELL_LINE = r"FACTS \d+ \S+ \S+ \S+ \S+ \S+ \S+ \S+ END"


def cli(users: svc.TestUsers, user: str, env: dict, *argv: str) -> subprocess.CompletedProcess:
    return users.run_as(user, CLI.format(argv=list(argv)), env=env, check=False, timeout=120)


def ask(users: svc.TestUsers, user: str, service: svc.ServiceProcess, **request) -> dict:
    code = ASK.format(socket=service.socket, request=request)
    return dict(json.loads(users.run_as(user, code).stdout.strip().splitlines()[-1]))


def rows_of(users: svc.TestUsers, user: str, env: dict) -> list[dict]:
    result = cli(users, user, env, "ps", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout))


def open_terminal(server: Server) -> str:
    created = server.api("POST", "/api/terminals")
    log = server.log_path.read_text()[-3000:]  # type: ignore[attr-defined]
    assert created.status_code == 200, f"{created.status_code} {created.text}\n{log}"
    return str(created.json()["name"])


def terminal_of(service: svc.ServiceProcess, user: str, name: str) -> tuple[str, str]:
    """(terminal id, container name) of ``user``'s newest terminal ``name``, from the
    service's log."""
    found = re.findall(
        rf"terminal (terminal-{name}-\w+) of {user} \(uid \d+\): container (\S+)",
        service.log_path.read_text(),
    )
    assert found, f"no terminal {name} of {user} in the service's log"
    return found[-1]


def wait_gone(client: docker.DockerClient, container: str, timeout: float = 30) -> float:
    """Seconds until ``container`` no longer exists (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while True:
        try:
            client.containers.get(container)
        except docker.errors.NotFound:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"container {container} still there"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def env(sandbox_service: svc.ServiceProcess) -> Iterator[dict[str, str]]:
    sandbox_service.write_policy(POLICY)
    yield {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}
    sandbox_service.write_policy("")


@pytest.fixture(scope="module")
def folder(test_users: svc.TestUsers) -> Iterator[Path]:
    """Alice's course folder (hers, with a file of hers), and a secret in Bob's home."""
    work = home(A) / "termwork"
    work.mkdir(exist_ok=True)
    (work / "mine.txt").write_text("alice-file\n")
    (work / "made-in-terminal").unlink(missing_ok=True)
    secret = home(B) / "secret-of-bob.txt"
    secret.write_text("bob-secret\n")
    shutil.chown(secret, B, B)
    secret.chmod(0o600)
    for path in (work, work / "mine.txt"):
        shutil.chown(path, A, A)
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def alice(test_users, env, folder) -> Iterator[Server]:
    """Alice's locked-down server (terminals on), her folder mounted read-write."""
    with server_as(
        test_users, A, env, folder, LOCKDOWN, "--DockerSandboxProvisioner.workspace=rw"
    ) as server:
        yield server


def test_a_students_terminal_is_a_sandbox_the_service_runs(
    test_users, sandbox_service, env, folder, alice, docker_client
):
    log = alice.log_path.read_text()  # type: ignore[attr-defined]
    assert "terminals: sandboxed, through the service" in log, log[-3000:]
    name = open_terminal(alice)
    ident, container = terminal_of(sandbox_service, A, name)
    try:
        out = terminal_run(alice, name, SHELL.format(other=home(B)), SHELL_LINE, timeout=90)
        words = out[out.rindex("FACTS") :].split()
        uid, mine, nets, sock, other, made, hostname, size = words[1:9]
        alice_uid = pwd.getpwnam(A).pw_uid
        assert int(uid) == alice_uid  # her folder is rw: her own uid
        assert mine == "alice-file" and made == "made"
        assert nets == "lo," and sock == "nosock" and other == "no-other-home"
        assert hostname == "sandbox" and size == "40x400", out
        assert (folder / "made-in-terminal").stat().st_uid == alice_uid  # hers on the host
        # the service runs it, with no network, as her uid
        attrs = docker_client.containers.get(container).attrs
        assert attrs["HostConfig"]["NetworkMode"] == "none"
        assert attrs["Config"]["User"].split(":")[0] == str(alice_uid)
        assert attrs["Config"]["Labels"]["io.kernel-sandbox.kernel-id"] == ident
        # Bob neither sees it nor closes it; the operator sees it, and whose it is
        assert ident not in [r["kernel_id"] for r in rows_of(test_users, B, env)]
        assert ask(test_users, B, sandbox_service, op="terminal_close", terminal_id=ident) == {
            "error": "NoSuchKernel"
        }
        mine_rows = [r for r in rows_of(test_users, A, env) if r["kernel_id"] == ident]
        assert mine_rows and mine_rows[0]["kind"] == "terminal"
        seen = {r["kernel_id"]: r for r in rows_of(test_users, OPERATOR, env)}
        assert seen[ident]["owner"] == A and seen[ident]["container"] == container
        table = cli(test_users, OPERATOR, env, "ps").stdout
        assert ident in table and f"{A} (pid" in table
        assert docker_client.containers.get(container).status == "running"
    finally:
        assert alice.api("DELETE", f"/api/terminals/{name}").status_code == 204
    print(f"closed terminal's container gone after {wait_gone(docker_client, container):.1f} s")
    assert ident not in [r["kernel_id"] for r in rows_of(test_users, A, env)]


def test_a_shell_that_exits_takes_its_container(sandbox_service, alice, docker_client):
    name = open_terminal(alice)
    _ident, container = terminal_of(sandbox_service, A, name)
    terminal_run(alice, name, "echo up-$((40+2))", r"up-42")
    try:
        terminal_run(alice, name, "exit", r"$^never", timeout=10)
    except AssertionError:
        pass  # the terminal closes without that output
    wait_gone(docker_client, container)
    deadline = time.monotonic() + 30
    while alice.api("GET", f"/api/terminals/{name}").status_code != 404:
        assert time.monotonic() < deadline, "terminal still listed after its shell exited"
        time.sleep(0.2)


def test_an_operator_stops_a_students_terminal(
    test_users, sandbox_service, env, alice, docker_client
):
    name = open_terminal(alice)
    ident, container = terminal_of(sandbox_service, A, name)
    terminal_run(alice, name, "echo up-$((40+2))", r"up-42")
    result = cli(test_users, OPERATOR, env, "stop", ident)
    assert result.returncode == 0, result.stderr
    assert f"stopped kernel {ident}" in result.stdout and A in result.stdout
    wait_gone(docker_client, container)
    deadline = time.monotonic() + 30
    while alice.api("GET", f"/api/terminals/{name}").status_code != 404:
        assert time.monotonic() < deadline, "the student's server still lists the terminal"
        time.sleep(0.2)


def test_a_killed_server_takes_its_terminals_with_it(
    test_users, sandbox_service, env, folder, docker_client
):
    with server_as(test_users, A, env, folder, LOCKDOWN) as server:
        name = open_terminal(server)
        ident, container = terminal_of(sandbox_service, A, name)
        terminal_run(server, name, "echo up-$((40+2))", r"up-42")
        owner = [r for r in rows_of(test_users, A, env) if r["kernel_id"] == ident]
        assert owner, "the service does not list the terminal"
        os.kill(owner[0]["owner_pid"], signal.SIGKILL)  # the server process itself
        print(f"killed server's terminal gone after {wait_gone(docker_client, container):.1f} s")
    assert ident not in [r["kernel_id"] for r in rows_of(test_users, A, env)]


def test_hostile_terminal_requests_change_nothing(test_users, sandbox_service, env):
    spec = {"name": "python3-sandbox", "argv": ["python3", "-m", "ipykernel_launcher"]}
    hostile = [
        {"name": "../../x", "kernelspec": spec},
        {"name": "1", "kernelspec": spec, "shell": "/bin/sh -c id"},
        {"name": "1", "kernelspec": spec, "shell": []},
        {"name": "1", "kernelspec": spec, "term": "xterm; id"},
        {"name": "1", "kernelspec": {"name": "python3-sandbox", "argv": []}},
        {"name": "1"},
        {"name": "1", "kernelspec": spec, "folders": [{"for": "workspace"}]},  # no descriptor
        {"name": "1", "kernelspec": spec, "config": {"user": "0:0"}},
    ]
    before = len(re.findall(rf"terminal \S+ of {B} ", sandbox_service.log_path.read_text()))
    for fields in hostile:
        reply = ask(test_users, B, sandbox_service, op="terminal_start", **fields)
        assert reply.get("error") in ("BadRequest", "PolicyError"), (fields, reply)
    assert ask(test_users, B, sandbox_service, op="terminal_close", terminal_id=5) == {
        "error": "BadRequest"
    }
    assert ask(test_users, B, sandbox_service, op="terminal_close", terminal_id="nope") == {
        "ok": True
    }
    after = len(re.findall(rf"terminal \S+ of {B} ", sandbox_service.log_path.read_text()))
    assert after == before
    assert [r for r in rows_of(test_users, B, env) if r.get("kind") == "terminal"] == []

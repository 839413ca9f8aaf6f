"""The lockdown extension under a real Jupyter Server, through its REST and websocket APIs.

Every kernel a locked-down server starts is sandboxed whatever name the client sends (map
mode) or the request is refused with a 4xx naming the allowed kernels (refuse mode); checked
from inside each kernel (hostname, uid, interfaces, no docker socket), through
``/api/kernels``, ``/api/sessions`` (create and a PATCH to another kernel) and restarts.
Terminals run their shell in a sandbox container (or do not exist when off), whatever
``shell_command`` a client sends. The server refuses to start when lockdown cannot hold, and
leaves no container behind when it stops. The first test shows the probe catches a host
kernel: without the extension, ``python3`` runs on the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from support import REPO
from support.kernels import make_kernelspec
from support.leaks import Scope
from support.lockdown import (
    ENABLE,
    REFUSE,
    SANDBOXED_FACTS,
    SANDBOXED_SHELL,
    SHELL_FACTS,
    SHELL_FACTS_LINE,
    TERMINALS_OFF,
    kernel_facts,
    new_path,
    sandbox_containers,
    terminal_run,
)
from support.servers import Server, free_port, jupyter_server

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.host.reap import sweep

pytestmark = pytest.mark.integration

NAMES = ["python3", "python3-sandbox", "python3-local", "no-such-kernel", None]


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory, kernel_image: str) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("lockdown-map")
    with jupyter_server(root, root.parent / "lockdown-map.log", ENABLE) as server:
        yield server


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory, kernel_image: str) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("lockdown-refuse")
    with jupyter_server(root, root.parent / "lockdown-refuse.log", ENABLE, REFUSE) as server:
        yield server


def start(server: Server, name: str | None) -> dict:
    body = {} if name is None else {"name": name}
    response = server.api("POST", "/api/kernels", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_without_lockdown_python3_is_a_host_kernel(tmp_path: Path, kernel_image: str) -> None:
    """The probe can fail: the README's old setup starts python3 on the host."""
    with jupyter_server(tmp_path, tmp_path / "server.log") as server:
        kernel = start(server, "python3")
        try:
            facts = kernel_facts(server, kernel["id"])
        finally:
            server.api("DELETE", f"/api/kernels/{kernel['id']}")
    assert facts.startswith(f"FACTS {socket.gethostname()} ")
    assert facts != SANDBOXED_FACTS


def test_only_sandboxed_kernelspecs_are_listed(mapped: Server) -> None:
    specs = mapped.api("GET", "/api/kernelspecs").json()
    assert specs["default"] == "python3-sandbox"
    for name, entry in specs["kernelspecs"].items():
        provisioner = entry["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"]
        assert provisioner == "docker-sandbox", name
    assert "python3" not in specs["kernelspecs"]
    assert mapped.api("GET", "/kernelspecs/python3/kernel.json").status_code == 404


@pytest.mark.parametrize("name", NAMES)
def test_map_mode_every_name_starts_sandboxed(
    mapped: Server, name: str | None, leak_check: Scope
) -> None:
    leak_check.pids.add(mapped.process.pid)
    kernel = start(mapped, name)
    try:
        assert kernel["name"] == "python3-sandbox"
        assert kernel_facts(mapped, kernel["id"]) == SANDBOXED_FACTS
        restarted = mapped.api("POST", f"/api/kernels/{kernel['id']}/restart")
        assert restarted.status_code == 200, restarted.text
        assert kernel_facts(mapped, kernel["id"]) == SANDBOXED_FACTS
    finally:
        assert mapped.api("DELETE", f"/api/kernels/{kernel['id']}").status_code == 204


def test_map_mode_sessions(mapped: Server, leak_check: Scope) -> None:
    """A notebook session asking for python3, then switched (PATCH) to another host kernel."""
    leak_check.pids.add(mapped.process.pid)
    body = {"path": new_path(), "type": "notebook", "kernel": {"name": "python3"}}
    created = mapped.api("POST", "/api/sessions", json=body)
    assert created.status_code == 201, created.text
    session = created.json()
    try:
        assert session["kernel"]["name"] == "python3-sandbox"
        assert kernel_facts(mapped, session["kernel"]["id"]) == SANDBOXED_FACTS
        patch = {"kernel": {"name": "python3-local"}}
        changed = mapped.api("PATCH", f"/api/sessions/{session['id']}", json=patch)
        assert changed.status_code == 200, changed.text
        kernel = changed.json()["kernel"]
        assert kernel["name"] == "python3-sandbox"
        assert kernel_facts(mapped, kernel["id"]) == SANDBOXED_FACTS
    finally:
        assert mapped.api("DELETE", f"/api/sessions/{session['id']}").status_code == 204


@pytest.mark.parametrize(
    ("name", "status"),
    [("python3", 403), ("python3-local", 403), ("no-such-kernel", 404)],
)
def test_refuse_mode_refuses_unsandboxed_names(refusing: Server, name: str, status: int) -> None:
    before = refusing.api("GET", "/api/kernels").json()
    response = refusing.api("POST", "/api/kernels", json={"name": name})
    assert response.status_code == status, response.text
    message = response.json()["message"]
    assert name in message and "python3-sandbox" in message
    body = {"path": new_path(), "type": "notebook", "kernel": {"name": name}}
    session = refusing.api("POST", "/api/sessions", json=body)
    assert session.status_code == status, session.text
    assert "python3-sandbox" in session.json()["message"]
    assert refusing.api("GET", "/api/kernels").json() == before
    assert refusing.api("GET", "/api/sessions").json() == []


def test_a_start_the_policy_refuses_answers_with_the_reason(
    refusing: Server, jupyter_path: Path
) -> None:
    # the stock handler answers any error of a start with a bare 500 "Unhandled error"
    name = make_kernelspec("lockdown-bad-policy", {"memory_limit": "lots"})
    response = refusing.api("POST", "/api/kernels", json={"name": name})
    assert response.status_code == 400, response.text
    assert "memory_limit: expected a size" in response.json()["message"]
    body = {"path": new_path(), "type": "notebook", "kernel": {"name": name}}
    session = refusing.api("POST", "/api/sessions", json=body)
    assert "memory_limit: expected a size" in session.json()["message"], session.text
    assert refusing.api("GET", "/api/sessions").json() == []


@pytest.mark.parametrize("name", ["python3-sandbox", None])
def test_refuse_mode_starts_sandboxed_and_default(
    refusing: Server, name: str | None, leak_check: Scope
) -> None:
    leak_check.pids.add(refusing.process.pid)
    kernel = start(refusing, name)
    try:
        assert kernel_facts(refusing, kernel["id"]) == SANDBOXED_FACTS
    finally:
        refusing.api("DELETE", f"/api/kernels/{kernel['id']}")


def test_refuse_mode_session_patch_to_host_kernel_is_refused(
    refusing: Server, leak_check: Scope
) -> None:
    leak_check.pids.add(refusing.process.pid)
    body = {"path": new_path(), "type": "notebook", "kernel": {"name": "python3-sandbox"}}
    session = refusing.api("POST", "/api/sessions", json=body).json()
    try:
        changed = refusing.api(
            "PATCH", f"/api/sessions/{session['id']}", json={"kernel": {"name": "python3"}}
        )
        assert changed.status_code == 403, changed.text
        kernel = refusing.api("GET", f"/api/sessions/{session['id']}").json()["kernel"]
        assert kernel_facts(refusing, kernel["id"]) == SANDBOXED_FACTS
    finally:
        refusing.api("DELETE", f"/api/sessions/{session['id']}")


# -- terminals --------------------------------------------------------------------------------


def test_terminal_shell_is_sandboxed(
    mapped: Server, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    """Whatever shell_command the client sends, the shell is in a sandbox; closing the
    terminal removes its container."""
    leak_check.pids.add(mapped.process.pid)
    body = {"shell_command": ["/bin/sh", "-c", "hostname; sleep 600"], "name": "probe1"}
    created = mapped.api("POST", "/api/terminals", json=body)
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    try:
        containers = [
            c for c in sandbox_containers(docker_client, mapped.process.pid) if "term" in c
        ]
        assert len(containers) == 1, containers
        output = terminal_run(mapped, name, SHELL_FACTS, SHELL_FACTS_LINE)
        assert SANDBOXED_SHELL in output, output
        attrs = docker_client.containers.get(containers[0]).attrs
        assert attrs["HostConfig"]["NetworkMode"] == "none"
        assert attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
    finally:
        assert mapped.api("DELETE", f"/api/terminals/{name}").status_code == 204
    deadline = time.monotonic() + 20
    while any("term" in c for c in sandbox_containers(docker_client, mapped.process.pid)):
        assert time.monotonic() < deadline, "terminal container still there"
        time.sleep(0.2)


def test_terminal_exit_removes_its_container(
    mapped: Server, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    leak_check.pids.add(mapped.process.pid)
    name = mapped.api("POST", "/api/terminals").json()["name"]
    terminal_run(mapped, name, "echo ready-$((40+2))", r"ready-42")
    try:
        terminal_run(mapped, name, "exit", r"$^never", timeout=10)
    except AssertionError:
        pass  # the websocket closes when the shell ends
    deadline = time.monotonic() + 20
    while mapped.api("GET", f"/api/terminals/{name}").status_code != 404:
        assert time.monotonic() < deadline, "terminal still listed after its shell exited"
        time.sleep(0.2)
    while any("term" in c for c in sandbox_containers(docker_client, mapped.process.pid)):
        assert time.monotonic() < deadline, "terminal container still there"
        time.sleep(0.2)


def test_terminals_off(tmp_path: Path, kernel_image: str) -> None:
    with jupyter_server(tmp_path, tmp_path / "server.log", ENABLE, TERMINALS_OFF) as server:
        assert server.api("POST", "/api/terminals").status_code == 404
        assert server.api("GET", "/api/terminals").status_code == 404


# -- the server's life --------------------------------------------------------------------------


def test_nothing_left_after_server_shutdown(
    tmp_path: Path, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    with jupyter_server(tmp_path, tmp_path / "server.log", ENABLE) as server:
        leak_check.pids.add(server.process.pid)
        start(server, "python3")
        body = {"path": new_path(), "type": "notebook", "kernel": {"name": "python3"}}
        assert server.api("POST", "/api/sessions", json=body).status_code == 201
        name = server.api("POST", "/api/terminals").json()["name"]
        terminal_run(server, name, "echo up-$((1+1))", r"up-2")
        running = sandbox_containers(docker_client, server.process.pid)
        assert len(running) == 3, running
        pid = server.process.pid
    deadline = time.monotonic() + 30
    while left := sandbox_containers(docker_client, pid):
        assert time.monotonic() < deadline, f"left after shutdown: {left}"
        time.sleep(0.5)


def refused_start(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a server that must refuse to start; return its exit status and output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--allow-root",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={free_port()}",
            f"--ServerApp.root_dir={root}",
            ENABLE,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--SandboxLockdown.map_to=nope"], None, "map_to is 'nope'"),
        (
            ["--KernelSpecManager.allowed_kernelspecs={'python3'}"],
            None,
            "no sandboxed kernelspec is installed",
        ),
        ([], {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, "cannot reach the Docker engine"),
        (["--ServerApp.allow_external_kernels=True"], None, "allow_external_kernels"),
    ],
    ids=["map_to-missing", "no-sandboxed-kernelspec", "engine-unreachable", "external-kernels"],
)
def test_server_refuses_to_start(
    tmp_path: Path, kernel_image: str, args: list[str], env: dict | None, expected: str
) -> None:
    status, output = refused_start(tmp_path, *args, env=env)
    assert status == 1, output[-3000:]
    assert "kernel-sandbox lockdown: refusing to start" in output
    assert expected in output


def test_terminal_of_a_killed_server_ends_itself(
    tmp_path: Path, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    """SIGKILL leaves no cleanup to the server: the in-sandbox watchdog loses the lifeline
    and ends the shell after the grace period (30 s), and the container removes itself (an
    orphan sweep by another kernel-sandbox process on this engine may reap it sooner)."""
    with jupyter_server(tmp_path, tmp_path / "server.log", ENABLE) as server:
        leak_check.pids.add(server.process.pid)
        name = server.api("POST", "/api/terminals").json()["name"]
        terminal_run(server, name, "echo up-$((1+1))", r"up-2")
        pid = server.process.pid
        (container,) = sandbox_containers(docker_client, pid)
        labels = docker_client.containers.get(container).labels
        runtime_dir = Path(labels["io.kernel-sandbox.runtime-dir"])
        server.process.kill()
        server.process.wait()
        killed = time.monotonic()
    while left := sandbox_containers(docker_client, pid):
        assert time.monotonic() - killed < 60, f"still there 60 s after the kill: {left}"
        time.sleep(1)
    print(f"terminal container gone {time.monotonic() - killed:.1f} s after SIGKILL")
    # its runtime directory is what `kernel-sandbox gc` reaps (dead owner); do that for it
    backend = DockerBackend()
    try:
        report = asyncio.run(sweep(backend, str(runtime_dir.parent), dry_run=True))
    finally:
        backend.close()
    assert str(runtime_dir) in report.runtime_dirs or not runtime_dir.exists()
    shutil.rmtree(runtime_dir, ignore_errors=True)


def test_terminal_under_gvisor(
    tmp_path: Path, jupyter_path: Path, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    """map_to with the untrusted profile: the terminal's shell runs under runsc, same facts."""
    spec = json.loads((REPO / "kernelspecs" / "python3-sandbox" / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = {"profile": "untrusted"}
    folder = jupyter_path / "kernels" / "python3-untrusted-lockdown"
    folder.mkdir(exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps(spec))
    args = (ENABLE, "--SandboxLockdown.map_to=python3-untrusted-lockdown")
    with jupyter_server(tmp_path, tmp_path / "server.log", *args) as server:
        leak_check.pids.add(server.process.pid)
        name = server.api("POST", "/api/terminals").json()["name"]
        try:
            (container,) = sandbox_containers(docker_client, server.process.pid)
            assert docker_client.containers.get(container).attrs["HostConfig"]["Runtime"] == "runsc"
            output = terminal_run(server, name, SHELL_FACTS, SHELL_FACTS_LINE, timeout=90)
            assert SANDBOXED_SHELL in output, output
        finally:
            server.api("DELETE", f"/api/terminals/{name}")

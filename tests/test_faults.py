"""Faults injected for real: floods, huge messages, and the Docker engine restarting under
running kernels."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time

import docker
import pytest
import requests
from jupyter_client.manager import KernelManager
from support import unavailable
from support.kernels import SANDBOX, run_cell, sandbox_kernel
from support.leaks import runtime_dirs, sandbox_containers
from support.servers import execute, jupyter_server

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.host.reap import sweep
from kernel_sandbox.host.rundir import default_root

MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(jupyter_path, kernel_image, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-root")
    with jupyter_server(root, root.parent / "faults-server.log") as srv:
        yield srv


def kernel_over_rest(server):
    reply = server.api("POST", "/api/kernels", json={"name": SANDBOX})
    reply.raise_for_status()
    return reply.json()["id"]


def status_latencies(server, stop: threading.Event, out: list[float]) -> None:
    """Ask the server for its status every 0.2 s while something heavy runs."""
    while not stop.is_set():
        started = time.monotonic()
        server.api("GET", "/api/status").raise_for_status()
        out.append(time.monotonic() - started)
        time.sleep(0.2)


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(
            f"import sys\nfor _ in range(100):\n    sys.stdout.write('x' * {MB} + '\\n')",
            id="100MB-of-stdout",
        ),
        pytest.param(
            f"from IPython.display import display\n"
            f"display({{'text/plain': 'y' * {100 * MB}}}, raw=True)",
            id="one-100MB-message",
        ),
    ],
)
def test_server_stays_responsive_under_a_flooding_kernel(server, leak_check, code):
    kernel_id = kernel_over_rest(server)
    ws = server.channels(kernel_id)
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=status_latencies, args=(server, stop, latencies))
    try:
        watcher.start()
        flood = execute(ws, code, timeout=240)
        stop.set()
        watcher.join()
        assert flood["reply"]["status"] == "ok"
        assert max(latencies) < 5, f"the server stalled: {max(latencies):.1f}s"
        after = execute(ws, "print('still fine')")
        assert after["stdout"] == "still fine\n"
        print(
            f"status latency max {max(latencies) * 1000:.0f} ms over {len(latencies)} probes; "
            f"stdout received {flood['stdout_bytes'] / MB:.1f} MB, "
            f"data received {flood['data_bytes'] / MB:.1f} MB"
        )
    finally:
        stop.set()
        ws.close()
        server.api("DELETE", f"/api/kernels/{kernel_id}")


# -- the engine restarting under running kernels ---------------------------------------------


def dockerd_pid() -> int | None:
    out = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.stdout.strip() else None


def restart_dockerd() -> None:
    """Stop the engine (SIGTERM, as a service manager would) and start it again."""
    pid = dockerd_pid()
    assert pid is not None, "no dockerd process to restart"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while dockerd_pid() is not None:
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)
    with open("/tmp/dockerd.log", "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            client = docker.from_env()  # negotiates the API version: needs the engine up
            client.ping()
            client.containers.list()
            time.sleep(2)  # the engine may still re-create its socket while initialising
            client.ping()
            return
        except (docker.errors.DockerException, requests.RequestException):
            assert time.monotonic() < deadline, "dockerd did not come back"
            time.sleep(0.5)


@pytest.mark.engine_restart
def test_engine_restart_kills_kernels_cleanly_and_new_ones_start(jupyter_path, kernel_image):
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        unavailable("restarting the engine needs root and a dockerd this test can start")
    client = docker.from_env()
    before_containers, before_dirs = sandbox_containers(client), runtime_dirs()
    km = KernelManager(kernel_name=SANDBOX)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert run_cell(kc, "print('before')")["stdout"] == "before\n"
        km.stop_restarter()
        restart_dockerd()
        assert not km.is_alive()  # the client side sees a dead kernel
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    # new kernels start once the engine is back
    with sandbox_kernel() as (_km, kc2):
        assert run_cell(kc2, "print('after')")["stdout"] == "after\n"
    # nothing leaks: what the dead kernel left for gc is removed by it
    asyncio.run(sweep(DockerBackend(), default_root()))
    assert sandbox_containers(docker.from_env()) <= before_containers
    assert runtime_dirs() <= before_dirs


@pytest.mark.engine_restart
def test_the_service_outlives_an_engine_restart(
    jupyter_path, kernel_image, sandbox_service, monkeypatch
):
    """Through the sandbox service an engine restart is as in direct mode: the kernel is seen
    dead by its client, the service keeps answering and starts new kernels, nothing is left."""
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        unavailable("restarting the engine needs root and a dockerd this test can start")
    monkeypatch.setenv("KERNEL_SANDBOX_SERVICE", sandbox_service.socket)
    km = KernelManager(kernel_name=SANDBOX)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert run_cell(kc, "print('before')")["stdout"] == "before\n"
        km.stop_restarter()
        restart_dockerd()
        deadline = time.monotonic() + 30
        while km.is_alive():
            assert time.monotonic() < deadline, "the client still sees the kernel alive"
            time.sleep(0.5)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert sandbox_service.alive()
    with sandbox_kernel() as (_km, kc2):
        assert run_cell(kc2, "print('after')")["stdout"] == "after\n"
    deadline = time.monotonic() + 30
    while sandbox_service.records():
        assert time.monotonic() < deadline, sandbox_service.records()
        time.sleep(0.5)

"""Kernels cannot be left behind: real owner processes killed with SIGKILL, or exiting
without shutting their kernels down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from support.kernels import SANDBOX, run_cell

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.host.reap import sweep
from kernel_sandbox.host.rundir import default_root

OWNER_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys, time
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    config = Config({"DockerSandboxProvisioner": {"orphan_timeout": float(sys.argv[1])}})
    km = KernelManager(kernel_name="python3-sandbox", config=config)
    km.start_kernel()
    km.client().wait_for_ready(timeout=60)
    info = asyncio.run(km.provisioner.get_provisioner_info())
    print(json.dumps(info), flush=True)
    time.sleep(3600)
""")


def start_owner(orphan_timeout: float, script: str = OWNER_SCRIPT) -> tuple[subprocess.Popen, dict]:
    """A separate process that owns one sandboxed kernel and then just waits."""
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(orphan_timeout)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    line = owner.stdout.readline()
    if not line:
        owner.kill()
        pytest.fail("the owner process did not start its kernel")
    return owner, json.loads(line)


def kill(owner: subprocess.Popen) -> None:
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdin.close()
    owner.stdout.close()


def container_state(docker_client, container_id: str) -> str:
    try:
        return docker_client.api.inspect_container(container_id)["State"]["Status"]
    except Exception:
        return "gone"


def wait_for(predicate, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"condition not met within {timeout}s")


def remove(docker_client, container_id: str) -> None:
    try:
        docker_client.api.remove_container(container_id, force=True)
    except Exception:
        pass


def test_orphaned_container_ends_itself_within_the_default_30s(
    jupyter_path, docker_client, kernel_image
):
    owner, info = start_owner(orphan_timeout=30)
    cid = info["container_id"]
    try:
        assert container_state(docker_client, cid) == "running"
        kill(owner)
        elapsed = wait_for(lambda: container_state(docker_client, cid) != "running", timeout=45)
        print(f"orphaned kernel ended itself {elapsed:.1f}s after its owner was SIGKILLed")
        assert elapsed <= 40  # the grace period (30 s by default), then the watchdog ends it
    finally:
        remove(docker_client, cid)
        asyncio.run(sweep(DockerBackend(), default_root()))


def test_an_owner_that_exits_without_shutting_down_leaves_nothing(
    jupyter_path, docker_client, kernel_image
):
    """As `jupyter console` does (it only sends a shutdown request), or a script that forgets:
    the sandbox ends with its owner's normal exit, as a local kernel ends with its parent. The
    watchdog's grace is an hour here, so only the exit can have removed it."""
    script = OWNER_SCRIPT.replace("time.sleep(3600)", "sys.stdin.readline()")
    owner, info = start_owner(orphan_timeout=3600, script=script)
    cid, runtime_dir = info["container_id"], Path(info["runtime_dir"])
    try:
        assert container_state(docker_client, cid) == "running"
        owner.communicate("exit\n", timeout=60)
        assert owner.returncode == 0
        wait_for(lambda: container_state(docker_client, cid) == "gone", timeout=20)
        assert not runtime_dir.exists()
    finally:
        owner.kill()
        remove(docker_client, cid)


def test_gc_reaps_a_killed_owners_running_kernel_at_once(jupyter_path, docker_client, kernel_image):
    owner, info = start_owner(orphan_timeout=600)
    cid, runtime_dir = info["container_id"], Path(info["runtime_dir"])
    try:
        kill(owner)
        assert container_state(docker_client, cid) == "running"
        started = time.monotonic()
        report = asyncio.run(sweep(DockerBackend(), default_root()))
        print(f"gc reaped the orphan in {time.monotonic() - started:.2f}s")
        assert cid in report.containers
        assert container_state(docker_client, cid) == "gone"
        assert not runtime_dir.exists()
    finally:
        remove(docker_client, cid)


def test_gc_leaves_live_owners_alone(jupyter_path, docker_client, kernel_image):
    owner, info = start_owner(orphan_timeout=600)
    cid = info["container_id"]
    try:
        report = asyncio.run(sweep(DockerBackend(), default_root()))
        assert cid not in report.containers
        assert container_state(docker_client, cid) == "running"
    finally:
        kill(owner)
        remove(docker_client, cid)
        asyncio.run(sweep(DockerBackend(), default_root()))


def test_next_provisioner_start_reaps_orphans(jupyter_path, docker_client, kernel_image):
    owner, info = start_owner(orphan_timeout=600)
    cid = info["container_id"]
    try:
        kill(owner)
        # a fresh process starting any sandboxed kernel sweeps in the background
        subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent("""
                from jupyter_client.manager import start_new_kernel
                km, kc = start_new_kernel(kernel_name="python3-sandbox")
                import time; time.sleep(2)
                kc.stop_channels(); km.shutdown_kernel(now=True)
            """),
            ],
            check=True,
            timeout=120,
            env=os.environ.copy(),
        )
        wait_for(lambda: container_state(docker_client, cid) == "gone", timeout=15)
    finally:
        remove(docker_client, cid)


def test_a_new_owner_can_adopt_the_kernel_within_the_grace_period(
    jupyter_path, docker_client, kernel_image, leak_check
):
    owner, info = start_owner(orphan_timeout=6)
    cid = info["container_id"]
    kill(owner)
    km = KernelManager(kernel_name=SANDBOX, kernel_id=info["kernel_id"])
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km
    )
    asyncio.run(provisioner.load_provisioner_info(info))
    km.provisioner = provisioner
    km.load_connection_info(provisioner.connection_info)
    kc = km.client()
    kc.start_channels()
    try:
        time.sleep(10)  # longer than the grace period: the watchdog has reconnected
        assert container_state(docker_client, cid) == "running"
        kc.wait_for_ready(timeout=30)
        assert run_cell(kc, "print('adopted')")["stdout"] == "adopted\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

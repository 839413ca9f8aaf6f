"""The warm pool (kernel_sandbox.host.pool) through jupyter_client: a start claims a sandbox
made before it, the secrets are made at the claim, each sandbox serves one session, a changed
policy or image never gets a stale sandbox, a dead or orphaned one never lingers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from jupyter_client.manager import AsyncKernelManager
from support.kernels import make_kernelspec, run_cell, sandbox_kernel

from kernel_sandbox.host.pool import POOLED_LABEL, WarmPool, process_pool
from kernel_sandbox.host.rundir import CLAIMED_BY
from kernel_sandbox.inside.contract import CONNECTION_FILE, label

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def warm_pool(leak_check) -> Iterator[WarmPool]:
    """This process's pool, emptied and stopped after the test (before the leak check)."""
    pool = process_pool()
    try:
        yield pool
    finally:
        pool.close()


def wait_for_pool(pool: WarmPool, waiting: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while sum(pool.counts().values()) < waiting:
        assert time.monotonic() < deadline, f"the pool did not fill: {pool.counts()}"
        time.sleep(0.1)


def wait_until_gone(pool: WarmPool, container_id: str, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while container_id in {s.container_id for s in waiting_sandboxes(pool)}:
        assert time.monotonic() < deadline, f"{what} was not drained"
        time.sleep(0.2)


def pooled_containers(client: docker.DockerClient, pid: int | None = None) -> list[dict]:
    labels = [f"{POOLED_LABEL}=true", f"{label('owner-pid')}={pid or os.getpid()}"]
    return client.api.containers(all=True, filters={"label": labels})


def waiting_sandboxes(pool: WarmPool) -> list:
    return [s for p in pool._pools.values() for s in p.ready]


def test_a_start_claims_a_sandbox_made_before_it(jupyter_path, tmp_path, warm_pool, docker_client):
    spec = make_kernelspec("pool-basic", {"pool_size": 1})
    (tmp_path / "marker").write_text("the notebook's folder")
    tmp_path.chmod(0o755)  # readable by the sandbox's own uid
    facts = "import os; print(os.getcwd(), os.getuid(), open('marker').read())"
    with sandbox_kernel(spec, cwd=str(tmp_path)) as (km, kc):
        assert not km.provisioner.container_name.startswith("ks-pool-")  # the first is cold
        result = run_cell(kc, facts)
        assert result["status"] == "ok", result
        cold = result["stdout"]
    wait_for_pool(warm_pool, 1)
    (waiting,) = waiting_sandboxes(warm_pool)
    with sandbox_kernel(spec, cwd=str(tmp_path)) as (km, kc):
        assert km.provisioner.container_id == waiting.container_id
        result = run_cell(kc, facts)
        warm = result["stdout"]
        assert result["status"] == "ok", result
        # the same folder, at the same place, as the same kind of uid (its own, from the range)
        assert warm.split()[0] == cold.split()[0] and warm.endswith("the notebook's folder\n")
        runtime_dir = km.provisioner.runtime_dir
        assert (runtime_dir.path / CLAIMED_BY).read_text() == km.kernel_id
        # clients reach it through the kernel's handle, a link only this process writes
        assert km.provisioner.connection_info["ip"] == f"{runtime_dir.handle}/c"
        assert runtime_dir.handle.is_symlink()
        attrs = docker_client.api.inspect_container(waiting.container_id)
        assert attrs["Config"]["Labels"][POOLED_LABEL] == "true"
    assert not runtime_dir.path.exists() and not runtime_dir.handle.is_symlink()


def _container_texts(client: docker.DockerClient, container_id: str) -> str:
    """Everything a pooled sandbox holds that the host can read: its configuration, every
    process's command line and environment, its runtime directory."""
    attrs = client.api.inspect_container(container_id)
    texts = [json.dumps(attrs["Config"])]
    top = client.api.top(container_id, ps_args="-eo pid")
    for (pid,) in top["Processes"]:
        for name in ("cmdline", "environ"):
            texts.append(Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace"))
    run_dir = Path(attrs["Config"]["Labels"][label("runtime-dir")])
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def test_the_key_and_session_exist_only_from_the_claim(
    jupyter_path, tmp_path, warm_pool, docker_client, monkeypatch
):
    spec = make_kernelspec("pool-secret", {"pool_size": 1})
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "agent-notebook.ipynb"))
    with sandbox_kernel(spec, cwd=str(tmp_path)):
        pass
    wait_for_pool(warm_pool, 1)
    (waiting,) = waiting_sandboxes(warm_pool)
    before = _container_texts(docker_client, waiting.container_id)
    assert not (waiting.runtime_dir.host_dir / CONNECTION_FILE).exists()
    with sandbox_kernel(spec, cwd=str(tmp_path)) as (km, kc):
        assert km.provisioner.container_id == waiting.container_id
        key = km.provisioner.connection_info["key"].decode()
        assert key not in before
        assert "agent-notebook" not in before  # the session's variables came with the claim
        out = run_cell(kc, "import os; print(os.environ.get('JPY_SESSION_NAME'))")
        assert out["stdout"].strip().endswith("agent-notebook.ipynb")
        inside = json.loads((waiting.runtime_dir.host_dir / CONNECTION_FILE).read_text())
        assert inside["key"] == key


def test_each_sandbox_serves_one_session_and_a_restart_claims_a_fresh_one(
    jupyter_path, tmp_path, warm_pool, docker_client
):
    spec = make_kernelspec("pool-restart", {"pool_size": 2})
    with sandbox_kernel(spec, cwd=str(tmp_path)):
        pass
    wait_for_pool(warm_pool, 2)
    with sandbox_kernel(spec, cwd=str(tmp_path)) as (km, kc):
        run_cell(kc, "x = 41; open('/tmp/mine', 'w').write('first session')")
        first, first_dir = km.provisioner.container_id, km.provisioner.runtime_dir.path
        handle = km.provisioner.runtime_dir.handle
        wait_for_pool(warm_pool, 2)
        pooled_now = {s.container_id for s in waiting_sandboxes(warm_pool)}
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        second = km.provisioner.container_id
        assert second in pooled_now and second != first
        assert first not in {c["Id"] for c in docker_client.api.containers(all=True)}
        assert not first_dir.exists()  # the previous sandbox's directory went with it
        assert km.provisioner.runtime_dir.handle == handle  # clients kept their paths
        out = run_cell(kc, "import os; print('x' in globals(), os.path.exists('/tmp/mine'))")
        assert out["stdout"] == "False False\n"
    assert second not in {s.container_id for s in waiting_sandboxes(warm_pool)}


def test_a_start_waits_for_the_sandbox_being_started_instead_of_starting_cold(
    jupyter_path, tmp_path, warm_pool
):
    spec = make_kernelspec("pool-in-flight", {"pool_size": 1})
    with sandbox_kernel(spec, cwd=str(tmp_path)):
        pass
    wait_for_pool(warm_pool, 1)
    with sandbox_kernel(spec, cwd=str(tmp_path)) as (first, _):
        assert first.provisioner.container_name.startswith("ks-pool-")
        deadline = time.monotonic() + 30  # the claim woke the refill: wait until it runs
        while not any(warm_pool.filling(key) for key in warm_pool.counts()):
            assert time.monotonic() < deadline, "no refill started after the claim"
            time.sleep(0.005)
        with sandbox_kernel(spec, cwd=str(tmp_path)) as (second, kc):
            assert second.provisioner.container_name.startswith("ks-pool-")
            assert run_cell(kc, "print(6 * 7)")["stdout"] == "42\n"


def test_two_kernels_started_together_never_share_a_sandbox(
    jupyter_path, tmp_path, warm_pool, docker_client
):
    spec = make_kernelspec("pool-pair", {"pool_size": 2})
    with sandbox_kernel(spec, cwd=str(tmp_path)):
        pass
    wait_for_pool(warm_pool, 2)

    async def both() -> list[tuple[str, str]]:
        managers = [AsyncKernelManager(kernel_name=spec) for _ in range(2)]
        await asyncio.gather(*(km.start_kernel(cwd=str(tmp_path)) for km in managers))
        try:
            return [
                (km.provisioner.container_id, km.provisioner.connection_info["key"].decode())
                for km in managers
            ]
        finally:
            await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))

    (c1, k1), (c2, k2) = asyncio.run(both())
    assert c1 != c2 and k1 != k2


def test_a_changed_policy_starts_cold_and_a_rebuilt_image_drains(
    jupyter_path, tmp_path, warm_pool, docker_client, kernel_image
):
    tag = "kernel-sandbox/python:pool-test"
    docker_client.api.tag(kernel_image, "kernel-sandbox/python", "pool-test")
    try:
        spec = make_kernelspec("pool-image", {"pool_size": 1, "image": tag})
        with sandbox_kernel(spec, cwd=str(tmp_path)):
            pass
        wait_for_pool(warm_pool, 1)
        (stale,) = waiting_sandboxes(warm_pool)
        other = make_kernelspec("pool-image-2", {"pool_size": 1, "image": tag, "cpu_limit": 0.5})
        with sandbox_kernel(other, cwd=str(tmp_path)) as (km, _):
            assert km.provisioner.container_id != stale.container_id  # another recipe: cold
            assert not km.provisioner.container_name.startswith("ks-pool-")
        assert stale.container_id in {s.container_id for s in waiting_sandboxes(warm_pool)}
        # the same kernelspec, edited: its next start is cold and its old pool goes
        make_kernelspec("pool-image", {"pool_size": 1, "image": tag, "memory_limit": "600m"})
        before = {s.container_id for s in waiting_sandboxes(warm_pool)}
        with sandbox_kernel(spec, cwd=str(tmp_path)) as (km, _):
            assert not km.provisioner.container_name.startswith("ks-pool-")
        wait_until_gone(warm_pool, stale.container_id, "the edited kernelspec's old pool")
        deadline = time.monotonic() + 90
        while not (
            new := [s for s in waiting_sandboxes(warm_pool) if s.container_id not in before]
        ):
            assert time.monotonic() < deadline, "the edited kernelspec got no pool"
            time.sleep(0.1)
        (stale,) = new
        # the tag now names another image: the pool's sandbox of the old one goes
        dockerfile = f"FROM {tag}\nLABEL io.kernel-sandbox.test=rebuilt\n"
        (tmp_path / "Dockerfile").write_text(dockerfile)
        docker_client.images.build(path=str(tmp_path), tag=tag, network_mode="none", rm=True)
        wait_until_gone(warm_pool, stale.container_id, "the rebuilt image's old pool")
        warm_pool.close()
        assert stale.container_id not in {c["Id"] for c in docker_client.api.containers(all=True)}
    finally:
        docker_client.api.remove_image(tag, force=True)


def test_a_dead_pooled_sandbox_is_never_claimed(jupyter_path, tmp_path, warm_pool, docker_client):
    spec = make_kernelspec("pool-dead", {"pool_size": 1})
    with sandbox_kernel(spec, cwd=str(tmp_path)):
        pass
    wait_for_pool(warm_pool, 1)
    (dead,) = waiting_sandboxes(warm_pool)
    docker_client.api.kill(dead.container_id)  # as an engine restart would
    with sandbox_kernel(spec, cwd=str(tmp_path)) as (km, kc):
        assert km.provisioner.container_id != dead.container_id
        assert run_cell(kc, "print(6 * 7)")["stdout"] == "42\n"
    deadline = time.monotonic() + 30
    while dead.container_id in {c["Id"] for c in docker_client.api.containers(all=True)}:
        assert time.monotonic() < deadline, "the dead pooled sandbox was not removed"
        time.sleep(0.2)


OWNER = textwrap.dedent(
    """
    import sys, time
    from jupyter_client.manager import KernelManager
    from kernel_sandbox.host.pool import process_pool
    km = KernelManager(kernel_name=sys.argv[1])
    km.start_kernel(cwd=sys.argv[2])
    while sum(process_pool().counts().values()) < 2:
        time.sleep(0.1)
    print("READY", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_owner_leaves_no_pooled_sandbox_after_gc(
    jupyter_path, tmp_path, docker_client, leak_check
):
    spec = make_kernelspec("pool-orphan", {"pool_size": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, spec, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    leak_check.pids.add(owner.pid)
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "READY"
        assert len(pooled_containers(docker_client, owner.pid)) == 2
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    result = subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", "gc"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert pooled_containers(docker_client, owner.pid) == []


def test_no_pool_unless_asked(jupyter_path, tmp_path, leak_check, docker_client):
    # (a session fixture's kernel may be a claimed pooled one: only new ones count)
    before = {c["Id"] for c in pooled_containers(docker_client)}
    with sandbox_kernel(cwd=str(tmp_path)) as (km, _):
        assert not km.provisioner.container_name.startswith("ks-pool-")
        assert km.provisioner.runtime_dir.handle is None
    time.sleep(1)
    assert {c["Id"] for c in pooled_containers(docker_client)} <= before

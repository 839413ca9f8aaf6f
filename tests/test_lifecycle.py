"""The life of one sandboxed kernel through jupyter_client: start, interrupt, restart, death,
cleanup and reconnection, all against a real engine."""

from __future__ import annotations

import asyncio
import json
import os
from importlib.metadata import entry_points
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager, KernelManager
from jupyter_client.multikernelmanager import MultiKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from support.kernels import SANDBOX, make_kernelspec, run_cell, sandbox_kernel

from kernel_sandbox.host.uids import DEFAULT_RANGE, UidRange
from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner


def test_provisioner_entry_point_is_registered():
    (entry,) = [
        e
        for e in entry_points(group="jupyter_client.kernel_provisioners")
        if e.name == "docker-sandbox"
    ]
    assert entry.load() is DockerSandboxProvisioner


def test_kernelspec_names_the_provisioner(jupyter_path):
    km = KernelManager(kernel_name=SANDBOX)
    assert km.kernel_spec.display_name == "Python 3 (sandboxed)"
    assert km.kernel_spec.metadata["kernel_provisioner"]["provisioner_name"] == "docker-sandbox"
    assert KernelProvisionerFactory.instance().is_provisioner_available(km.kernel_spec)


def test_interrupt_reaches_a_sleeping_cell(jupyter_path, leak_check):
    with sandbox_kernel() as (km, kc):
        msg_id = kc.execute("import time; print('asleep', flush=True); time.sleep(600)")
        # wait until the cell's own output shows it is running before interrupting it
        while True:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "stream" and "asleep" in msg["content"]["text"]:
                break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert km.is_alive()
        assert run_cell(kc, "print(6 * 7)")["stdout"] == "42\n"


def test_restart_is_a_new_container_and_clients_stay_connected(
    jupyter_path, docker_client, leak_check
):
    with sandbox_kernel() as (km, kc):
        run_cell(kc, "x = 1")
        first = km.provisioner.container_id
        runtime_dir = km.provisioner.runtime_dir.path
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        second = km.provisioner.container_id
        assert second != first
        assert first not in {c["Id"] for c in docker_client.api.containers(all=True)}
        assert km.provisioner.runtime_dir.path == runtime_dir  # same sockets for clients
        out = run_cell(kc, "print('x' in globals())")
        assert out["stdout"] == "False\n"  # a fresh interpreter, reached on the same client


def test_shutdown_removes_container_and_runtime_dir(jupyter_path, docker_client, leak_check):
    with sandbox_kernel() as (km, kc):
        container_id = km.provisioner.container_id
        runtime_dir = km.provisioner.runtime_dir.path
        assert runtime_dir.is_dir() and oct(runtime_dir.stat().st_mode)[-3:] == "700"
        assert len(km.provisioner.runtime_dir.socket_prefix + "-5") <= 107
        kc.stop_channels()
        km.shutdown_kernel()
        assert container_id not in {c["Id"] for c in docker_client.api.containers(all=True)}
        assert not runtime_dir.exists()


def test_crashed_kernel_is_seen_dead_with_its_exit_code(jupyter_path, leak_check):
    with sandbox_kernel() as (km, kc):
        km.stop_restarter()  # see the death as it is, without the auto-restart
        kc.execute("import os; os._exit(3)")
        for _ in range(100):
            if not km.is_alive():
                break
            asyncio.run(asyncio.sleep(0.1))
        assert not km.is_alive()
        assert asyncio.run(km.provisioner.poll()) == 3


def test_oom_killed_kernel_is_seen_dead(jupyter_path, docker_client, leak_check):
    name = make_kernelspec("oom-sandbox", {"memory_limit": "160m"})
    with sandbox_kernel(name) as (km, kc):
        km.stop_restarter()
        container_id = km.provisioner.container_id
        kc.execute("blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))")
        for _ in range(300):
            if not km.is_alive():
                break
            asyncio.run(asyncio.sleep(0.1))
        assert not km.is_alive()
        assert asyncio.run(km.provisioner.poll()) == 137
        assert docker_client.api.inspect_container(container_id)["State"]["OOMKilled"]


def test_async_kernel_manager(jupyter_path, leak_check):
    async def main() -> str:
        km = AsyncKernelManager(kernel_name=SANDBOX)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            reply = await kc.execute_interactive(
                "import os; print(os.getuid())", timeout=30, output_hook=outputs.append
            )
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()
        return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")

    outputs: list = []
    uid = int(asyncio.run(main()).strip())
    # as root, a uid of its own (kernel_sandbox.host.uids); otherwise the user's own
    assert uid in UidRange.parse(DEFAULT_RANGE) if os.getuid() == 0 else uid == os.getuid()


def test_multi_kernel_manager_runs_isolated_kernels(jupyter_path, leak_check):
    mkm = MultiKernelManager()
    ids = [mkm.start_kernel(kernel_name=SANDBOX) for _ in range(2)]
    try:
        clients = [mkm.get_kernel(k).client() for k in ids]
        for kc in clients:
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
        run_cell(clients[0], "open('/tmp/mine', 'w').write('a')")
        out = run_cell(clients[1], "import os; print(os.path.exists('/tmp/mine'))")
        assert out["stdout"] == "False\n"
        for kc in clients:
            kc.stop_channels()
    finally:
        mkm.shutdown_all(now=True)


def test_reconnect_from_provisioner_info(jupyter_path, leak_check, tmp_path: Path):
    """What a restarted Jupyter Server does: rebuild a manager from saved state, reconnect."""
    km = KernelManager(kernel_name=SANDBOX)
    km.start_kernel()
    saved = json.dumps(asyncio.run(km.provisioner.get_provisioner_info()))
    # the original owner goes away without shutting the kernel down
    km.stop_restarter()
    km._close_control_socket()

    info = json.loads(saved)
    km2 = KernelManager(kernel_name=SANDBOX, kernel_id=info["kernel_id"])
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km2.kernel_spec, parent=km2
    )
    asyncio.run(provisioner.load_provisioner_info(info))
    km2.provisioner = provisioner
    km2.load_connection_info(provisioner.connection_info)
    container_id = provisioner.container_id
    assert km2.is_alive()
    kc = km2.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        assert run_cell(kc, "print('still here')")["stdout"] == "still here\n"
    finally:
        kc.stop_channels()
        km2.shutdown_kernel(now=True)
    assert not km2.is_alive()
    assert asyncio.run(provisioner.engine.state(container_id)).exit_code == -1  # removed

"""``idle_timeout`` on a kernel pod, against the test cluster: a cell running longer than the
timeout is not cut short; a restart's new pod is watched in its turn; once idle, the kernel is
ended by its owner, its client is told why in the cell it ran last (as on the Docker path,
tests/test_notices.py), and its pod, Secret, NetworkPolicy and Service are deleted."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest
from jupyter_client.manager import KernelManager
from support.kernels import run_cell
from test_kube import kube_spec, wait_gone

from kernel_sandbox.kube.api import KubeApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

IDLE = 4  # seconds


@pytest.fixture(scope="module")
def kube(kube_cluster):
    api = KubeApi(kube_cluster.namespace, str(kube_cluster.kubeconfig))
    yield api
    api.close()


def test_an_idle_pod_kernel_is_ended_and_its_client_told_why(kube_cluster, kube):
    km = KernelManager(kernel_name=kube_spec(kube_cluster, idle_timeout=IDLE))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        # busy for longer than idle_timeout: not idle, not ended
        out = run_cell(kc, f"import time; time.sleep({IDLE + 3}); print('done')", timeout=60)
        assert out["status"] == "ok" and out["stdout"] == "done\n", out
        # a restart is a new pod: watched in its turn, the old pod's monitor gone
        first = km.provisioner.kube.monitor
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert first is not None and first._thread is None  # closed
        assert km.provisioner.kube.monitor not in (None, first)
        cell = kc.execute("x = 1")  # the last cell a client ran: the notice goes there
        started = time.monotonic()
        notice = None
        while notice is None and time.monotonic() - started < 60:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "stream" and "shut down" in msg["content"]["text"]:
                notice = msg
        assert notice is not None, "no notice within 60 s"
        text = notice["content"]["text"]
        assert notice["content"]["name"] == "stderr"
        assert f"idle_timeout is {IDLE}s" in text and "Its variables are gone" in text, text
        assert notice["parent_header"]["msg_id"] == cell
        deadline = time.monotonic() + 60
        while km.is_alive():
            assert time.monotonic() < deadline, "the idle pod kernel was not ended"
            time.sleep(0.25)
        assert km.provisioner.notice is not None and "idle" in km.provisioner.notice.text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    wait_gone(kube, km.kernel_id)


def test_without_idle_timeout_a_pod_kernel_stays(kube_cluster):
    km = KernelManager(kernel_name=kube_spec(kube_cluster, idle_timeout=0))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert km.provisioner.kube.monitor is None
        time.sleep(IDLE + 2)
        assert km.is_alive()
        assert run_cell(kc, "print(2)")["stdout"] == "2\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_jupyter_server_forgets_an_idle_pod_kernel_and_its_websocket_is_told(
    kube_cluster, kube, jupyter_path, tmp_path
):
    from support.servers import jupyter_server
    from test_notices import read_until, send

    name = kube_spec(kube_cluster, idle_timeout=IDLE)
    with jupyter_server(tmp_path, tmp_path / "server.log") as server:
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
    assert f"idle_timeout is {IDLE}s" in notice["content"]["text"]
    assert notice["parent_header"]["msg_id"] == cell
    log = (tmp_path / "server.log").read_text()
    assert "why it ends" in log and "restarting kernel" not in log.lower()
    wait_gone(kube, kernel)


def test_an_async_manager_shuts_an_idle_pod_kernel_down(kube_cluster, kube):
    """nbclient's way: the monitor ends the kernel through the manager's own shutdown."""
    from jupyter_client.manager import AsyncKernelManager

    async def scenario() -> tuple[str, dict]:
        km = AsyncKernelManager(kernel_name=kube_spec(kube_cluster, idle_timeout=IDLE))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            cell = kc.execute("y = 2")
            deadline = time.monotonic() + 60
            notice: dict = {}
            while not notice and time.monotonic() < deadline:
                try:
                    msg = await kc.get_iopub_msg(timeout=1)
                except queue.Empty:
                    continue
                if msg["msg_type"] == "stream" and "shut down" in msg["content"]["text"]:
                    notice = msg
            # shut down by the monitor through this manager (a shutdown, not a death that a
            # restarter would restart): the manager ends up with no kernel
            while km.has_kernel:
                assert time.monotonic() < deadline, "the idle pod kernel was not shut down"
                await asyncio.sleep(0.25)
            return km.kernel_id, {"cell": cell, "notice": notice}
        finally:
            kc.stop_channels()
            if km.has_kernel:
                await km.shutdown_kernel(now=True)

    kernel_id, seen = asyncio.run(scenario())
    assert seen["notice"], "no notice within 60 s"
    assert seen["notice"]["parent_header"]["msg_id"] == seen["cell"]
    wait_gone(kube, kernel_id)

"""The sandbox service's warm pool: one pool for all users, sized by the operator
(`kernel-sandbox serve --pool-size`), claimed by whichever user starts that kind of kernel
next; a user's kernelspec cannot size it (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from support.service import ServiceProcess
from test_service_policy import user_kernelspec

from kernel_sandbox.host.pool import POOLED_LABEL
from kernel_sandbox.inside.contract import label

pytestmark = pytest.mark.integration

UID_OF_KERNEL = """
import json
import jupyter_client
km = jupyter_client.KernelManager(kernel_name={spec!r})
km.start_kernel()
try:
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
    out = []
    kc.execute_interactive("import os; print(os.getuid())", timeout=60,
                           output_hook=lambda m: out.append(m["content"].get("text", "")))
    kc.stop_channels()
    print(json.dumps({{"uid": int("".join(out))}}))
finally:
    km.shutdown_kernel(now=True)
"""


@pytest.fixture(scope="module")
def pooled_service(
    docker_client: docker.DockerClient, kernel_image: str
) -> Iterator[ServiceProcess]:
    base = Path("/tmp") / f"ksp-{os.getpid()}"
    base.mkdir(mode=0o755)
    service = ServiceProcess(base, extra_args=("--pool-size", "1"))
    service.start()
    try:
        yield service
    finally:
        service.stop()
        shutil.rmtree(base, ignore_errors=True)


def waiting(client: docker.DockerClient, service: ServiceProcess) -> list[dict]:
    assert service.process is not None
    labels = [f"{POOLED_LABEL}=true", f"{label('owner-pid')}={service.process.pid}"]
    found = client.api.containers(filters={"label": labels})
    return [
        c for c in found if not (Path(c["Labels"][label("runtime-dir")]) / "kernel-id").exists()
    ]


def kernel_uid(users, service: ServiceProcess, user: str, spec: str) -> int:
    result = users.run_as(
        user, UID_OF_KERNEL.format(spec=spec), env={"KERNEL_SANDBOX_SERVICE": service.socket}
    )
    return int(json.loads(result.stdout.strip().splitlines()[-1])["uid"])


def test_one_pool_for_all_users_sized_by_the_operator(pooled_service, test_users, docker_client):
    # a user's kernelspec asking for a big pool gets the operator's (1)
    spec = user_kernelspec(test_users, {"workspace": "none", "pool_size": 8})
    first = kernel_uid(test_users, pooled_service, "kstalice", spec)  # cold: fills the pool
    deadline = time.monotonic() + 90
    while not (ready := waiting(docker_client, pooled_service)):
        assert time.monotonic() < deadline, pooled_service.log_path.read_text()[-3000:]
        time.sleep(0.2)
    (pooled,) = ready
    pooled_uid = int(
        docker_client.api.inspect_container(pooled["Id"])["Config"]["User"].split(":")[0]
    )
    # another user's start of the same kind of kernel claims it: its uid is the sandbox's own
    assert kernel_uid(test_users, pooled_service, "kstbob", spec) == pooled_uid != first
    time.sleep(2)
    assert len(waiting(docker_client, pooled_service)) <= 1


def test_the_service_leaves_no_pooled_sandbox_when_it_stops(
    pooled_service, test_users, docker_client
):
    spec = user_kernelspec(test_users, {"workspace": "none"})
    kernel_uid(test_users, pooled_service, "kstcarol", spec)  # its pool fills after it
    deadline = time.monotonic() + 90
    while not waiting(docker_client, pooled_service):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pid = pooled_service.process.pid
    pooled_service.stop()
    labels = [f"{POOLED_LABEL}=true", f"{label('owner-pid')}={pid}"]
    assert docker_client.api.containers(all=True, filters={"label": labels}) == []
    pooled_service.start()  # for any later test of the module

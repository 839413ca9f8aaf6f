"""Telling a warm pool's sandboxes apart, from the host and from inside the kernel.

On the host a pooled sandbox is a managed container named ``ks-pool-...`` with the label
``io.kernel-sandbox.pooled=true``; until a kernel claims it no kernel id is known, then
``<runtime_dir>/kernel-id`` names the kernel (``Sandbox.from_summary`` reads it, as
`kernel-sandbox ps` does). Inside, the kernel process of a claimed sandbox is the pool's waiter
(``WHO_RUNS`` prints ``POOL_WAITER``), of a cold start ``ipykernel_launcher`` (``COLD``).
"""

from __future__ import annotations

import docker

from kernel_sandbox.host.sandboxes import Sandbox
from support.leaks import LABEL, OWNER_PID_LABEL

# A cell that prints what the kernel process runs.
WHO_RUNS = (
    "import os\n"
    "argv = open(f'/proc/{os.getpid()}/cmdline', 'rb').read().split(b'\\0')\n"
    "print('RUNS', argv[2].decode())"
)
POOL_WAITER = "RUNS kernel_sandbox.inside.pool_waiter"
COLD = "RUNS ipykernel_launcher"


def sandboxes_of(client: docker.DockerClient, pid: int) -> list[Sandbox]:
    """The running sandbox containers process ``pid`` owns, as `kernel-sandbox ps` sees them
    (one listing call: a container may go between a listing and an inspection)."""
    labels = [LABEL, f"{OWNER_PID_LABEL}={pid}"]
    return [Sandbox.from_summary(s) for s in client.api.containers(filters={"label": labels})]


def waiting_of(client: docker.DockerClient, pid: int, kernelspec: str) -> list[Sandbox]:
    """Pooled sandboxes of ``pid`` and ``kernelspec`` that no kernel has claimed yet."""
    return [s for s in sandboxes_of(client, pid) if s.waiting and s.kernelspec == kernelspec]


def of_kernel(client: docker.DockerClient, pid: int, kernel_id: str) -> list[Sandbox]:
    """The running containers of kernel ``kernel_id`` (pooled or not) owned by ``pid``."""
    return [s for s in sandboxes_of(client, pid) if s.kernel_id == kernel_id]

"""What the hub tests do on a student's single-user server (support.hub starts the hub):
run a notebook as JupyterLab would, and measure the memory of a student's server and kernel."""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support.servers import Server, execute

KERNEL = "course-101"  # the example's kernelspec (support.hub.KERNEL)


@dataclass
class NotebookRun:
    """One notebook executed on a single-user server: each code cell's stdout and status."""

    kernel_id: str
    outputs: list[str]
    statuses: list[str]
    seconds: float


def run_notebook(
    server: Server,
    path: str,
    kernel: str = KERNEL,
    before_close: Callable[[str], None] | None = None,
) -> NotebookRun:
    """Execute the notebook at ``path`` (server-relative) as JupyterLab would: a session on a
    kernel, each code cell over the channels websocket, the outputs saved back into it."""
    started = time.monotonic()
    got = server.api("GET", f"/api/contents/{path}")
    assert got.status_code == 200, got.text[:300]
    model = got.json()
    body = {"path": path, "type": "notebook", "kernel": {"name": kernel}}
    session = server.api("POST", "/api/sessions", json=body)
    assert session.status_code == 201, session.text[:1000]
    kernel_id = session.json()["kernel"]["id"]
    outputs, statuses = [], []
    try:
        ws = server.channels(kernel_id)
        try:
            for cell in model["content"]["cells"]:
                if cell["cell_type"] != "code":
                    continue
                result = execute(ws, cell["source"], timeout=180)
                reply = result["reply"]
                failed = (
                    f"{reply.get('ename')}: {reply.get('evalue')}"
                    if reply["status"] != "ok"
                    else ""
                )
                outputs.append(result["stdout"] + failed)
                statuses.append(reply["status"])
                cell["outputs"] = [{"output_type": "stream", "name": "stdout",
                                    "text": result["stdout"]}]  # fmt: skip
        finally:
            ws.close()
        if before_close is not None:
            before_close(kernel_id)
        saved = server.api(
            "PUT", f"/api/contents/{path}",
            json={"type": "notebook", "format": "json", "content": model["content"]},
        )  # fmt: skip
        assert saved.status_code == 200, saved.text[:300]
    finally:
        server.api("DELETE", f"/api/sessions/{session.json()['id']}")
    return NotebookRun(kernel_id, outputs, statuses, time.monotonic() - started)


def kernel_memory(kernel_id: str) -> int:
    """Bytes the kernel's container uses now (cgroup v1 or v2), 0 when it is gone."""
    import docker

    client = docker.from_env()
    try:
        found = client.api.containers(
            filters={"label": f"io.kernel-sandbox.kernel-id={kernel_id}"}, quiet=True
        )
    finally:
        client.close()
    for entry in found:
        full = entry["Id"]
        for path in (
            f"/sys/fs/cgroup/memory/docker/{full}/memory.usage_in_bytes",
            f"/sys/fs/cgroup/system.slice/docker-{full}.scope/memory.current",
        ):
            if os.path.exists(path):
                return int(Path(path).read_text())
    return 0


def server_memory(name: str) -> int:
    """Resident bytes of ``name``'s processes on the host outside containers: the single-user
    server (a kernel running as the student is in a container's cgroup, not counted)."""
    uid = pwd.getpwnam(name).pw_uid
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) != uid or "docker" in cgroup:
            continue
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return total

"""A leak check limited to what one test started.

conftest's ``leak_check`` compares every sandbox on the engine before and after a test, so
when several test runs share an engine (as on a shared CI host or a developer machine) it
reports, and force-removes, the other runs' kernels. This one only looks at containers and
runtime directories owned by this process (or by processes the test names, such as a
Jupyter Server it started) and at containers of the kernelspecs the test names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker

from kernel_sandbox.host.owner import Owner

LABEL = "io.kernel-sandbox."


@dataclass
class Scope:
    pids: set[int] = field(default_factory=lambda: {os.getpid()})
    kernelspecs: set[str] = field(default_factory=set)

    def spec(self, name: str) -> str:
        self.kernelspecs.add(name)
        return name


def _containers(client: docker.DockerClient, scope: Scope) -> list[str]:
    found = []
    for container in client.containers.list(all=True, filters={"label": f"{LABEL}managed=true"}):
        labels = container.labels
        if (
            labels.get(f"{LABEL}owner-pid", "") in {str(p) for p in scope.pids}
            or labels.get(f"{LABEL}kernelspec") in scope.kernelspecs
        ):
            found.append(container.id)
    return found


def _runtime_dirs(scope: Scope) -> list[str]:
    root = Path(f"/tmp/kernel-sandbox-{os.getuid()}")
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        owner = Owner.load(path)
        if owner is not None and owner.pid in scope.pids:
            found.append(str(path))
    return found


def own_leaks(docker_client: docker.DockerClient) -> Iterator[Scope]:
    """Body of a fixture: fail if the test leaves a sandbox container or runtime directory
    of its own behind (use it as ``yield from own_leaks(docker_client)``)."""
    scope = Scope()
    before = set(_containers(docker_client, scope)), set(_runtime_dirs(scope))
    yield scope
    deadline = time.monotonic() + 10
    while True:
        leaked = set(_containers(docker_client, scope)) - before[0]
        leaked_dirs = set(_runtime_dirs(scope)) - before[1]
        if not (leaked or leaked_dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for cid in leaked:  # only ever our own
        docker_client.api.remove_container(cid, force=True)
    assert not leaked, f"test left {len(leaked)} sandbox container(s) behind"
    assert not leaked_dirs, f"test left runtime directories behind: {sorted(leaked_dirs)}"

"""The one leak check: no sandbox container or runtime directory of a test's own is left.

Which sandboxes are a test's own is decided by one rule, so that other sessions sharing the
engine never count (nor get removed): the owner recorded on a sandbox (the ``owner-pid``
label, ``owner.json``) is a pid of the test's ``Scope`` (this process and any the test names,
such as a Jupyter Server it started), a descendant of this process, or a dead or unknown
process (whatever it left could be ours); or the sandbox runs a kernelspec the test named.

``leak_check`` (conftest) diffs these before and after a test; ``assert_nothing_left``
checks that one owner process, already gone, left nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors

from kernel_sandbox.host.owner import Owner
from support import engine_out_of_reach

LABEL = "io.kernel-sandbox.managed=true"
OWNER_PID_LABEL = "io.kernel-sandbox.owner-pid"
KERNELSPEC_LABEL = "io.kernel-sandbox.kernelspec"
SETTLE_SECONDS = 10  # a shutdown may still be finishing (well below the 30 s orphan grace)

# (owner pid or None when unknown, kernelspec or None) -> is it one the check looks at
Match = Callable[[int | None, str | None], bool]


def _foreign(pid: int) -> bool:
    """True for a live process that is neither this test process nor one of its descendants
    (another session sharing the engine: its kernels are not this test's leaks)."""
    while pid > 1:
        if pid == os.getpid():
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False  # dead: whatever it left could be ours
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return True


@dataclass
class Scope:
    """What a test owns besides its own process tree: pids and kernelspec names it adds."""

    pids: set[int] = field(default_factory=lambda: {os.getpid()})
    kernelspecs: set[str] = field(default_factory=set)

    def spec(self, name: str) -> str:
        """Count sandboxes of kernelspec ``name`` as this test's; return the name."""
        self.kernelspecs.add(name)
        return name

    def owns(self, pid: int | None, kernelspec: str | None = None) -> bool:
        if pid is None or pid in self.pids or kernelspec in self.kernelspecs:
            return True
        return not _foreign(pid)


def _pid(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def owner_pid(runtime_dir: Path) -> int | None:
    """The pid recorded in a runtime directory's owner.json, None when unreadable."""
    owner = Owner.load(runtime_dir)
    return None if owner is None else owner.pid


def _containers(client: docker.DockerClient, match: Match) -> set[str]:
    found = set()
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        labels = container.labels
        if match(_pid(labels.get(OWNER_PID_LABEL)), labels.get(KERNELSPEC_LABEL)):
            found.add(container.id)
    return found


def _runtime_dirs(match: Match) -> set[str]:
    root = Path(f"/tmp/kernel-sandbox-{os.getuid()}")
    paths = root.iterdir() if root.is_dir() else []
    return {str(path) for path in paths if match(owner_pid(path), None)}


def sandbox_containers(client: docker.DockerClient, scope: Scope | None = None) -> set[str]:
    """Ids of the sandbox containers ``scope`` (default: this process tree) owns."""
    return _containers(client, (scope or Scope()).owns)


def runtime_dirs(scope: Scope | None = None) -> set[str]:
    """Paths of the runtime directories ``scope`` (default: this process tree) owns."""
    return _runtime_dirs((scope or Scope()).owns)


def _settle(find: Callable[[], tuple[Any, set[str]]]) -> tuple[Any, set[str]]:
    """What ``find`` still reports once it is empty or SETTLE_SECONDS have passed."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        containers, dirs = find()
        if not (containers or dirs) or time.monotonic() > deadline:
            return containers, dirs
        time.sleep(0.2)


def _remove(client: docker.DockerClient, container_ids: set[str]) -> None:
    """Remove leaked containers so one failure does not hold resources for the rest."""
    for cid in container_ids:
        try:
            client.api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass


def no_leaks(client: docker.DockerClient) -> Iterator[Scope]:
    """Body of the ``leak_check`` fixture: yield the test's Scope, then fail if a sandbox
    container or runtime directory it owns appeared during the test and is still there."""
    scope = Scope()
    containers_before, dirs_before = sandbox_containers(client, scope), runtime_dirs(scope)
    yield scope
    leaked, leaked_dirs = _settle(
        lambda: (
            sandbox_containers(client, scope) - containers_before,
            runtime_dirs(scope) - dirs_before,
        )
    )
    _remove(client, leaked)
    assert not leaked, f"test left {len(leaked)} sandbox container(s) behind"
    assert not leaked_dirs, f"test left runtime directories behind: {sorted(leaked_dirs)}"


def containers_of(client: docker.DockerClient, pid: int) -> list[str]:
    """Ids of the sandbox containers started by process ``pid``."""
    return sorted(_containers(client, lambda owner, kernelspec: owner == pid))


def assert_nothing_left(
    pid: int, who: str | None = None, client: docker.DockerClient | None = None
) -> None:
    """No sandbox container or runtime directory owned by process ``pid`` (which has ended)
    remains: owner-scoped, so no other session sharing the engine can disturb it. In a unit
    test the engine is out of reach of ``pid`` too, so only runtime directories can be left."""
    who = who or f"process {pid}"

    def exactly(owner: int | None, kernelspec: str | None) -> bool:
        return owner == pid

    if engine_out_of_reach():
        left, dirs = [], _runtime_dirs(exactly)
    else:
        engine = client or docker.from_env()
        try:
            left, dirs = _settle(lambda: (containers_of(engine, pid), _runtime_dirs(exactly)))
        finally:
            if client is None:
                engine.close()
    assert not left, f"{who} left containers {sorted(left)} behind"
    assert not dirs, f"{who} left runtime directories {sorted(dirs)} behind"

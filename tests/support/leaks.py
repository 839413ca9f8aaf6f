"""The one leak check: no sandbox container, runtime directory or uid claim of a test's own
is left.

Which sandboxes are a test's own is decided by one rule, so that other sessions sharing the
engine never count (nor get removed): the owner recorded on a sandbox (the ``owner-pid``
label, ``owner.json``) is a pid of the test's ``Scope``: this process, any process the test
names (``scope.pids.add``), and every descendant of this process seen while the test ran
(sampled, so an owner the test killed or that has exited still counts); or the sandbox runs a
kernelspec the test named (``scope.spec``).

A uid claim (kernel_sandbox.host.uids) is this process's when it names this process: an
owner that died leaves a stale claim, which the next claim takes over, not a leak.

``leak_check`` (conftest) diffs these before and after a test; ``assert_nothing_left``
checks that one owner process, already gone, left nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from kernel_sandbox.host.owner import Owner
from kernel_sandbox.host.uids import DEFAULT_CLAIM_DIR
from support import engine_out_of_reach

LABEL = "io.kernel-sandbox.managed=true"
OWNER_PID_LABEL = "io.kernel-sandbox.owner-pid"
KERNELSPEC_LABEL = "io.kernel-sandbox.kernelspec"
SETTLE_SECONDS = 10  # a shutdown may still be finishing (well below the 30 s orphan grace)

# (owner pid or None when unknown, kernelspec or None) -> is it one the check looks at
Match = Callable[[int | None, str | None], bool]


def _parents(known: dict[int, int] | None = None) -> dict[int, int]:
    """pid -> parent pid of every process on this machine; the stat files of pids already
    in ``known`` are not read again."""
    known = known or {}
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in known:
            parents[pid] = known[pid]
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(parents: dict[int, int]) -> set[int]:
    """This process and its live descendants."""
    found: set[int] = set()
    mine = {os.getpid()}
    for pid in parents:
        chain: list[int] = []
        while pid > 1 and pid not in found and pid not in mine:
            chain.append(pid)
            pid = parents.get(pid, 0)
        if pid in found or pid in mine:
            found.update(chain)
    return found | mine


class _Sampler(threading.Thread):
    """Adds this process's descendants to a scope while a test runs, so that an owner
    process that has died by the end of the test (killed, or exited) is known to be ours.
    A kernel takes far longer to start than the sampling period."""

    PERIOD = 0.1

    def __init__(self, scope: Scope):
        super().__init__(name="leak-check-sampler", daemon=True)
        self.scope, self.done = scope, threading.Event()

    def run(self) -> None:
        parents: dict[int, int] = {}
        while not self.done.wait(self.PERIOD):
            parents = _parents(parents)
            self.scope.pids.update(_descendants(parents))

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.scope.pids.update(_descendants(_parents()))


@dataclass
class Scope:
    """What a test owns besides its own process tree: pids and kernelspec names it adds."""

    pids: set[int] = field(default_factory=lambda: {os.getpid()})
    kernelspecs: set[str] = field(default_factory=set)

    def spec(self, name: str) -> str:
        """Count sandboxes of kernelspec ``name`` as this test's; return the name."""
        self.kernelspecs.add(name)
        return name

    def matcher(self) -> Match:
        """A Match for the sandboxes of this scope, as the process tree is now."""
        live = _descendants(_parents())

        def owns(pid: int | None, kernelspec: str | None) -> bool:
            if kernelspec is not None and kernelspec in self.kernelspecs:
                return True
            return pid is not None and (pid in self.pids or pid in live)

        return owns


def _any(pid: int | None, kernelspec: str | None) -> bool:
    return True


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
    # one listing call: containers.list() inspects each container after listing, and fails
    # when another session removes one in between
    for container in client.api.containers(all=True, filters={"label": LABEL}):
        labels = container.get("Labels") or {}
        if match(_pid(labels.get(OWNER_PID_LABEL)), labels.get(KERNELSPEC_LABEL)):
            found.add(container["Id"])
    return found


def _runtime_dirs(match: Match) -> set[str]:
    root = Path(f"/tmp/kernel-sandbox-{os.getuid()}")
    paths = root.iterdir() if root.is_dir() else []
    return {str(path) for path in paths if match(owner_pid(path), None)}


def sandbox_containers(client: docker.DockerClient, scope: Scope | None = None) -> set[str]:
    """Ids of the sandbox containers ``scope`` (default: this process tree) owns."""
    return _containers(client, (scope or Scope()).matcher())


def runtime_dirs(scope: Scope | None = None) -> set[str]:
    """Paths of the runtime directories ``scope`` (default: this process tree) owns."""
    return _runtime_dirs((scope or Scope()).matcher())


def _settle(find: Callable[[], tuple[set[str], set[str]]]) -> tuple[set[str], set[str]]:
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


def own_uid_claims(directory: str = DEFAULT_CLAIM_DIR) -> set[str]:
    """The uid claims held by this process (kernel_sandbox.host.uids)."""
    me = Owner.current()
    found = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        try:
            record = json.loads(Path(directory, name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and (record.get("pid"), record.get("start")) == (
            me.pid,
            me.start,
        ):
            found.add(name)
    return found


def no_leaks(client: docker.DockerClient) -> Iterator[Scope]:
    """Body of the ``leak_check`` fixture: yield the test's Scope, then fail if a sandbox
    container or runtime directory it owns appeared during the test and is still there."""
    scope = Scope()
    # everything there before, whoever owns it: pids and kernelspecs added later to the scope
    # must not turn an older sandbox into this test's leak
    containers_before, dirs_before = _containers(client, _any), _runtime_dirs(_any)
    claims_before = own_uid_claims()
    sampler = _Sampler(scope)
    sampler.start()
    try:
        yield scope
    finally:
        sampler.stop()
    leaked, leaked_dirs = _settle(
        lambda: (
            sandbox_containers(client, scope) - containers_before,
            runtime_dirs(scope) - dirs_before,
        )
    )
    _remove(client, leaked)
    assert not leaked, f"test left {len(leaked)} sandbox container(s) behind"
    assert not leaked_dirs, f"test left runtime directories behind: {sorted(leaked_dirs)}"
    leaked_claims = own_uid_claims() - claims_before
    assert not leaked_claims, f"test left uid claims behind: {sorted(leaked_claims)}"


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

    left: set[str] = set()
    if engine_out_of_reach():
        dirs = _runtime_dirs(exactly)
    else:
        engine = client or docker.from_env()
        try:
            left, dirs = _settle(lambda: (set(containers_of(engine, pid)), _runtime_dirs(exactly)))
        finally:
            if client is None:
                engine.close()
    assert not left, f"{who} left containers {sorted(left)} behind"
    assert not dirs, f"{who} left runtime directories {sorted(dirs)} behind"

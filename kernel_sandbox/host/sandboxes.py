"""The live sandboxes, found by their labels, and how one is ended.

Every container the provisioner starts carries ``io.kernel-sandbox.*`` labels (kernel id,
kernelspec, profile, owner, runtime directory), so nothing here keeps state of its own. A
warm pool's sandbox (label ``io.kernel-sandbox.pooled=true``, :mod:`kernel_sandbox.host.pool`)
is started before any kernel exists, so its kernel-id label is empty: the kernel that claimed
it is named in ``<runtime_dir>/kernel-id``, a host-only file; none means it is still waiting.

:func:`stop_sandbox` ends a kernel the way its owner would: when the owning process (a
Jupyter Server, an nbclient run) is alive, it asks it through a request file in the kernel's
host-only runtime directory, and the owner shuts the kernel down through its kernel manager
(Jupyter Server then forgets it instead of restarting it); when the owner is gone, or does not
answer in time, the container is removed directly. Orphans are reaped by
:func:`kernel_sandbox.host.reap.sweep`.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.host.monitor import request_stop
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.host.rundir import CLAIMED_BY, RuntimeDir, default_root
from kernel_sandbox.inside.contract import LABEL_PREFIX

__all__ = ["Sandbox", "claimed_by", "find_sandbox", "list_sandboxes", "stop_sandbox"]

_KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def claimed_by(runtime_dir: str) -> str:
    """The id of the kernel that claimed the pooled sandbox in ``runtime_dir`` ("" while it
    waits, or when the file cannot be read: another user's, or gone). The file is host-only
    (the kernel cannot write it); it is still read without following a link, and bounded."""
    if not runtime_dir:
        return ""
    try:
        fd = os.open(os.path.join(runtime_dir, CLAIMED_BY), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        text = os.read(fd, 256).decode("ascii", "replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
    return text if _KERNEL_ID.fullmatch(text) else ""


@dataclass
class Sandbox:
    """One kernel container, as its labels and the engine describe it."""

    kernel_id: str
    kernelspec: str
    profile: str
    container_id: str
    container: str
    state: str
    created: float
    owner: str
    owner_pid: int
    runtime_dir: str
    memory: int | None = None
    memory_limit: int | None = None
    pooled: bool = False  # a warm pool's sandbox: waiting for a claim while kernel_id is ""

    @property
    def waiting(self) -> bool:
        """A pooled sandbox no kernel has claimed yet."""
        return bool(self.pooled) and not self.kernel_id

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.created)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Sandbox:
        labels = summary.get("Labels") or {}

        def label(name: str) -> str:
            return str(labels.get(LABEL_PREFIX + name, ""))

        names = summary.get("Names") or ["?"]
        pooled = label("pooled") == "true"
        kernel_id = label("kernel-id")
        if pooled and not kernel_id:
            kernel_id = claimed_by(label("runtime-dir"))
        return cls(
            kernel_id=kernel_id,
            kernelspec=label("kernelspec"),
            profile=label("profile"),
            container_id=summary["Id"],
            container=names[0].lstrip("/"),
            state=summary.get("State", "?"),
            created=float(summary.get("Created", 0)),
            owner=label("owner"),
            owner_pid=int(label("owner-pid") or 0),
            runtime_dir=label("runtime-dir"),
            pooled=pooled,
        )


async def list_sandboxes(backend: DockerBackend, all_states: bool = False) -> list[Sandbox]:
    """The managed containers (running ones unless ``all_states``), with memory in use."""
    sandboxes = [Sandbox.from_summary(s) for s in await backend.find()]
    if not all_states:
        sandboxes = [s for s in sandboxes if s.state == "running"]
    running = [s for s in sandboxes if s.state == "running"]
    usages = await asyncio.gather(*(backend.memory_usage(s.container_id) for s in running))
    for sandbox, usage in zip(running, usages, strict=True):
        if usage is not None:
            sandbox.memory, sandbox.memory_limit = usage
    return sorted(sandboxes, key=lambda s: s.created)


def _matching(sandboxes: list[Sandbox], ident: str) -> list[Sandbox]:
    exact = [s for s in sandboxes if ident in (s.kernel_id, s.container, s.container_id)]
    if exact:
        return exact
    return [
        s
        for s in sandboxes
        if (s.kernel_id and s.kernel_id.startswith(ident)) or s.container_id.startswith(ident)
    ]


async def find_sandbox(backend: DockerBackend, ident: str) -> list[Sandbox]:
    """The containers (in any state) of the one kernel ``ident`` names: its kernel id, a
    unique prefix of it, or its container's name or id.

    Raises:
        SandboxError: nothing matches, or the prefix matches several kernels.
    """
    matches = _matching(await list_sandboxes(backend, all_states=True), ident)
    if not matches:
        raise SandboxError(f"no sandboxed kernel {ident!r} (see `kernel-sandbox ps`)")
    kernels = {s.kernel_id or s.container for s in matches}  # waiting pooled ones have no id
    if len(kernels) > 1:
        raise SandboxError(
            f"{ident!r} matches kernels {', '.join(sorted(kernels))}; give more of the id"
        )
    return matches


async def _gone(backend: DockerBackend, container_id: str) -> bool:
    state = await backend.state(container_id)
    return not state.running


async def stop_sandbox(
    backend: DockerBackend, sandbox: Sandbox, timeout: float, force: bool
) -> str:
    """End one sandbox; return how it ended.

    Raises:
        SandboxError: its owner is alive but cannot be asked (another user's kernel).
    """
    runtime_dir = Path(sandbox.runtime_dir) if sandbox.runtime_dir else None
    owner = Owner.load(runtime_dir) if runtime_dir is not None else None
    if sandbox.state != "running":
        await backend.remove(sandbox.container_id)
        return f"it had already ended ({sandbox.state}); container removed"
    if sandbox.waiting and owner is not None and owner.is_alive():
        # no kernel to shut down: its pool sees the waiter gone, cleans up and starts another
        await backend.remove(sandbox.container_id)
        return f"a pooled sandbox of pid {owner.pid}, not claimed yet; container removed"
    if not force and owner is not None and owner.is_alive() and runtime_dir is not None:
        try:
            request_stop(runtime_dir, getpass.getuser())
        except OSError as exc:
            raise SandboxError(
                f"cannot ask the owner of kernel {sandbox.kernel_id} (pid {owner.pid}) to stop "
                f"it: {exc.strerror}; run this as its owner or root, or use --force"
            ) from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await _gone(backend, sandbox.container_id):
                return f"shut down by its owner (pid {owner.pid})"
            await asyncio.sleep(0.2)
        await backend.remove(sandbox.container_id)
        return (
            f"its owner (pid {owner.pid}) did not end it within {timeout:.0f}s; "
            "container removed (the owner will see the kernel die)"
        )
    await backend.remove(sandbox.container_id)
    if runtime_dir is not None and (owner is None or owner.is_alive() is False):
        if runtime_dir.parent == Path(default_root()):  # only ever inside our own root
            removal = RuntimeDir(runtime_dir).remove()
            if not removal.complete:
                return f"container removed; its runtime directory only in part: {removal}"
    return "container removed" + ("" if owner is None else " (its owner was gone)")

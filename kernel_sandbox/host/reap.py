"""Reaping what a killed owner left behind: orphaned containers and stale runtime directories.

Run by ``kernel-sandbox gc`` and, in the background, when a provisioner starts its first
kernel in a process. A container is an orphan when its owner process is dead: the owner is
read from the host-only owner record of its runtime directory (rewritten by a server that
adopts the kernel), else from the container's labels; both are out of the kernel's reach.
Nothing the kernel can touch (whether someone answers on a socket it can see, what lies in
its writable part) counts. Containers owned by live processes, or by another host, are never
touched.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.host.rundir import RuntimeDir
from kernel_sandbox.inside.contract import LABEL_PREFIX

__all__ = ["PROCESS_SWEEPS", "SweepOnce", "SweepReport", "sweep"]

# A runtime directory younger than this may belong to a kernel that is being started.
STALE_DIR_AGE = 120.0


@dataclass
class SweepReport:
    containers: list[str] = field(default_factory=list)
    runtime_dirs: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # what could not be removed, and why

    def __bool__(self) -> bool:
        return bool(self.containers or self.runtime_dirs)


def _owner_of(labels: dict[str, str], runtime_dir: Path | None) -> Owner:
    if runtime_dir is not None and (owner := Owner.load(runtime_dir)) is not None:
        return owner
    return Owner(
        labels.get(LABEL_PREFIX + "owner-host", ""),
        int(labels.get(LABEL_PREFIX + "owner-pid", "0") or 0),
        labels.get(LABEL_PREFIX + "owner-start") or None,
    )


def is_orphan(labels: dict[str, str]) -> bool:
    """Whether a managed container's owner is gone, or its runtime directory is: then no
    client can ever reach the kernel again."""
    dir_label = labels.get(LABEL_PREFIX + "runtime-dir")
    runtime_dir = Path(dir_label) if dir_label else None
    owner = _owner_of(labels, runtime_dir)
    if runtime_dir is not None and not runtime_dir.exists() and owner.is_alive() is not None:
        return True
    return owner.is_alive() is False


async def sweep(backend: DockerBackend, runtime_root: str, dry_run: bool = False) -> SweepReport:
    """Remove orphaned sandboxes and stale runtime directories; report what was (or would be)
    removed."""
    report = SweepReport()
    referenced: set[str] = set()
    for container in await backend.find():
        labels = container.get("Labels") or {}
        runtime_dir = labels.get(LABEL_PREFIX + "runtime-dir", "")
        if labels.get(LABEL_PREFIX + "service") and Path(runtime_dir).parent != Path(runtime_root):
            # the sandbox service's: it may be restarting (its kernels wait for it), and it
            # reaps its own, from its records and its runtime root
            continue
        if not is_orphan(labels):
            referenced.add(runtime_dir)
            continue
        report.containers.append(container["Id"])
        if runtime_dir:
            report.runtime_dirs.append(runtime_dir)
        if not dry_run:
            await backend.remove(container["Id"])
    root = Path(runtime_root)
    now = time.time()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_symlink():  # a pooled kernel's handle (RuntimeDir.make_handle)
            if not path.exists() and not dry_run:
                path.unlink(missing_ok=True)  # its directory is gone
            continue
        if str(path) in referenced or str(path) in report.runtime_dirs or not path.is_dir():
            continue
        owner = Owner.load(path)
        if owner is not None and owner.is_alive() is not False:
            continue  # a live owner's kernel (perhaps between restarts)
        if now - path.lstat().st_mtime > STALE_DIR_AGE or owner is not None:
            report.runtime_dirs.append(str(path))
    if not dry_run:
        for path_text in report.runtime_dirs:
            path = Path(path_text)
            if path.parent == root:  # only ever delete inside our own root
                removal = RuntimeDir(path).remove()
                if not removal.complete:
                    report.leftovers.append(str(removal))
    return report


class SweepOnce:
    """Sweeps each runtime root once per process, in the background (a provisioner's first
    start reaps what killed owners left, without delaying the kernel)."""

    def __init__(self) -> None:
        self._swept: set[str] = set()
        self._lock = threading.Lock()

    def start(self, backend: DockerBackend, runtime_root: str, log: Any) -> bool:
        """Sweep ``runtime_root`` in a daemon thread unless it was already; return whether."""
        with self._lock:
            if runtime_root in self._swept:
                return False
            self._swept.add(runtime_root)

        def run() -> None:
            try:
                report = asyncio.run(sweep(backend, runtime_root))
            except Exception as exc:  # a failed sweep must never break a kernel start
                log.warning("kernel-sandbox: orphan sweep failed: %s", exc)
                return
            if report:
                log.info(
                    "kernel-sandbox: reaped %d orphaned container(s), %d runtime dir(s)",
                    len(report.containers),
                    len(report.runtime_dirs),
                )

        threading.Thread(target=run, name="kernel-sandbox-sweep", daemon=True).start()
        return True


# The default for every provisioner of this process (a test can hand in its own).
PROCESS_SWEEPS = SweepOnce()

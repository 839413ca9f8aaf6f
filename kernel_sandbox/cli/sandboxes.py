"""``kernel-sandbox ps``, ``stop`` and ``gc``: the live sandboxes, found by their labels.

Every container the provisioner starts carries ``io.kernel-sandbox.*`` labels (kernel id,
kernelspec, profile, owner, runtime directory), so these commands need no state of their own.

``stop`` ends a kernel the way its owner would: when the owning process (a Jupyter Server,
an nbclient run) is alive, it asks it through a request file in the kernel's host-only
runtime directory, and the owner shuts the kernel down through its kernel manager (Jupyter
Server then forgets it instead of restarting it); when the owner is gone, or does not answer
in time, the container is removed directly.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.host.monitor import request_stop
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.host.reap import sweep
from kernel_sandbox.host.rundir import default_root
from kernel_sandbox.inside.contract import LABEL_PREFIX
from kernel_sandbox.policy import format_size

__all__ = ["Sandbox", "add_gc_command", "add_ps_command", "add_stop_command", "list_sandboxes"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
err = Console(stderr=True, highlight=False, soft_wrap=True)


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

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.created)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> Sandbox:
        labels = summary.get("Labels") or {}

        def label(name: str) -> str:
            return str(labels.get(LABEL_PREFIX + name, ""))

        names = summary.get("Names") or ["?"]
        return cls(
            kernel_id=label("kernel-id"),
            kernelspec=label("kernelspec"),
            profile=label("profile"),
            container_id=summary["Id"],
            container=names[0].lstrip("/"),
            state=summary.get("State", "?"),
            created=float(summary.get("Created", 0)),
            owner=label("owner"),
            owner_pid=int(label("owner-pid") or 0),
            runtime_dir=label("runtime-dir"),
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _memory(sandbox: Sandbox) -> str:
    if sandbox.memory is None:
        return "-"
    used = f"{sandbox.memory / 1024**2:.0f}m"
    return f"{used} / {format_size(sandbox.memory_limit)}" if sandbox.memory_limit else used


async def cmd_ps(args: argparse.Namespace) -> int:
    backend = DockerBackend()
    try:
        sandboxes = await list_sandboxes(backend, args.all)
    finally:
        backend.close()
    if args.json:
        print(
            json.dumps([{**asdict(s), "uptime": round(s.uptime, 1)} for s in sandboxes], indent=1)
        )
        return EXIT_OK
    if not sandboxes:
        err.print(
            "no sandboxed kernel is running" + ("" if args.all else " (--all: ended ones too)")
        )
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    columns = ["KERNEL ID", "KERNELSPEC", "PROFILE", "UPTIME", "MEMORY", "OWNER", "CONTAINER"]
    if args.all:
        columns.append("STATE")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for s in sandboxes:
        row = [
            s.kernel_id or "?",
            s.kernelspec,
            s.profile,
            _duration(s.uptime),
            _memory(s),
            f"{s.owner} (pid {s.owner_pid})",
            s.container,
        ]
        table.add_row(*row, *([s.state] if args.all else []))
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 200))
    console.print(table)
    return EXIT_OK


# -- stop -----------------------------------------------------------------------------------


def _matching(sandboxes: list[Sandbox], ident: str) -> list[Sandbox]:
    exact = [s for s in sandboxes if ident in (s.kernel_id, s.container, s.container_id)]
    if exact:
        return exact
    return [
        s for s in sandboxes if s.kernel_id.startswith(ident) or s.container_id.startswith(ident)
    ]


async def _gone(backend: DockerBackend, container_id: str) -> bool:
    state = await backend.state(container_id)
    return not state.running


async def stop_sandbox(
    backend: DockerBackend, sandbox: Sandbox, timeout: float, force: bool
) -> str:
    """End one sandbox; return how it ended."""
    runtime_dir = Path(sandbox.runtime_dir) if sandbox.runtime_dir else None
    owner = Owner.load(runtime_dir) if runtime_dir is not None else None
    if sandbox.state != "running":
        await backend.remove(sandbox.container_id)
        return f"it had already ended ({sandbox.state}); container removed"
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
            shutil.rmtree(runtime_dir, ignore_errors=True)
    return "container removed" + ("" if owner is None else " (its owner was gone)")


async def cmd_stop(args: argparse.Namespace) -> int:
    backend = DockerBackend()
    try:
        sandboxes = [s for s in await list_sandboxes(backend, all_states=True)]
        matches = _matching(sandboxes, args.kernel_id)
        if not matches:
            err.print(
                f"[bold red]error:[/bold red] no sandboxed kernel {args.kernel_id!r} "
                "(see `kernel-sandbox ps`)",
                markup=True,
                soft_wrap=True,
            )
            return EXIT_USAGE
        kernels = {s.kernel_id for s in matches}
        if len(kernels) > 1:
            err.print(
                f"[bold red]error:[/bold red] {args.kernel_id!r} matches kernels "
                f"{', '.join(sorted(kernels))}; give more of the id",
                markup=True,
                soft_wrap=True,
            )
            return EXIT_USAGE
        for sandbox in matches:
            how = await stop_sandbox(backend, sandbox, args.timeout, args.force)
            err.print(
                f"stopped kernel {sandbox.kernel_id} ({sandbox.kernelspec}, container "
                f"{sandbox.container}): {how}"
            )
    finally:
        backend.close()
    return EXIT_OK


# -- gc -------------------------------------------------------------------------------------


async def cmd_gc(args: argparse.Namespace) -> int:
    backend = DockerBackend()
    try:
        report = await sweep(backend, args.runtime_root or default_root(), dry_run=args.dry_run)
    finally:
        backend.close()
    verb = "would remove" if args.dry_run else "removed"
    err.print(
        f"{verb} {len(report.containers)} orphaned container(s) and "
        f"{len(report.runtime_dirs)} runtime director(ies)"
    )
    for item in [*report.containers, *report.runtime_dirs]:
        err.print(f"  {item}")
    return EXIT_OK


# -- parsers --------------------------------------------------------------------------------


def add_ps_command(commands: Any) -> None:
    ps = commands.add_parser(
        "ps",
        help="list live sandboxed kernels",
        description="List the running sandboxed kernels on this engine, found by their "
        "container labels: kernel id, kernelspec, profile, uptime, memory in use (of the "
        "limit), owning process and container.",
    )
    ps.add_argument("--all", action="store_true", help="include containers that have ended")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ps.set_defaults(func=cmd_ps)


def add_stop_command(commands: Any) -> None:
    stop = commands.add_parser(
        "stop",
        help="end a sandboxed kernel",
        description="End the kernel KERNEL_ID (or a unique prefix of it, or its container "
        "name). A live owner (Jupyter Server, nbclient) is asked to shut it down, so the "
        "server forgets it rather than restarting it; otherwise, or after --timeout, the "
        "container is removed.",
    )
    stop.add_argument("kernel_id", metavar="KERNEL_ID", help="kernel id from `kernel-sandbox ps`")
    stop.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long the owner has to shut it down (default 10)",
    )
    stop.add_argument(
        "--force",
        action="store_true",
        help="remove the container at once, without asking its owner",
    )
    stop.set_defaults(func=cmd_stop)


def add_gc_command(commands: Any) -> None:
    gc = commands.add_parser(
        "gc",
        help="remove sandboxes whose owner is gone",
        description="Remove containers and runtime directories left behind by owners that "
        "died (a killed Jupyter Server); containers of live owners are never touched.",
    )
    gc.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    gc.add_argument(
        "--runtime-root",
        default=None,
        help="runtime directory root (default /tmp/kernel-sandbox-UID)",
    )
    gc.set_defaults(func=cmd_gc)

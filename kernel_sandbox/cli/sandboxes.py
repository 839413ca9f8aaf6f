"""``kernel-sandbox ps``, ``stop`` and ``gc``: the commands over the live sandboxes.

The sandboxes themselves (found by their labels, how one is stopped) are
:mod:`kernel_sandbox.host.sandboxes`; the orphan sweep is :mod:`kernel_sandbox.host.reap`.
Through the sandbox service (:mod:`kernel_sandbox.cli.service_mode`) ``ps`` and ``stop`` ask
the service, which shows and ends the caller's own kernels only (an operator's: all).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from typing import Any

from rich.table import Table

from kernel_sandbox.cli.console import EXIT_OK, done, warn, wide_console
from kernel_sandbox.cli.service_mode import add_service_flags, ask, service_for
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.host.reap import sweep
from kernel_sandbox.host.rundir import default_root
from kernel_sandbox.host.sandboxes import Sandbox, find_sandbox, list_sandboxes, stop_sandbox
from kernel_sandbox.policy import format_size

__all__ = ["add_gc_command", "add_ps_command", "add_stop_command"]


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


_SANDBOX_FIELDS = [f.name for f in fields(Sandbox)]


async def _service_sandboxes(args: argparse.Namespace) -> tuple[list[Sandbox], list[dict]] | None:
    """The caller's kernels as the service lists them (None: direct mode)."""
    client = service_for(args)
    if client is None:
        return None
    rows = (await ask(client, "list", all=args.all))["kernels"]
    return [Sandbox(**{k: row.get(k) for k in _SANDBOX_FIELDS}) for row in rows], rows


async def cmd_ps(args: argparse.Namespace, backend: DockerBackend) -> int:
    served = await _service_sandboxes(args)
    if served is not None:
        sandboxes, records = served
    else:
        sandboxes = await list_sandboxes(backend, args.all) + await _pods(args, args.all)
        records = [{**asdict(s), "uptime": round(s.uptime, 1)} for s in sandboxes]
    if args.json:
        print(json.dumps(records, indent=1))
        return EXIT_OK
    if not sandboxes:
        hint = "" if args.all else " (--all: ended ones too)"
        done("no sandboxed kernel is running" + hint)
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    columns = ["KERNEL ID", "KERNELSPEC", "PROFILE", "UPTIME", "MEMORY", "OWNER", "CONTAINER"]
    if args.all:
        columns.append("STATE")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for s in sandboxes:
        row = [
            "(pooled)" if s.waiting else s.kernel_id or "?",
            s.kernelspec,
            s.profile,
            _duration(s.uptime),
            _memory(s),
            f"{s.owner} (pid {s.owner_pid})",
            s.container,
        ]
        table.add_row(*row, *([s.state] if args.all else []))
    wide_console(200).print(table)
    return EXIT_OK


async def cmd_stop(args: argparse.Namespace, backend: DockerBackend) -> int:
    client = service_for(args)
    if client is not None:
        reply = await ask(
            client, "stop", kernel_id=args.kernel_id, timeout=args.timeout, force=args.force
        )
        how = "ended; its clients are told why" if reply.get("ended") else "asked to end"
        done(
            f"stopped kernel {reply['stopped']} ({reply.get('kernelspec')}, of "
            f"{reply.get('user')}, container {reply.get('container')}): {how}"
        )
        return EXIT_OK
    pods = [p for p in await _pods(args, True) if p.kernel_id.startswith(args.kernel_id)]
    if pods and not await _docker_has(backend, args.kernel_id):
        for pod in pods:
            how = await _stop_pod(args, pod)
            done(f"stopped kernel {pod.kernel_id} ({pod.kernelspec}): {how}")
        return EXIT_OK
    for sandbox in await find_sandbox(backend, args.kernel_id):
        how = await stop_sandbox(backend, sandbox, args.timeout, args.force)
        done(
            f"stopped kernel {sandbox.kernel_id} ({sandbox.kernelspec}, container "
            f"{sandbox.container}): {how}"
        )
    return EXIT_OK


async def cmd_gc(args: argparse.Namespace, backend: DockerBackend) -> int:
    report = await sweep(backend, args.runtime_root or default_root(), dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    done(
        f"{verb} {len(report.containers)} orphaned container(s) and "
        f"{len(report.runtime_dirs)} runtime director(ies)"
    )
    for item in [*report.containers, *report.runtime_dirs]:
        done(f"  {item}")
    for item in report.leftovers:
        warn(f"warning: could not remove everything: {item}")
    for api in _kube_apis(args):
        from kernel_sandbox.kube.reap import sweep as sweep_pods

        try:
            pods = await sweep_pods(api, dry_run=args.dry_run)
        except SandboxError as exc:
            warn(f"warning: namespace {api.namespace}: {exc}")
            continue
        finally:
            api.close()
        done(f"{verb} {len(pods.pods)} orphaned pod(s) in namespace {api.namespace}")
        for item in [*pods.pods, *pods.others]:
            done(f"  {item}")
    return EXIT_OK


# -- kernel pods (backend: kubernetes), when a kernelspec starts them -------------------------


def _kube_apis(args: argparse.Namespace) -> list[Any]:
    """One API per cluster and namespace that a kernelspec starts pods in (none: [])."""
    from kernel_sandbox.cli.doctor_kube import kube_targets
    from kernel_sandbox.kube.api import KubeApi
    from kernel_sandbox.policy.jupyter_config import load_jupyter_config

    try:
        config, _files = load_jupyter_config(getattr(args, "config", None))
        targets = kube_targets(config)
    except Exception as exc:  # a broken config: doctor says what; ps still shows containers
        warn(f"warning: cannot tell which kernelspecs start pods: {exc}")
        return []
    return [KubeApi(ns, cfg, ctx, inc, timeout=5.0) for cfg, ctx, ns, inc in targets]


async def _pods(args: argparse.Namespace, all_states: bool) -> list[Sandbox]:
    from kernel_sandbox.kube.sandboxes import list_pods

    found: list[Sandbox] = []
    for api in _kube_apis(args):
        try:
            seen = {p.container_id for p in found}  # two kubeconfigs may name one cluster
            found += [p for p in await list_pods(api, all_states) if p.container_id not in seen]
        except SandboxError as exc:
            warn(f"warning: namespace {api.namespace}: {exc}")
        finally:
            api.close()
    return found


async def _docker_has(backend: DockerBackend, ident: str) -> bool:
    try:
        return bool(await find_sandbox(backend, ident))
    except SandboxError:
        return False


async def _stop_pod(args: argparse.Namespace, pod: Sandbox) -> str:
    from kernel_sandbox.kube.sandboxes import stop_pod

    for api in _kube_apis(args):
        try:
            if any(p.container == pod.container for p in await _pods_in(api)):
                return await stop_pod(api, pod, 0 if args.force else 2)
        finally:
            api.close()
    return "already gone"


async def _pods_in(api: Any) -> list[Sandbox]:
    from kernel_sandbox.kube.sandboxes import list_pods

    return await list_pods(api, True)


# -- parsers --------------------------------------------------------------------------------


def add_ps_command(commands: Any) -> None:
    ps = commands.add_parser(
        "ps",
        help="list live sandboxed kernels",
        description="List the running sandboxed kernels on this engine, found by their "
        "container labels: kernel id, kernelspec, profile, uptime, memory in use (of the "
        "limit), owning process and container. A warm pool's sandbox waiting for a claim "
        "shows '(pooled)' as its kernel id. Through the sandbox service: your own "
        "kernels only (an operator's: everyone's, OWNER says whose).",
    )
    ps.add_argument("--all", action="store_true", help="include containers that have ended")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_service_flags(ps)
    ps.set_defaults(func=cmd_ps)


def add_stop_command(commands: Any) -> None:
    stop = commands.add_parser(
        "stop",
        help="end a sandboxed kernel",
        description="End the kernel KERNEL_ID (or a unique prefix of it, or its container "
        "name). A live owner (Jupyter Server, nbclient) is asked to shut it down, so the "
        "server forgets it rather than restarting it; otherwise, or after --timeout, the "
        "container is removed. Through the sandbox service: only a kernel of yours (an "
        "operator: anyone's); its clients are told who stopped it.",
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
    add_service_flags(stop)
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

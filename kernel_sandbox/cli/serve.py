"""``kernel-sandbox serve``: run the sandbox service (see docs/service.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from kernel_sandbox.cli.console import UsageError, err, out
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import EngineUnavailable
from kernel_sandbox.service.client import DEFAULT_SOCKET

__all__ = ["add_serve_command"]

DEFAULT_STATE_DIR = "/var/lib/kernel-sandbox/service"
DEFAULT_RUNTIME_ROOT = "/run/kernel-sandbox/k"
DEFAULT_STAGING = "/run/kernel-sandbox/mnt"
DEFAULT_LOG_DIR = "/var/log/kernel-sandbox"
DEFAULT_CREDENTIALS = "/etc/kernel-sandbox/data-credentials.json"


def service_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The provisioner settings of every kernel the service starts: state and logs in the
    system's places, never a user's."""
    settings: dict[str, Any] = {
        "runtime_root": args.runtime_root,
        "token_db": os.path.join(args.state_dir, "tokens.sqlite"),
        "audit_log": os.path.join(args.log_dir, "audit.jsonl"),
        "egress_log": os.path.join(args.log_dir, "egress.jsonl"),
        "orphan_timeout": args.orphan_timeout,
        "pool_size": args.pool_size,
    }
    if os.path.exists(args.data_credentials):
        settings["data_credentials"] = args.data_credentials
    # where kernels with `backend: kubernetes` go: the operator's cluster and credentials, not
    # the caller's (a kernelspec's kube_* settings do not reach the service)
    for name in KUBE_FLAGS:
        value = getattr(args, name, None)
        if value:
            settings[name] = value
    return settings


KUBE_FLAGS = {
    "kube_config": "kubeconfig with the service's credentials (keep it root-only; default: "
    "$KUBECONFIG, ~/.kube/config, or the pod's service account in the cluster)",
    "kube_namespace": "namespace of the kernel pods (default: 'default')",
    "kube_context": "context of the kubeconfig (default: its current one)",
    "kube_image_pull_policy": "the pods' imagePullPolicy (IfNotPresent, Never, Always)",
    "kube_owner_pod": "the pod this service runs in (from the downward API): the owner of "
    "every kernel pod, so the cluster deletes them with it",
}


def unit_text() -> str:
    """The shipped systemd unit, naming this interpreter."""
    import sys
    from importlib.resources import files

    text = files("kernel_sandbox.service").joinpath("kernel-sandbox.service").read_text()
    return text.replace("{executable}", sys.executable)


async def cmd_serve(args: argparse.Namespace, backend: DockerBackend) -> int:
    if args.print_unit:
        out.print(unit_text(), markup=False, highlight=False, end="")
        return 0
    from kernel_sandbox.service.kernels import KernelRegistry
    from kernel_sandbox.service.rules import RulesFile
    from kernel_sandbox.service.server import SandboxService

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.geteuid() != 0:
        err.print(
            "note: not running as root: kernels run as this account's uid and folders are "
            "checked against it, but other users' folders cannot be mounted for them"
        )
    try:
        mode = int(args.mode, 8) if args.mode else None
    except ValueError:
        raise UsageError(f"--mode {args.mode}: an octal mode such as 0660") from None
    rules = RulesFile(args.policy)
    rules.current()  # a malformed policy file stops the service before it listens
    try:
        await backend.ping()
    except EngineUnavailable as exc:
        if not args.kube_namespace:
            raise
        # a service that starts only pods (e.g. in the cluster) needs no Docker engine
        err.print(f"note: {exc}; only kernels with backend 'kubernetes' can start")
    for directory in (args.state_dir, args.log_dir):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    registry = KernelRegistry(
        rules,
        service_settings(args),
        os.path.join(args.state_dir, "kernels"),
        DEFAULT_STAGING,
        orphan_timeout=args.orphan_timeout,
        backend=backend,
    )
    service = SandboxService(args.socket, registry, args.group, mode)
    service.install_signal_handlers(stop_kernels=args.stop_kernels_at_exit)
    await asyncio.to_thread(service.start)
    err.print(f"kernel-sandbox service: listening on {args.socket}")
    await asyncio.to_thread(service.serve_forever)
    return 0


def add_serve_command(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the sandbox service (the one process with engine access on a shared host)",
        description="Run the sandbox service: it alone talks to the Docker engine and starts "
        "sandboxes for local users, who ask over a unix socket and are identified by the "
        "kernel (SO_PEERCRED). What each user or group may start, mount and reach is the "
        "operator's policy file. Kernels outlive a restart of the service and are adopted "
        "again. Run it as root (or an account in the docker group), e.g. from the shipped "
        "systemd unit: see docs/service.md.",
    )
    serve.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"unix socket to listen on ({DEFAULT_SOCKET})"
    )
    serve.add_argument(
        "--group", default=None, help="only this group may connect (socket mode 0660)"
    )
    serve.add_argument(
        "--mode", default=None, help="the socket's mode (default 0666, or 0660 with --group)"
    )
    serve.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help="the operator's policy file (default /etc/kernel-sandbox/service.toml if it "
        "exists, else the built-in defaults)",
    )
    serve.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="kernel records, tokens")
    serve.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="audit and egress logs")
    serve.add_argument(
        "--runtime-root", default=DEFAULT_RUNTIME_ROOT, help="the kernels' runtime directories"
    )
    serve.add_argument(
        "--data-credentials",
        default=DEFAULT_CREDENTIALS,
        help="the operator's dataset credentials (JSON, mode 0600), used if it exists",
    )
    serve.add_argument(
        "--orphan-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a kernel outlives its owner process, and the service's own restart",
    )
    serve.add_argument(
        "--stop-kernels-at-exit",
        action="store_true",
        help="end every kernel when the service stops (default: they keep running and a "
        "restarted service adopts them)",
    )
    serve.add_argument(
        "--pool-size",
        type=int,
        default=0,
        metavar="N",
        help="keep N sandboxes started ahead for each kind of kernel users start (a warm pool "
        "shared by all users; kernels without a workspace folder only; default 0: off)",
    )
    for name, text in KUBE_FLAGS.items():
        serve.add_argument(
            "--" + name.replace("_", "-"),
            default=None,
            metavar="NAME" if name != "kube_config" else "FILE",
            help=f"backend kubernetes: {text}",
        )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument(
        "--print-unit",
        action="store_true",
        help="print the systemd unit for this installation and exit",
    )
    serve.set_defaults(func=cmd_serve)

"""Which way a command goes: through the sandbox service, or to the engine directly.

``ps``, ``stop``, ``tokens`` and ``egress`` act through the service when one is in force for
this process (``--service PATH``, else ``KERNEL_SANDBOX_SERVICE``, else the default socket if it
exists: :func:`~kernel_sandbox.service.client.choose_service`), where they see the caller's own
kernels only; ``--direct`` (or ``--service off``) talks to the engine and the local state as a
single user does. ``doctor`` says which mode is in force and why.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from kernel_sandbox.service.client import ENV_VAR, ServiceClient, choose_service

__all__ = ["add_service_flags", "ask", "service_for", "which_mode"]


def which_mode(args: argparse.Namespace, configured: str | None = None) -> tuple[str | None, str]:
    """The service socket this command uses (None: direct) and why.

    ``configured`` is the Jupyter config's ``c.DockerSandboxProvisioner.service`` (``doctor``).
    """
    if getattr(args, "direct", False):
        return None, "--direct: direct engine access"
    flag = getattr(args, "service", None)
    if flag:
        path, why = choose_service(flag)
        return path, (f"--service {flag}" + (": direct engine access" if path is None else ""))
    return choose_service(configured or None)


def service_for(args: argparse.Namespace) -> ServiceClient | None:
    """A client of the service this command goes through, or None (direct mode)."""
    path, _why = which_mode(args)
    return ServiceClient(path, timeout=60.0) if path else None


async def ask(client: ServiceClient, op: str, **fields: Any) -> dict[str, Any]:
    """One request to the service, off the event loop (errors: one line, exit 2)."""
    return await asyncio.to_thread(client.ask, op, **fields)


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    """``--service PATH`` and ``--direct`` (mutually exclusive) on one command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--service",
        default=None,
        metavar="PATH",
        help=f"go through the sandbox service at PATH (default: ${ENV_VAR}, else "
        "/run/kernel-sandbox/service.sock if it exists); through it you see your own "
        "kernels only",
    )
    group.add_argument(
        "--direct",
        action="store_true",
        help="talk to the Docker engine directly even if a sandbox service is configured",
    )

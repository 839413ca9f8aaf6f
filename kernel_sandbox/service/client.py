"""Finding and asking the sandbox service, for the provisioner and the CLI.

Which service (if any) a process uses is decided once, in this order: an explicit setting
(the provisioner's ``service`` trait or kernelspec key, a CLI flag), the environment variable
``KERNEL_SANDBOX_SERVICE``, then the default socket if it exists. ``off`` (or ``none``) in any
of them means: talk to the engine directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kernel_sandbox.service.protocol import call, exchange

__all__ = ["DEFAULT_SOCKET", "ENV_VAR", "ServiceClient", "choose_service"]

DEFAULT_SOCKET = "/run/kernel-sandbox/service.sock"
ENV_VAR = "KERNEL_SANDBOX_SERVICE"
OFF = ("off", "none", "direct")


def choose_service(setting: str | None = None) -> tuple[str | None, str]:
    """The service socket to use (None: direct mode) and why, for logs and ``doctor``."""
    if setting:
        if setting.lower() in OFF:
            return None, f"service is {setting!r} in the configuration: direct engine access"
        return setting, "configured (c.DockerSandboxProvisioner.service or kernelspec)"
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        if from_env.lower() in OFF:
            return None, f"{ENV_VAR}={from_env}: direct engine access"
        return from_env, f"{ENV_VAR} names it"
    if Path(DEFAULT_SOCKET).exists():
        return DEFAULT_SOCKET, f"the default socket {DEFAULT_SOCKET} exists"
    return None, f"no service configured and no {DEFAULT_SOCKET}: direct engine access"


class ServiceClient:
    """Blocking calls to one service socket (the provisioner runs them in a worker thread)."""

    def __init__(self, path: str, timeout: float = 300.0):
        self.path = path
        self.timeout = timeout

    def ask(self, op: str, fds: list[int] | tuple[int, ...] = (), **fields: Any) -> dict[str, Any]:
        return call(self.path, {"op": op, **fields}, fds, self.timeout)

    def ask_fds(
        self, op: str, fds: list[int] | tuple[int, ...] = (), **fields: Any
    ) -> tuple[dict[str, Any], list[int]]:
        """:meth:`ask`, with the descriptors the reply carries (the caller closes them)."""
        return exchange(self.path, {"op": op, **fields}, fds, self.timeout)

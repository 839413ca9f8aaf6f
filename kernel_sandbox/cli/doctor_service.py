"""``kernel-sandbox doctor``'s mode line, and its checks for a user of the sandbox service.

Which mode is in force (direct engine access, or the service) and why comes first. Through
the service the engine, runtimes, images and runtime directory are the service's to check:
what a user can check is that the service answers, who it takes them for and with which
rules, and that they cannot reach the engine themselves (good news on a shared machine).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from kernel_sandbox.cli.doctor import FAIL, OK, WARN, Check, check_provisioner, check_server
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.policy.effective import is_sandboxed, spec_provisioner_config
from kernel_sandbox.service.client import ServiceClient

__all__ = [
    "check_engine_access",
    "check_mode",
    "check_service",
    "check_service_kernelspecs",
    "run_service_checks",
]


def check_mode(path: str | None, why: str) -> Check:
    if path is None:
        return Check("mode", "direct", OK, f"this process talks to the engine itself: {why}")
    return Check("mode", "service", OK, f"through the sandbox service at {path}: {why}")


def check_service(path: str, hello: dict[str, Any] | None, error: str = "") -> Check:
    """Does the service answer, and who does it take us for (``hello``)."""
    if hello is None:
        return Check(
            "service",
            "answers",
            FAIL,
            error or f"the sandbox service at {path} does not answer",
            "ask the operator to start it (`systemctl start kernel-sandbox`, or "
            "`kernel-sandbox serve`); check the path (--service, $KERNEL_SANDBOX_SERVICE); "
            "or use the engine directly (--direct, KERNEL_SANDBOX_SERVICE=off) if you may",
        )
    caller = hello.get("caller") or {}
    rules = hello.get("rules") or {}
    ruled = ", ".join(f"{k} {v}" for k, v in rules.items()) if isinstance(rules, dict) else ""
    return Check(
        "service",
        "answers",
        OK,
        f"service pid {hello.get('pid', '?')} knows you as {caller.get('name', '?')} "
        f"(uid {caller.get('uid', '?')})" + (f"; your rules: {ruled}" if ruled else ""),
    )


def check_engine_access(info: dict[str, Any] | None, error: str, uid: int | None = None) -> Check:
    """In service mode: not reaching the engine is how it should be for a user."""
    uid = os.getuid() if uid is None else uid
    if info is None:
        return Check(
            "engine",
            "no direct access",
            OK,
            f"you cannot reach the Docker engine ({error or 'no answer'}): as it should be, "
            "the sandbox service starts your kernels",
        )
    if uid == 0:
        return Check("engine", "direct access", OK, "root reaches the engine (and the service)")
    return Check(
        "engine",
        "direct access",
        WARN,
        "you can reach the Docker engine directly, which is root on this host; with the "
        "sandbox service in force your account does not need to",
        "on a shared machine, take users out of the docker group (`gpasswd -d USER docker`)",
    )


def engine_socket_error() -> str:
    """Why the engine's unix socket cannot be reached (``/var/run/docker.sock: Permission
    denied``), or "" when it can (or the engine is not on a unix socket)."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return ""
    path = host[len("unix://") :]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    finally:
        probe.close()
    return ""


def check_service_kernelspecs(specs: dict[str, Any] | None = None) -> list[Check]:
    """The sandboxed kernelspecs, as requests to the service: it, not this side, checks them
    against the caller's rules at each start (a dataset asked by name is fine there)."""
    manager = KernelSpecManager()
    found = manager.get_all_specs() if specs is None else specs
    checks = []
    for name, entry in sorted(found.items()):
        spec = manager.get_kernel_spec(name) if not hasattr(entry, "argv") else entry
        if not is_sandboxed(spec):
            continue
        asked = spec_provisioner_config(spec)
        what = ", ".join(f"{k} {v}" for k, v in sorted(asked.items())) or "the defaults"
        checks.append(
            Check("kernelspec", name, OK, f"asks the service for {what} (it decides at start)")
        )
    return checks or [
        Check(
            "kernelspec",
            "(none)",
            FAIL,
            "no sandboxed kernelspec is installed",
            "kernel-sandbox install --user",
        )
    ]


async def _hello(path: str) -> tuple[dict[str, Any] | None, str]:
    try:
        return await asyncio.to_thread(ServiceClient(path, timeout=10.0).ask, "hello"), ""
    except SandboxError as exc:
        return None, str(exc)


async def run_service_checks(backend: DockerBackend, config: Config, path: str) -> list[Check]:
    """The checks that make sense for a user of the sandbox service."""
    checks = [check_provisioner()]
    hello, error = await _hello(path)
    checks.append(check_service(path, hello, error))
    try:
        info: dict[str, Any] | None = await backend.engine_info()
        engine_error = ""
    except SandboxError as exc:
        info, engine_error = None, str(exc)
    checks.append(check_engine_access(info, engine_socket_error() or engine_error))
    checks += check_service_kernelspecs()
    checks += check_server(config)
    return checks

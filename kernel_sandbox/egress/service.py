"""The provisioner's side of egress: one proxy process per allowlist kernel, and what the
container needs to reach it (the bridge command, the proxy variables, the notice extension).

Paths, for a runtime directory ``<root>/<id>/``::

    <id>/egress.json          the proxy's configuration (host only)
    <id>/egress-control       control socket: pending / approve / deny (host only)
    <id>/h/egress             the proxy socket the in-sandbox bridge connects to
    <id>/h/egress-notices     denial notices, read by the kernel's extension
    <id>/h/egress-ca.pem      with egress_secrets: the host's trust store and the kernel's CA

(``h/`` is mounted read-only inside: the kernel can connect, never replace a socket.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kernel_sandbox.egress.config import ProxyConfig
from kernel_sandbox.egress.rules import parse_rule
from kernel_sandbox.errors import KernelStartError
from kernel_sandbox.host.logtext import LogLimits
from kernel_sandbox.inside.contract import (
    EGRESS_BRIDGE_MODULE,
    EGRESS_CA_BUNDLE,
    EGRESS_CONTROL_SOCKET,
    EGRESS_NOTICE_SOCKET,
    EGRESS_SOCKET,
)

__all__ = ["EgressEndpoint", "default_log_path", "proxy_env"]

CONFIG_FILE = "egress.json"
READY_TIMEOUT = 10.0


def default_log_path() -> str:
    """``$XDG_STATE_HOME/kernel-sandbox/egress.jsonl`` (``~/.local/state`` by default)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "kernel-sandbox", "egress.jsonl")


def proxy_env(port: int) -> dict[str, str]:
    """The variables that send urllib, requests, httpx, pip and curl through the bridge."""
    proxy = f"http://127.0.0.1:{port}"
    local = "localhost,127.0.0.1,::1"
    return {
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "http_proxy": proxy,
        "https_proxy": proxy,
        "NO_PROXY": local,
        "no_proxy": local,
    }


def ca_env(bundle: str) -> dict[str, str]:
    """The variables that make Python's ssl, requests, httpx, pip and curl trust ``bundle``."""
    return {
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,
        "PIP_CERT": bundle,
    }


def host_trust_store() -> str:
    """The host's CA bundle (OpenSSL's default file), put before the kernel's CA."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return os.path.realpath(candidate)
    return ""


def is_ipython_kernel(argv: list[str]) -> bool:
    return any(
        arg in ("ipykernel_launcher", "ipykernel") or arg.endswith("ipykernel_launcher.py")
        for arg in argv
    )


class EgressEndpoint:
    """The proxy process of one kernel, started and stopped by the provisioner.

    The process reads its stdin until the provisioner's process ends (the pipe closes), so a
    killed Jupyter Server leaves no proxy behind; a server that re-adopts the kernel starts a
    new one on the same sockets.
    """

    def __init__(
        self,
        runtime_dir: Path,
        shared_dir: Path,  # the runtime directory's host-served part, h/
        kernel_id: str,
        policy: Any,
        log_path: str,
        mount_point: str,
        port: int,
        limits: LogLimits | None = None,
        upstream_ca: str = "",
    ):
        self.runtime_dir, self.shared_dir = Path(runtime_dir), Path(shared_dir)
        self.kernel_id, self.policy = kernel_id, policy
        self.log_path, self.mount_point, self.port = log_path, mount_point, port
        self.limits = limits or LogLimits()
        self.upstream_ca = upstream_ca
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.shared_dir / EGRESS_SOCKET

    @property
    def control_path(self) -> Path:
        return self.runtime_dir / EGRESS_CONTROL_SOCKET

    def config(self) -> ProxyConfig:
        return ProxyConfig(
            kernel_id=self.kernel_id,
            listen=str(self.socket_path),
            notices=str(self.shared_dir / EGRESS_NOTICE_SOCKET),
            control=str(self.control_path),
            log=self.log_path,
            rules=tuple(self.policy.egress),
            hosts=dict(self.policy.egress_hosts),
            mode=self.policy.egress_mode,
            ask_timeout=float(self.policy.egress_ask_timeout),
            log_lines=self.limits.lines,
            log_records=self.limits.records,
            log_interval=self.limits.interval,
            log_max_bytes=self.limits.max_bytes,
            log_backups=self.limits.backups,
            secrets=dict(getattr(self.policy, "egress_secrets", {}) or {}),
            ca_bundle=str(self.shared_dir / EGRESS_CA_BUNDLE),
            trust_base=host_trust_store(),
            upstream_ca=self.upstream_ca,
        )

    @property
    def has_secrets(self) -> bool:
        return bool(getattr(self.policy, "egress_secrets", None))

    def check_secrets(self) -> None:
        """Every secret's host must be allowed by ``egress`` too (a secret opens nothing).

        Raises:
            KernelStartError: a secret for a host the allowlist does not let out.
        """
        rules = [parse_rule(r) for r in self.policy.egress]
        for pattern in getattr(self.policy, "egress_secrets", {}) or {}:
            secret = parse_rule(pattern)
            if not any(rule.covers(secret) for rule in rules):
                raise KernelStartError(
                    f"kernel {self.kernel_id}: egress_secrets names {pattern}, which the egress "
                    f"allowlist does not cover; add it to egress (e.g. --egress '{pattern}')"
                )

    def start(self) -> None:
        """Spawn the proxy (if it is not running); it listens a moment later."""
        if self.process is not None and self.process.poll() is None:
            return
        self.check_secrets()
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_file = self.runtime_dir / CONFIG_FILE
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(dataclasses.asdict(self.config()), handle)
        self.control_path.unlink(missing_ok=True)  # a previous owner's; it marks readiness
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kernel_sandbox.egress.proxy", str(config_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            close_fds=True,
        )

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the proxy listens.

        Raises:
            KernelStartError: the proxy process ended or did not listen in time.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        # the control socket (host-only directory) is put in place last, once all listen
        while not self.control_path.exists():
            if self.process.poll() is not None:
                raise KernelStartError(
                    f"kernel {self.kernel_id}: the egress proxy exited with status "
                    f"{self.process.returncode} (see the lines above in this log)"
                )
            if time.monotonic() > deadline:
                raise KernelStartError(
                    f"kernel {self.kernel_id}: the egress proxy did not listen within "
                    f"{timeout:.0f}s"
                )
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """End the proxy and wait for it (blocking; fine at interpreter exit); already ended
        is fine."""
        process, self.process = self.process, None
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()  # the proxy's lifeline: it ends and removes its sockets
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()

    async def stop(self) -> None:
        """:meth:`close` in a worker thread."""
        await asyncio.to_thread(self.close)

    # -- what the container needs -----------------------------------------------------------

    def container_command(self, cmd: list[str]) -> list[str]:
        """Run ``cmd`` with the loopback bridge started first, inside the sandbox."""
        return [
            "python",
            "-m",
            EGRESS_BRIDGE_MODULE,
            f"127.0.0.1:{self.port}",
            f"{self.mount_point}/{EGRESS_SOCKET}",
            "--",
            *cmd,
        ]

    def kernel_arguments(self, argv: list[str]) -> list[str]:
        """Load the notice extension into IPython kernels (a denial then shows in the cell)."""
        return [f"--ext={EGRESS_BRIDGE_MODULE}"] if is_ipython_kernel(argv) else []

    def container_env(self) -> dict[str, str]:
        env = {
            **proxy_env(self.port),
            "KERNEL_SANDBOX_EGRESS_NOTICES": f"{self.mount_point}/{EGRESS_NOTICE_SOCKET}",
        }
        if self.has_secrets:  # the kernel's CA, for the hosts whose TLS the proxy terminates
            env.update(ca_env(f"{self.mount_point}/{EGRESS_CA_BUNDLE}"))
        return env

"""``network: allowlist`` for a pod kernel: the same per-kernel egress proxy as the Docker path
(:mod:`kernel_sandbox.egress`), run by the owner, reached by the pod over TLS.

A container reaches its proxy through a unix socket in its runtime directory; a pod has no
such directory, only the pod network. So the owner starts the proxy listening on TCP at the
address the pod reaches the owner at (``kube_egress_address``), on ports chosen per kernel,
over TLS with a certificate made for it (the owner keeps its key for a re-adoption).
In the pod, the launcher (:mod:`.launch`) listens on the loopback port the Docker path's
bridge uses (``egress_port``, 3128) and carries each connection over TLS to the proxy,
accepting only the certificate whose SHA-256 the kernel's Secret carries
(``egress-tls-sha256``). Every request must carry ``Proxy-Authorization: Basic kernel:TOKEN``
with a token new for each kernel (without it: 407); the token travels only in the Secret
(``egress-token``), never in the pod spec: the launcher reads it there and sets
``HTTP(S)_PROXY=http://kernel:TOKEN@127.0.0.1:3128`` for the kernel. Denial notices come
over a second port (TLS too, the token first), relayed to a unix socket in the pod where the
image's notice extension reads them, as on the Docker path. The kernel's NetworkPolicy allows
egress to that address and those ports only. With ``egress_secrets`` the kernel's CA bundle
goes into the Secret too. Nothing of the proxy protocol crosses the pod network in clear.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kernel_sandbox.egress.ca import pinned_identity
from kernel_sandbox.egress.config import ProxyConfig
from kernel_sandbox.egress.service import CONFIG_FILE, EgressEndpoint, ca_env, proxy_env
from kernel_sandbox.errors import KernelStartError
from kernel_sandbox.host.logtext import LogLimits
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.inside.contract import EGRESS_CA_BUNDLE, RUNTIME_MOUNT
from kernel_sandbox.kube.launch import Launch, Relay
from kernel_sandbox.kube.podspec import SECRET_MOUNT

__all__ = ["PodEgress", "egress_address", "egress_launch", "owner_rule"]

TOKEN_KEY = "egress-token"  # the Secret's entries
CA_KEY = "egress-ca.pem"
PIN_KEY = "egress-tls-sha256"
NOTICES_PATH = f"{RUNTIME_MOUNT}/egress-notices"
PORTS_FILE = "egress-ports.json"
LOCAL = proxy_env(0)["NO_PROXY"]  # what stays in the pod (as on the Docker path)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def egress_launch(address: str, ports: dict[str, int], ca: bool, port: int = 3128) -> Launch:
    """The proxy variables (``127.0.0.1:port`` in the pod, with the token read from the
    Secret there), the relays over pinned TLS to the proxy and its notices, and with
    ``egress_secrets`` the kernel's CA bundle as the trust store."""
    url = f"http://kernel:{{secret}}@127.0.0.1:{port}"
    token, pin = f"{SECRET_MOUNT}/{TOKEN_KEY}", f"{SECRET_MOUNT}/{PIN_KEY}"
    launch = Launch(
        env={"NO_PROXY": LOCAL, "no_proxy": LOCAL, "KERNEL_SANDBOX_EGRESS_NOTICES": NOTICES_PATH},
        secret_env={name: (url, token) for name in PROXY_VARIABLES},
        relays=[
            Relay(f"127.0.0.1:{port}", address, ports["proxy"], pin=pin),
            Relay(NOTICES_PATH, address, ports["notices"], preamble=token, pin=pin),
        ],
    )
    if ca:
        launch.env.update(ca_env(f"{SECRET_MOUNT}/{CA_KEY}"))
    return launch


def owner_rule(address: str, ports: Iterable[int]) -> dict[str, Any]:
    """The NetworkPolicy egress rule: the owner's services (egress proxy, data broker) at
    their address and ports, nothing else."""
    return {
        "to": [{"ipBlock": {"cidr": f"{address}/32"}}],
        "ports": [{"protocol": "TCP", "port": p} for p in sorted(set(ports))],
    }


def _source_address(target: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((target, 9))
        return str(probe.getsockname()[0])


def egress_address(setting: str, owner_pod_ip: str, service_ip: str) -> str:
    """Where the proxy listens and the pod connects: ``kube_egress_address`` unless 'auto';
    else the owner's pod address (an owner in the cluster), else this host's source address
    toward the kernel's Service (an owner on a node).

    Raises:
        KernelStartError: 'auto' with neither an owner pod nor a Service.
    """
    if setting and setting != "auto":
        return setting
    if owner_pod_ip:
        return owner_pod_ip
    if service_ip:
        return _source_address(service_ip)
    raise KernelStartError(
        "network 'allowlist' on Kubernetes needs the address kernel pods reach this process "
        "at: set c.DockerSandboxProvisioner.kube_egress_address (or kube_owner_pod, or "
        "leave kube_service on)"
    )


class PodEgress:
    """One pod kernel's proxy (kept across restarts: same address, ports and token)."""

    def __init__(
        self,
        private_dir: Path,
        kernel_id: str,
        policy: Any,
        log_path: str,
        limits: LogLimits | None,
        upstream_ca: str,
        port: int = 3128,
    ):
        self.dir = Path(private_dir)
        self.port = port  # the proxy's port on the pod's loopback
        self.token = secrets.token_urlsafe(32)
        self.address = ""
        self.ports: dict[str, int] = {}
        self.fingerprint = ""  # the proxy's certificate (SHA-256), pinned by the pod
        self.pem = b""  # that certificate and its key (kept for a re-adopting owner)
        self.endpoint = _TcpEndpoint(self, kernel_id, policy, log_path, limits, upstream_ca)

    async def start(self, address: str) -> None:
        """Start the proxy at ``address`` (once) and learn its ports.

        Raises:
            KernelStartError: the proxy ended, did not listen, or a secret is refused.
        """
        if self.endpoint.process is not None and self.endpoint.process.poll() is None:
            return
        self._spawn(address)
        await self.endpoint.wait_ready()
        (self.dir / CONFIG_FILE).unlink(missing_ok=True)  # read: the token, the key
        bound = json.loads((self.dir / PORTS_FILE).read_text())
        if bound.pop("sha256") != self.fingerprint:
            raise KernelStartError("the egress proxy presents another certificate")
        self.ports = bound

    def _spawn(self, address: str) -> None:
        self.address = address
        if not self.pem:
            self.pem, self.fingerprint = pinned_identity(address, "egress proxy")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)
        Owner.current().save(self.dir)  # the Docker path's sweep leaves a live owner's dir
        (self.dir / PORTS_FILE).unlink(missing_ok=True)
        self.endpoint.start()

    def state(self) -> dict[str, Any]:
        """What a re-adopting owner needs to serve the same pod (provisioner_info)."""
        return {
            "address": self.address,
            "ports": self.ports,
            "token": self.token,
            "tls": self.pem.decode(),
            "sha256": self.fingerprint,
        }

    def adopt(self, state: dict[str, Any]) -> None:
        """Start the proxy again for an adopted kernel: same address, ports, token and
        certificate (it listens a moment later). Raises OSError if it cannot be spawned."""
        self.token, self.ports = str(state["token"]), dict(state["ports"])
        self.pem, self.fingerprint = str(state["tls"]).encode(), str(state["sha256"])
        self._spawn(str(state["address"]))

    @property
    def has_secrets(self) -> bool:
        return self.endpoint.has_secrets

    def secret_files(self) -> dict[str, bytes]:
        """What the kernel's Secret carries for egress: the token, and with egress_secrets
        the CA bundle (public certificates only)."""
        files = {TOKEN_KEY: self.token.encode(), PIN_KEY: self.fingerprint.encode()}
        if self.has_secrets:
            files[CA_KEY] = (self.dir / EGRESS_CA_BUNDLE).read_bytes()
        return files

    def launch(self) -> Launch:
        return egress_launch(self.address, self.ports, self.has_secrets, self.port)

    async def stop(self) -> None:
        """End the proxy and remove its directory. Never raises."""
        try:
            await self.endpoint.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class _TcpEndpoint(EgressEndpoint):
    """The Docker path's proxy process, configured for TCP with a token."""

    def __init__(
        self,
        owner: PodEgress,
        kernel_id: str,
        policy: Any,
        log_path: str,
        limits: LogLimits | None,
        upstream_ca: str,
    ):
        super().__init__(
            owner.dir, owner.dir, kernel_id, policy, log_path, "", 0, limits, upstream_ca
        )
        self.pod = owner

    def config(self) -> ProxyConfig:
        return dataclasses.replace(
            super().config(),
            listen="",
            notices="",
            tcp=self.pod.address,
            tcp_ports=dict(self.pod.ports),  # a restarted proxy keeps the pod's ports
            tls_pem=self.pod.pem.decode(),
            token=self.pod.token,
            ports_file=str(self.pod.dir / PORTS_FILE),
        )

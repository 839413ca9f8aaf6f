"""``datasets`` for a pod kernel: the owner's data broker (:mod:`kernel_sandbox.broker`), reached
by the pod over TCP.

A container talks to the broker through ``data.sock`` in its runtime directory and presents
the token file next to it. A pod gets the same two paths in its own runtime volume
(``/run/kernel-sandbox``), where ``kernel_sandbox.data`` in the image looks for them: the
token is a link to the kernel's Secret (``data-token``, never in the pod spec) and the socket
a relay (:mod:`.launch`) to a TCP port the broker serves for this kernel alone, at the same
address as the egress proxy. That port speaks **TLS** with a certificate made for this
kernel (its key in the owner's memory and provisioner_info); the relay checks the server's
certificate against the SHA-256 the Secret carries (``data-tls-sha256``), so the token and
the data cross the pod network encrypted, to this owner only. The broker authenticates every
request by the token (live, minted for this kernel, its datasets only), as on the Docker
path; a restart mints a new token (the Secret is new too), a shutdown revokes it.
"""

from __future__ import annotations

import ssl
from typing import Any

from kernel_sandbox.egress.ca import pinned_context, pinned_identity
from kernel_sandbox.inside.contract import DATA_SOCKET, DATA_TOKEN, RUNTIME_MOUNT
from kernel_sandbox.kube.launch import Launch, Relay
from kernel_sandbox.kube.podspec import SECRET_MOUNT

__all__ = ["PodData"]

PIN_KEY = "data-tls-sha256"  # the Secret's entry: the broker certificate's SHA-256 (hex)


class PodData:
    """One pod kernel's datasets: its token and its broker port (kept across restarts)."""

    def __init__(self, broker: Any, kernel_id: str, policy: Any):
        self.broker, self.kernel_id, self.policy = broker, kernel_id, policy
        self.token = ""
        self.port = 0
        self.address = ""
        self.tls: ssl.SSLContext | None = None
        self.fingerprint = ""
        self.pem = b""  # the certificate and its key (kept for a re-adopting owner)

    def grant(self, address: str) -> Any:
        """Mint this start's token (revoking the last) and serve the kernel's port at
        ``address`` (the same port across restarts). Blocking: run it in a worker thread."""
        from kernel_sandbox.broker.tokens import Grant

        scope = {d.name: Grant(d.source, d.access) for d in self.policy.datasets}
        if self.tls is None:
            self.pem, self.fingerprint = pinned_identity(address, "data broker")
            self.tls = pinned_context(self.pem)[0]
        self.token, record, self.port = self.broker.grant_tcp(
            self.kernel_id, scope, self.policy.token_ttl, address, self.port, self.tls
        )
        self.address = address
        return record

    def secret_files(self) -> dict[str, bytes]:
        return {DATA_TOKEN: self.token.encode(), PIN_KEY: self.fingerprint.encode()}

    def launch(self) -> Launch:
        return Launch(
            links={f"{RUNTIME_MOUNT}/{DATA_TOKEN}": f"{SECRET_MOUNT}/{DATA_TOKEN}"},
            relays=[
                Relay(
                    f"{RUNTIME_MOUNT}/{DATA_SOCKET}",
                    self.address,
                    self.port,
                    pin=f"{SECRET_MOUNT}/{PIN_KEY}",
                )
            ],
        )

    def state(self) -> dict[str, Any]:
        """What a re-adopting owner needs to serve the same pod (provisioner_info)."""
        return {"address": self.address, "port": self.port, "tls": self.pem.decode()}

    def adopt(self, state: dict[str, Any]) -> None:
        """Serve an adopted kernel's port again, same certificate, with the token it has (its
        record is in the token database). Blocking."""
        self.address, self.port = str(state["address"]), int(state["port"])
        self.pem = str(state["tls"]).encode()
        self.tls, self.fingerprint = pinned_context(self.pem)
        self.broker.serve_tcp(self.kernel_id, self.address, self.port, self.tls)

    def release(self, restart: bool) -> None:
        """Revoke the token; on the final shutdown also stop serving the port. Blocking."""
        if restart:
            self.broker.revoke(self.kernel_id, "kernel restarted")
        else:
            self.broker.release(self.kernel_id, "kernel shut down")

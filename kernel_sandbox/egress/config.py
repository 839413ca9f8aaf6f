"""What one kernel's egress proxy enforces and where it listens.

The provisioner (:mod:`.service`) writes it as JSON into the kernel's host-only runtime
directory; the proxy process (:mod:`.proxy`) reads it at start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kernel_sandbox.host.logfile import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES
from kernel_sandbox.host.logtext import DEFAULT_INTERVAL, DEFAULT_LINES, DEFAULT_RECORDS

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    """What one kernel's proxy enforces and where it listens (written by the provisioner)."""

    kernel_id: str
    listen: str
    notices: str
    control: str
    log: str
    rules: tuple[str, ...] = ()
    hosts: dict[str, str] = field(default_factory=dict)
    mode: str = "deny"
    ask_timeout: float = 60.0
    # what the kernel may make the proxy log (see kernel_sandbox.host.logtext.LogLimits)
    log_lines: int = DEFAULT_LINES
    log_records: int = DEFAULT_RECORDS
    log_interval: float = DEFAULT_INTERVAL
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_backups: int = DEFAULT_BACKUPS
    # egress_secrets: host pattern -> "SOURCE:HOW" (references only; the proxy reads values)
    secrets: dict[str, str] = field(default_factory=dict)
    ca_bundle: str = ""  # where the kernel's CA bundle goes (its h/ directory)
    trust_base: str = ""  # the host's trust store, put in the bundle before the kernel's CA
    upstream_ca: str = ""  # verify servers against this bundle instead of the host's store
    # a pod kernel (kernel_sandbox.kube.egress): the proxy and its notices on TCP at this
    # address, over TLS with a certificate made at start (ports chosen at bind unless
    # tcp_ports names them, written with the certificate's SHA-256 to ports_file), each
    # client authenticated by token
    tcp: str = ""
    tcp_ports: dict[str, int] = field(default_factory=dict)
    tls_pem: str = ""  # the certificate and key it presents (the owner keeps them: adoption)
    token: str = ""
    ports_file: str = ""

    @classmethod
    def load(cls, path: str) -> ProxyConfig:
        with open(path) as handle:
            values = json.load(handle)
        values["rules"] = tuple(values.get("rules", ()))
        return cls(**values)

"""How the owner reaches a kernel in a pod: ZeroMQ over TCP, CurveZMQ-encrypted, HMAC-signed.

A pod has an address of its own, so the ports are fixed (the NetworkPolicy names them). Each
kernel gets a fresh HMAC key and a fresh CurveZMQ key pair; ipykernel 7 reads the pair from
its connection file and makes every socket a Curve server, and jupyter_client (8.10) makes its
sockets Curve clients of that server key. The connection file reaches the pod only through a
Secret (:mod:`kernel_sandbox.kube.podspec`). Pure functions; the only I/O is key generation.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import zmq

__all__ = [
    "KERNEL_PORTS",
    "client_connection",
    "new_connection",
    "pod_connection_file",
]

# The kernel's five sockets on the pod's own address (a pod shares its ports with nobody).
KERNEL_PORTS = {
    "shell_port": 52001,
    "iopub_port": 52002,
    "stdin_port": 52003,
    "control_port": 52004,
    "hb_port": 52005,
}


def new_connection(kernel_name: str) -> dict[str, Any]:
    """A kernel's connection info with new secrets: the HMAC key (bytes, as jupyter_client
    holds it) and a CurveZMQ key pair (Z85 text). Its ``ip`` is filled in once the pod has one.

    Raises:
        RuntimeError: this pyzmq has no CurveZMQ (libzmq built without libsodium).
    """
    if not zmq.has("curve"):
        raise RuntimeError(
            "kernel-sandbox: this pyzmq cannot encrypt (zmq.has('curve') is False); "
            "install a pyzmq wheel from PyPI, which bundles libzmq with CurveZMQ"
        )
    public, secret = zmq.curve_keypair()
    return {
        "transport": "tcp",
        "ip": "",
        **KERNEL_PORTS,
        "key": secrets.token_hex(32).encode(),
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
        "curve_publickey": public.decode("ascii"),
        "curve_secretkey": secret.decode("ascii"),
    }


def pod_connection_file(info: dict[str, Any]) -> bytes:
    """The connection file the kernel reads in its pod: bound on every pod address."""
    key = info["key"]
    content = {
        **info,
        "ip": "0.0.0.0",
        "key": key.decode() if isinstance(key, bytes) else key,
    }
    return json.dumps(content, sort_keys=True).encode()


def client_connection(info: dict[str, Any], pod_ip: str) -> dict[str, Any]:
    """The owner's connection info: the pod's address, the same secrets."""
    return {**info, "ip": pod_ip}

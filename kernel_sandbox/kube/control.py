"""An interrupt for a kernel in a pod: an ``interrupt_request`` on its control channel.

A pod's kernel cannot be signalled from the owner's machine (that would need ``pods/exec``
rights and a binary in the image); ipykernel answers an ``interrupt_request`` by signalling
itself, as jupyter_client does for kernelspecs whose ``interrupt_mode`` is ``message``. Sent
over CurveZMQ and signed with the kernel's key, like every other message.
"""

from __future__ import annotations

from typing import Any

import zmq
from jupyter_client.session import Session

__all__ = ["send_interrupt"]


def send_interrupt(info: dict[str, Any], timeout: float = 5.0) -> bool:
    """Send an interrupt_request; True when the kernel replied within ``timeout`` seconds."""
    key = info["key"]
    session = Session(
        key=key if isinstance(key, bytes) else key.encode(),
        signature_scheme=info.get("signature_scheme", "hmac-sha256"),
    )
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if info.get("curve_publickey"):
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = str(info["curve_publickey"]).encode("ascii")
        sock.connect(f"tcp://{info['ip']}:{info['control_port']}")
        session.send(sock, "interrupt_request", {})
        if sock.poll(int(timeout * 1000)):
            session.recv(sock)
            return True
        return False
    finally:
        sock.close(0)

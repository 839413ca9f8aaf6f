"""The service's relays for a pod kernel (kernel_sandbox/service/pods.py), against a stand-in
kernel of real ZeroMQ Curve servers on loopback (no cluster): the caller's sockets are its own,
shell traffic is audited, ``input_request`` on stdin finds the caller that sent the shell
request, and a caller's frame over ``max_message`` is not taken (the caller reconnects)."""

from __future__ import annotations

import logging
import os
import stat
import time

import pytest
import zmq

from kernel_sandbox.service.pods import CHANNEL_PORTS, PodRelays

log = logging.getLogger("test")


@pytest.fixture
def kernel():
    """Curve servers on loopback as a kernel's five sockets; yields (sockets, info)."""
    context = zmq.Context()
    public, secret = zmq.curve_keypair()
    types = {
        "shell_port": zmq.ROUTER,
        "iopub_port": zmq.XPUB,
        "stdin_port": zmq.ROUTER,
        "control_port": zmq.ROUTER,
        "hb_port": zmq.ROUTER,
    }
    sockets, info = {}, {"key": b"k" * 32, "curve_publickey": public.decode()}
    for channel, kind in types.items():
        sock = context.socket(kind)
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.linger = 0
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        info[channel] = sock.bind_to_random_port("tcp://127.0.0.1")
        sockets[channel] = sock
    yield sockets, info
    context.destroy(linger=0)


def _recv(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "nothing arrived"
    return sock.recv_multipart()


def test_the_relays_carry_each_channel_to_the_curve_kernel(kernel, tmp_path):
    sockets, info = kernel
    seen = []
    relays = PodRelays(
        str(tmp_path / "p"),
        (os.getuid(), os.getgid()),
        lambda channel, direction, frames: seen.append((channel, direction)),
        "k1",
        log,
        max_message=1024**2,
    )
    relays.start("127.0.0.1", info)
    client = zmq.Context()
    try:
        caller = relays.connection_info(info)
        assert caller["transport"] == "ipc" and "curve_publickey" not in caller
        assert caller["key"] == "k" * 32
        assert stat.S_IMODE(os.stat(relays.directory).st_mode) == 0o711
        for channel in CHANNEL_PORTS:
            path = f"{caller['ip']}-{caller[channel]}"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        def connect(kind: int, channel: str, ident: bytes | None = None) -> zmq.Socket:
            sock = client.socket(kind)
            sock.linger = 0
            if ident is not None:
                sock.setsockopt(zmq.IDENTITY, ident)
            sock.connect(f"ipc://{caller['ip']}-{caller[channel]}")
            return sock

        # shell: a request reaches the kernel (audited), the reply comes back to its sender
        shell = connect(zmq.DEALER, "shell_port", b"session-1")
        stdin = connect(zmq.DEALER, "stdin_port", b"session-1")
        shell.send_multipart([b"<IDS|MSG>", b"request"])
        idents_and_msg = _recv(sockets["shell_port"])
        relay_id, caller_id = idents_and_msg[0], idents_and_msg[1]
        assert caller_id == b"session-1" and idents_and_msg[2:] == [b"<IDS|MSG>", b"request"]
        sockets["shell_port"].send_multipart([relay_id, caller_id, b"<IDS|MSG>", b"reply"])
        assert _recv(shell) == [b"<IDS|MSG>", b"reply"]
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen[:2] == [("shell", b"in"), ("shell", b"out")]
        # stdin: the kernel answers the identities of the shell request (as ipykernel does)
        deadline = time.monotonic() + 5
        while True:  # until the relay's stdin connection is routable
            sockets["stdin_port"].send_multipart([relay_id, caller_id, b"input_request"])
            if stdin.poll(200):
                break
            assert time.monotonic() < deadline, "input_request never reached the caller"
        assert stdin.recv_multipart() == [b"input_request"]
        # heartbeat
        hb = connect(zmq.REQ, "hb_port")
        hb.send(b"ping")
        frames = _recv(sockets["hb_port"])
        sockets["hb_port"].send_multipart(frames)
        assert _recv(hb) == [b"ping"]
        # iopub: the caller's subscription reaches the kernel, which welcomes it
        sub = connect(zmq.SUB, "iopub_port")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        assert _recv(sockets["iopub_port"]) == [b"\x01"]
        sockets["iopub_port"].send_multipart([b"status", b"small"])
        assert _recv(sub) == [b"status", b"small"]
        # a caller's frame over max_message never reaches the kernel (the service does not
        # hold it); the caller's socket reconnects and its next request passes
        shell.send_multipart([b"<IDS|MSG>", b"x" * (2 * 1024**2)])
        shell.send_multipart([b"<IDS|MSG>", b"next"])
        got = _recv(sockets["shell_port"], 10)
        assert got[2:] == [b"<IDS|MSG>", b"next"], [len(f) for f in got]
        assert not sockets["shell_port"].poll(200)
    finally:
        client.destroy(linger=0)
        relays.close()
    assert not relays.directory.exists()

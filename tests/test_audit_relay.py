"""The shell relay alone (unit tier, no engine): a ZeroMQ ROUTER standing in for the kernel's
shell socket, DEALER clients as jupyter_client makes them.

Checked: requests and replies pass unchanged with the clients' routing ids (so each reply
reaches its own client), every message is observed once with its direction, a client that
reconnects with the routing id of one still connected takes it over (as with ipykernel's own
socket), the relay reaches a kernel socket that appears after it started, and close lets the
observer finish what was captured.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kernel_sandbox.host.shell_relay import ShellRelay

LOG = logging.getLogger("test")


class Kernel:
    """A ROUTER that answers each request ``[id..., body]`` with ``[id..., b"re:" + body]``."""

    def __init__(self, path: Path):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.bind(f"ipc://{path}")
        self.peers: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(50):
                frames = self.socket.recv_multipart()
                self.peers.add(frames[0])
                self.socket.send_multipart([*frames[:-1], b"re:" + frames[-1]])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    yield tmp_path / "k-1", tmp_path / "r-1"


def client(context: zmq.Context, path: Path, identity: bytes) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(f"ipc://{path}")
    return sock


def test_requests_and_replies_pass_with_identities_and_are_observed(sockets) -> None:
    kernel_path, relay_path = sockets
    seen: list[tuple[bytes, list[bytes]]] = []
    relay = ShellRelay(
        str(kernel_path), str(relay_path), lambda d, f: seen.append((d, f)), "k", LOG
    )
    relay.start()  # before the kernel's socket exists: the relay reaches it once it appears
    time.sleep(0.05)
    kernel = Kernel(kernel_path)
    context = zmq.Context()
    try:
        ann, bob = client(context, relay_path, b"ann"), client(context, relay_path, b"bob")
        for sock, body in ((ann, b"a1"), (bob, b"b1"), (ann, b"a2")):
            sock.send_multipart([b"<IDS|MSG>", body])
        assert ann.recv_multipart() == [b"<IDS|MSG>", b"re:a1"]
        assert ann.recv_multipart() == [b"<IDS|MSG>", b"re:a2"]
        assert bob.recv_multipart() == [b"<IDS|MSG>", b"re:b1"]
        assert len(kernel.peers) == 1  # the kernel sees the relay, the clients' ids inside
        # a client reusing a connected one's routing id takes it over (ROUTER_HANDOVER)
        again = client(context, relay_path, b"ann")
        time.sleep(0.2)
        again.send_multipart([b"<IDS|MSG>", b"a3"])
        assert again.recv_multipart() == [b"<IDS|MSG>", b"re:a3"]
        for sock in (ann, bob, again):
            sock.close(0)
    finally:
        relay.close()
        kernel.close()
        context.term()
    directions = [(d, f[0], f[-1]) for d, f in seen]
    assert sorted(directions) == sorted(
        [
            (b"in", who, body)
            for who, body in ((b"ann", b"a1"), (b"bob", b"b1"), (b"ann", b"a2"), (b"ann", b"a3"))
        ]
        + [
            (b"out", who, b"re:" + body)
            for who, body in ((b"ann", b"a1"), (b"bob", b"b1"), (b"ann", b"a2"), (b"ann", b"a3"))
        ]
    )
    assert relay.observed == 8
    assert not relay_path.exists()  # close removes its socket


def test_a_failing_observer_does_not_stop_forwarding(sockets, caplog) -> None:
    kernel_path, relay_path = sockets
    kernel = Kernel(kernel_path)

    def broken(direction: bytes, frames: list[bytes]) -> None:
        raise ValueError("observer bug")

    relay = ShellRelay(str(kernel_path), str(relay_path), broken, "k", LOG)
    relay.start()
    context = zmq.Context()
    try:
        sock = client(context, relay_path, b"ann")
        for n in range(3):
            sock.send_multipart([b"<IDS|MSG>", b"%d" % n])
            assert sock.recv_multipart()[-1] == b"re:%d" % n
        sock.close(0)
    finally:
        relay.close()
        kernel.close()
        context.term()
    assert "observer bug" in caplog.text

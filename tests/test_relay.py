"""The IOPub relay's core without an engine: the ZMTP reader against real pyzmq PUB sockets
(kernel_sandbox.host.zmtp) and the relay between a PUB and a jupyter_client-style SUB
(kernel_sandbox.host.relay): limits enforced while reading, notices, order, rate."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from jupyter_client.session import Session

from kernel_sandbox.host.relay import IopubRelay, RelayLimits, TokenBucket, human_size
from kernel_sandbox.host.zmtp import Dropped, Limits, ZmtpSubReader, open_unix_socket

MiB = 1024**2


@pytest.fixture
def sockdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("z", numbered=True))  # short: unix path limit


@pytest.fixture
def pub(sockdir: Path) -> Iterator[tuple[zmq.Socket, str]]:
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    path = str(sockdir / "k-2")
    sock.bind(f"ipc://{path}")
    yield sock, path
    sock.close()


async def subscribed(pub: zmq.Socket, path: str, limits: Limits) -> ZmtpSubReader:
    """A reader that has seen a message (so the PUB has its subscription)."""
    reader = await ZmtpSubReader.connect(path, limits)
    while True:
        pub.send(b"hello")
        try:
            got = await asyncio.wait_for(reader.receive(), 0.05)
        except asyncio.TimeoutError:
            continue
        assert got == [b"hello"]
        await asyncio.sleep(0.05)
        while True:  # drain the extra hellos
            try:
                await asyncio.wait_for(reader.receive(), 0.05)
            except asyncio.TimeoutError:
                return reader


def test_normal_and_multi_frame_messages(pub) -> None:
    sock, path = pub

    async def main() -> list:
        reader = await subscribed(sock, path, Limits(MiB))
        sock.send(b"")
        sock.send_multipart([b"a", b"b" * 300, b"c" * 70000])  # short, long and empty sizes
        sock.send_multipart([b"%d" % i for i in range(200)])
        got = [await reader.receive() for _ in range(3)]
        reader.close()
        return got

    got = asyncio.run(main())
    assert got[0] == [b""]
    assert got[1] == [b"a", b"b" * 300, b"c" * 70000]
    assert got[2] == [b"%d" % i for i in range(200)]


def test_over_limit_frame_is_discarded_without_being_held(pub) -> None:
    sock, path = pub
    session = Session(key=b"k")
    parent = session.msg_header("execute_request")
    big = session.serialize(session.msg("comm_msg", {}, parent=parent), b"comm")
    big.append(b"x" * (100 * MiB))  # one buffer, far over the limit

    async def main() -> tuple:
        reader = await subscribed(sock, path, Limits(MiB))
        sock.send_multipart(big, copy=False)
        sock.send_multipart([b"after"])
        tracemalloc.start()
        dropped = await reader.receive()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        after = await reader.receive()
        reader.close()
        return dropped, peak, after

    dropped, peak, after = asyncio.run(main())
    assert isinstance(dropped, Dropped) and dropped.reason == "size"
    assert dropped.size == sum(map(len, big)) and dropped.frames == len(big)
    assert dropped.parent is not None and dropped.parent["msg_id"] == parent["msg_id"]
    assert peak < 2 * MiB, f"the reader held {peak} bytes of a message it discards"
    assert after == [b"after"]


def test_many_small_frames_are_bounded(pub) -> None:
    sock, path = pub

    async def main() -> tuple:
        reader = await subscribed(sock, path, Limits(MiB, max_frames=1000))
        sock.send_multipart([b"."] * 5000)  # over the frame count
        sock.send_multipart([b""] * 900)
        sock.send_multipart([b"ok"] * 3)
        got = [await reader.receive() for _ in range(3)]
        reader.close()
        return got

    by_count, by_overhead, ok = asyncio.run(main())
    assert isinstance(by_count, Dropped) and by_count.reason == "frames"
    assert by_count.frames == 5000 and by_count.size == 5000
    assert by_overhead == [b""] * 900  # under both limits: passed
    assert ok == [b"ok"] * 3


def test_frame_overhead_counts(pub) -> None:
    sock, path = pub

    async def main() -> object:
        reader = await subscribed(sock, path, Limits(16 * 1024))
        sock.send_multipart([b""] * 900)  # no payload, but 900 frames cost 57,600 bytes
        got = await reader.receive()
        reader.close()
        return got

    got = asyncio.run(main())
    assert isinstance(got, Dropped) and got.reason == "size" and got.frames == 900


def fake_pub(path: str, then: bytes) -> socket.socket:
    """A unix listener that speaks just enough ZMTP as a PUB, then sends ``then`` and closes."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    return server


def serve_truncated(server: socket.socket, then: bytes) -> None:
    conn, _ = server.accept()
    greeting = b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
    ready = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 3) + b"PUB"
    conn.sendall(greeting + bytes([0x04, len(ready)]) + ready + then)
    received = b""
    while not received.endswith(b"\x00\x01\x01"):  # greeting, READY, then the subscription
        received += conn.recv(1024)
    conn.close()


@pytest.mark.parametrize(
    "then",
    [
        b"\x02" + struct.pack(">Q", MiB) + b"x" * 10,  # a frame cut short
        b"\x01\x01a",  # a message cut after a frame that announced more
        b"\x03" + struct.pack(">Q", 10 * MiB) + b"x" * 10,  # cut while being discarded
    ],
)
def test_truncated_peer_is_a_connection_error(sockdir: Path, then: bytes) -> None:
    import threading

    path = str(sockdir / "fake")
    server = fake_pub(path, then)
    thread = threading.Thread(target=serve_truncated, args=(server, then))
    thread.start()

    async def main() -> None:
        reader = await ZmtpSubReader.connect(path, Limits(MiB))
        with pytest.raises(ConnectionError):
            await reader.receive()
        reader.close()

    try:
        asyncio.run(main())
    finally:
        thread.join()
        server.close()


def test_not_a_socket_or_a_link_is_refused(sockdir: Path, pub) -> None:
    _, path = pub
    link = sockdir / "link"
    link.symlink_to(path)
    with pytest.raises(OSError):
        open_unix_socket(str(link))  # a link is never followed
    plain = sockdir / "plain"
    plain.write_text("")
    with pytest.raises(OSError, match="not a socket"):
        open_unix_socket(str(plain))
    with pytest.raises(OSError, match="belongs to uid"):
        open_unix_socket(path, owner=os.getuid() + 1)  # not the kernel's socket
    open_unix_socket(path, owner=os.getuid()).close()


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=100, burst=200, clock=lambda: now[0])
    assert bucket.take(150) == 0
    assert bucket.take(100) == pytest.approx(0.5)  # 50 in debt
    now[0] = 10.0
    assert bucket.take(200) == 0  # refilled to the burst, not beyond
    assert TokenBucket(0, 0).take(10**12) == 0  # no limit
    assert human_size(200 * MiB) == "200 MiB" and human_size(1536) == "1.5 KiB"


# -- the relay between a PUB and a client ---------------------------------------------------------


class Relayed:
    def __init__(self, sockdir: Path, limits: RelayLimits, key: bytes = b"secret"):
        self.session = Session(key=key)
        self.kernel = zmq.Context.instance().socket(zmq.PUB)
        self.kernel.setsockopt(zmq.LINGER, 0)
        self.kernel.bind(f"ipc://{sockdir}/k-2")
        self.relay = IopubRelay(
            f"{sockdir}/k-2",
            f"{sockdir}/c-2",
            key,
            "hmac-sha256",
            limits,
            logging.getLogger("test-relay"),
            "test",
        )
        self.relay.start()
        self.client = zmq.Context.instance().socket(zmq.SUB)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.setsockopt(zmq.SUBSCRIBE, b"")
        self.client.connect(self.relay.client_url)
        deadline = time.monotonic() + 10
        while not self.client.poll(10):  # both subscriptions are through
            assert time.monotonic() < deadline
            self.kernel.send(b"hello")
        time.sleep(0.05)
        while self.client.poll(50):
            self.client.recv_multipart()

    def publish(self, msg_type: str, content: dict, parent: dict, buffers=()) -> None:
        self.session.send(
            self.kernel, msg_type, content, parent=parent, ident=b"x", buffers=list(buffers)
        )

    def receive(self, timeout: float = 5) -> dict:
        assert self.client.poll(int(timeout * 1000)), "nothing arrived"
        frames = self.client.recv_multipart()
        _, frames = self.session.feed_identities(frames)
        return self.session.deserialize(frames)  # checks the signature

    def close(self) -> None:
        self.relay.close()
        self.client.close()
        self.kernel.close()


@pytest.fixture
def relayed(sockdir: Path) -> Iterator[Relayed]:
    pair = Relayed(sockdir, RelayLimits(max_message=4 * MiB, rate=0, hwm=1000))
    yield pair
    pair.close()


def test_relay_passes_messages_unchanged_in_order(relayed: Relayed) -> None:
    parent = relayed.session.msg_header("execute_request")
    relayed.publish("status", {"execution_state": "busy"}, parent)
    for i in range(300):
        relayed.publish("stream", {"name": "stdout", "text": f"{i}\n"}, parent)
    relayed.publish("display_data", {"data": {}, "metadata": {}}, parent, [b"\0" * 1000, b"ab"])
    relayed.publish("status", {"execution_state": "idle"}, parent)
    got = [relayed.receive() for _ in range(303)]
    assert got[0]["content"] == {"execution_state": "busy"}
    assert [m["content"]["text"] for m in got[1:301]] == [f"{i}\n" for i in range(300)]
    assert [bytes(b) for b in got[301]["buffers"]] == [b"\0" * 1000, b"ab"]
    assert got[302]["content"] == {"execution_state": "idle"}
    assert all(m["parent_header"]["msg_id"] == parent["msg_id"] for m in got)


def test_relay_drops_a_large_message_with_a_signed_notice(relayed: Relayed, caplog) -> None:
    caplog.set_level(logging.WARNING)
    parent = relayed.session.msg_header("execute_request")
    for _ in range(5):
        relayed.publish("comm_msg", {"data": {}}, parent, [b"x" * (10 * MiB)])
    relayed.publish("stream", {"name": "stdout", "text": "after\n"}, parent)
    first = relayed.receive()
    assert first["msg_type"] == "stream" and first["content"]["name"] == "stderr"
    assert first["parent_header"]["msg_id"] == parent["msg_id"]
    assert first["content"]["text"] == (
        "kernel-sandbox: an output of 10 MiB was dropped (limit 4 MiB, "
        "c.DockerSandboxProvisioner.iopub_max_message)\n"
    )
    assert relayed.receive()["content"]["text"] == "after\n"
    summary = relayed.receive(timeout=5)  # the other four, in one later notice
    assert summary["content"]["text"] == (
        "kernel-sandbox: 4 outputs of up to 10 MiB (40 MiB in all) were dropped (limit 4 MiB, "
        "c.DockerSandboxProvisioner.iopub_max_message)\n"
    )
    assert relayed.relay.dropped == 5
    warnings = [r for r in caplog.records if "dropped (limit" in r.getMessage()]
    assert len(warnings) == 2


def test_relay_reconnects_to_a_new_kernel_socket(sockdir: Path, relayed: Relayed) -> None:
    relayed.kernel.close()
    os.unlink(f"{sockdir}/k-2")
    deadline = time.monotonic() + 5
    while relayed.relay.attached.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    relayed.kernel = zmq.Context.instance().socket(zmq.PUB)  # a restart's new container
    relayed.kernel.setsockopt(zmq.LINGER, 0)
    relayed.kernel.bind(f"ipc://{sockdir}/k-2")
    parent = relayed.session.msg_header("execute_request")
    while not relayed.client.poll(20):
        relayed.publish("status", {"execution_state": "starting"}, parent)
    assert relayed.receive()["content"] == {"execution_state": "starting"}


def test_relay_rate_holds_back_instead_of_dropping(sockdir: Path) -> None:
    pair = Relayed(sockdir, RelayLimits(max_message=MiB, rate=2 * MiB, hwm=1000))
    try:
        parent = pair.session.msg_header("execute_request")
        started = time.monotonic()
        for _ in range(6):
            pair.publish("comm_msg", {}, parent, [b"y" * (MiB - 4096)])
        got = [pair.receive(timeout=10) for _ in range(6)]
        elapsed = time.monotonic() - started
    finally:
        pair.close()
    assert all(m["msg_type"] == "comm_msg" for m in got)
    assert 1.7 < elapsed < 4.5, elapsed  # 6 MiB, 2 MiB of burst, then 2 MiB/s


def test_provisioner_traits_make_the_relay_limits() -> None:
    from traitlets.config import Config

    from kernel_sandbox.errors import PolicyError
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

    assert DockerSandboxProvisioner().relay_limits == RelayLimits(64 * MiB, 16 * MiB, 1000)
    config = Config()
    config.DockerSandboxProvisioner.iopub_max_message = "1g"
    config.DockerSandboxProvisioner.iopub_rate = 0
    config.DockerSandboxProvisioner.iopub_hwm = 50
    assert DockerSandboxProvisioner(config=config).relay_limits == RelayLimits(1024**3, 0, 50)
    config.DockerSandboxProvisioner.iopub_max_message = "lots"
    with pytest.raises(PolicyError, match=r"c\.DockerSandboxProvisioner\.iopub_max_message"):
        DockerSandboxProvisioner(config=config).relay_limits  # noqa: B018


def test_relay_publishes_host_messages_under_the_last_parent(relayed: Relayed) -> None:
    parent = relayed.session.msg_header("execute_request")
    relayed.publish("status", {"execution_state": "busy"}, parent)
    assert relayed.receive()["content"] == {"execution_state": "busy"}
    relayed.relay.publish("stream", {"name": "stderr", "text": "the kernel ran out of memory\n"})
    got = relayed.receive()  # signed with the kernel's key (deserialize checks)
    assert got["content"]["text"] == "the kernel ran out of memory\n"
    assert got["parent_header"]["msg_id"] == parent["msg_id"]
    relayed.relay.close()
    with pytest.raises(RuntimeError):
        relayed.relay.publish("stream", {})

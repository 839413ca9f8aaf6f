"""The Kubernetes backend's transport, on this machine: a real ipykernel reading the connection
file a pod gets, a real jupyter_client speaking to it over TCP with CurveZMQ, and the bytes on
the wire recorded by a relay in between. No cluster needed (tests/test_kube.py runs pods)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.session import Session

from kernel_sandbox.kube.control import send_interrupt
from kernel_sandbox.kube.transport import client_connection, new_connection, pod_connection_file


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class WireTap:
    """A TCP relay that keeps every byte it passes (both ways)."""

    def __init__(self, target: int):
        self.target = target
        self.seen = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def start_kernel(tmp_path: Path, curve: bool) -> tuple[dict, subprocess.Popen]:
    info = new_connection("python3")
    ports = dict(
        zip(
            ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"),
            free_ports(5),
            strict=True,
        )
    )
    info.update(ports)
    if not curve:
        info.pop("curve_publickey")
        info.pop("curve_secretkey")
    # what the pod reads, but bound on loopback only (this is the test machine, not a pod)
    file_info = json.loads(pod_connection_file(info))
    file_info["ip"] = "127.0.0.1"
    path = tmp_path / f"kernel-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(file_info))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipykernel_launcher", "-f", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not _answers(info["hb_port"]):  # as launch_kernel waits for a pod's kernel
        assert proc.poll() is None and time.monotonic() < deadline, "the kernel did not start"
        time.sleep(0.05)
    return info, proc


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def kernels(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen] = []

    def make(curve: bool = True) -> dict:
        info, proc = start_kernel(tmp_path, curve)
        procs.append(proc)
        return info

    yield make
    for proc in procs:
        proc.kill()
        proc.wait(10)


def client_for(info: dict, **changes) -> BlockingKernelClient:
    client = BlockingKernelClient()
    client.load_connection_info({**client_connection(info, "127.0.0.1"), **changes})
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return client


def run(client: BlockingKernelClient, code: str, timeout: float = 30) -> dict:
    return client.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)


def test_code_and_results_cross_the_wire_encrypted(kernels):
    canary = f"PLAINTEXT-CANARY-{uuid.uuid4().hex}"
    info = kernels(curve=True)
    tap = WireTap(info["shell_port"])
    client = client_for(info, shell_port=tap.port)
    try:
        reply = run(client, f"x = {canary!r}[::-1][::-1]\nx")
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        tap.close()
    assert len(tap.seen) > 200  # the request and its reply went through the tap
    assert canary.encode() not in tap.seen
    assert b"execute_request" not in tap.seen and b"CURVE" in tap.seen


def test_without_curve_the_same_tap_sees_the_code(kernels):
    """The control: the tap can see plaintext, so the test above can fail."""
    canary = f"PLAINTEXT-CANARY-{uuid.uuid4().hex}"
    info = kernels(curve=False)
    tap = WireTap(info["shell_port"])
    client = client_for(info, shell_port=tap.port)
    try:
        run(client, f"x = {canary!r}")
    finally:
        client.stop_channels()
        tap.close()
    assert canary.encode() in tap.seen


def test_a_client_without_the_server_key_gets_nothing(kernels):
    info = kernels(curve=True)
    client_for(info).stop_channels()  # up and answering
    session = Session(key=info["key"])
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://127.0.0.1:{info['shell_port']}")
        session.send(sock, "kernel_info_request", {})
        assert sock.poll(3000) == 0  # a plain ZMTP peer never completes the handshake
    finally:
        sock.close(0)


def test_an_interrupt_request_on_the_control_channel_interrupts_a_cell(kernels):
    info = kernels(curve=True)
    client = client_for(info)
    try:
        msg_id = client.execute("import time\ntime.sleep(60)")
        time.sleep(1.0)
        started = time.monotonic()
        assert send_interrupt(client_connection(info, "127.0.0.1"))
        reply = client.get_shell_msg(timeout=20)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = client.get_shell_msg(timeout=20)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 20
    finally:
        client.stop_channels()

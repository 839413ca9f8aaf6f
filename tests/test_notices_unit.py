"""Unit tests of the notices: which shell lines install, which errors are network failures,
and the host's IOPub takeover with real ZeroMQ sockets (no engine, no kernel)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.error

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from kernel_sandbox.host.monitor import status_of
from kernel_sandbox.host.notices import memory_notice, publish, stopped_notice
from kernel_sandbox.inside.hints import NO_NETWORK, install_command, network_hint


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("pip install pandas", ("python", ["pandas"])),
        ("pip3 install -q 'numpy>=2' scipy[all]", ("python", ["numpy", "scipy"])),
        ("/opt/kernel/bin/python -m pip install --user six", ("python", ["six"])),
        ("python3.11 -m pip --quiet install x", ("python", ["x"])),
        ("cd /tmp && pip install -r req.txt", ("python", [])),
        ("FOO=1 sudo pip install a", ("python", ["a"])),
        ("uv pip install polars", ("python", ["polars"])),
        ("conda install -c conda-forge numpy", ("conda", ["numpy"])),
        ("apt-get install -y curl", ("apt", ["curl"])),
        ("pip list", None),
        ("echo pip install x", None),
        ("python -m venv env", None),
        ("ls -la", None),
    ],
)
def test_install_commands(line, expected):
    assert install_command(line) == expected


def _raised(make):  # type: ignore[no-untyped-def]
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the test wants the exception itself
        return exc
    raise AssertionError("nothing raised")


def test_network_failures_are_recognized_through_wrappers():
    lookup = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    wrapped = urllib.error.URLError(lookup)

    def chained() -> None:
        try:
            raise OSError(101, "Network is unreachable")
        except OSError as exc:
            raise RuntimeError("client failed") from exc

    assert network_hint(lookup, "none") == NO_NETWORK
    assert network_hint(wrapped, "none") == NO_NETWORK
    assert network_hint(_raised(chained), "none") == NO_NETWORK
    assert "egress proxy" in (network_hint(lookup, "allowlist") or "")
    assert network_hint(FileNotFoundError(2, "No such file"), "none") is None
    assert network_hint(lookup, None) is None  # not in a sandbox: say nothing


def test_notice_texts():
    oom = memory_notice(160 * 1024**2)
    assert oom.msg_type == "error" and oom.content["ename"] == "KernelOutOfMemory"
    assert "memory limit (160m)" in oom.text and "memory_limit" in oom.text
    idle = stopped_notice("idle for 5s (the policy's idle_timeout is 5s)")
    assert idle.content["name"] == "stderr" and "idle_timeout is 5s" in idle.text


def _frames(session: Session, msg_type: str, content: dict, parent: dict) -> list[bytes]:
    msg = session.msg(msg_type, content, parent=parent)
    return [b"topic", *session.serialize(msg)]


def test_monitor_parses_the_running_request():
    session = Session(key=b"k")
    request = session.msg_header("execute_request")
    state, parent = status_of(_frames(session, "status", {"execution_state": "busy"}, request))
    assert state == "busy" and parent is not None and parent["msg_id"] == request["msg_id"]
    other = session.msg_header("kernel_info_request")
    assert status_of(_frames(session, "status", {"execution_state": "busy"}, other))[1] is None
    huge = _frames(session, "status", {"execution_state": "busy", "x": "y" * 100_000}, request)
    assert status_of(huge) == (None, None)  # a kernel-sized frame is not parsed


def test_publish_reaches_a_client_of_a_killed_kernel(tmp_path):
    """A subscriber of a SIGKILLed publisher gets the signed notice, with its parent."""
    path = str(tmp_path / "k-2")
    kernel = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, zmq; s = zmq.Context().socket(zmq.PUB); "
            f"s.bind('ipc://{path}'); print('bound', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert kernel.stdout is not None and kernel.stdout.readline() == b"bound\n"
    key = b"secret"

    async def client() -> list[list[bytes]]:
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{path}")
        got: list[list[bytes]] = []

        async def read() -> None:
            while True:
                got.append(await sub.recv_multipart())

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.3)
        kernel.send_signal(signal.SIGKILL)
        kernel.wait()
        notice = memory_notice(2**30)
        started = time.monotonic()
        count = await asyncio.to_thread(
            publish, path, key, "hmac-sha256", notice, {"msg_id": "cell-1"}
        )
        assert count == 1 and time.monotonic() - started < 2
        await asyncio.sleep(0.3)
        reader.cancel()
        sub.close(0)
        ctx.term()
        return got

    (frames,) = asyncio.run(client())
    _, parts = Session(key=key).feed_identities(frames)
    msg = Session(key=key).deserialize(parts)  # the signature checks out
    assert msg["msg_type"] == "error" and msg["parent_header"]["msg_id"] == "cell-1"
    assert "memory limit (1g)" in msg["content"]["evalue"]


def test_publish_without_listeners_sends_nothing(tmp_path):
    started = time.monotonic()
    count = publish(str(tmp_path / "k-2"), b"k", "hmac-sha256", stopped_notice("x"), None, 0.2)
    assert count == 0 and time.monotonic() - started < 1.5

"""A real sandboxed kernel's IOPub through the host-side relay: every kind of message a
notebook sees arrives unchanged and in order, and only through the host-only socket."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from support.kernels import sandbox_kernel

CELL = r"""
import sys
from IPython.display import display
from comm import create_comm
print("out")
print("err", file=sys.stderr)
display({"text/plain": "shown"}, raw=True)
_comm = create_comm(target_name="ks-test", data={"x": 1}, buffers=[b"\0\1" * 1000])
_comm.send({"y": 2}, buffers=[memoryview(b"abc"), b""])
6 * 7
"""


def test_every_message_kind_arrives_in_order_through_the_relay(jupyter_path, leak_check):
    with sandbox_kernel() as (km, kc):
        runtime_dir = km.provisioner.runtime_dir
        client = Path(f"{km.ip}-{km.iopub_port}")
        assert client == runtime_dir.client_socket(km.iopub_port)
        relay_socket = runtime_dir.relay_socket(km.iopub_port)
        assert stat.S_ISSOCK(client.lstat().st_mode)
        assert client.lstat().st_ino == relay_socket.lstat().st_ino  # a hard link
        assert oct(client.parent.stat().st_mode & 0o777) == "0o700"  # host only

        msg_id = kc.execute(CELL)
        seen = []
        while True:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        kinds = [
            (m["msg_type"], m["content"].get("name") or m["content"].get("execution_state"))
            for m in seen
        ]
        assert kinds == [
            ("status", "busy"),
            ("execute_input", None),
            ("stream", "stdout"),
            ("stream", "stderr"),
            ("display_data", None),
            ("comm_open", None),
            ("comm_msg", None),
            ("execute_result", None),
            ("status", "idle"),
        ], kinds
        by_type = {m["msg_type"]: m for m in seen}
        assert by_type["display_data"]["content"]["data"] == {"text/plain": "shown"}
        assert [bytes(b) for b in by_type["comm_open"]["buffers"]] == [b"\0\1" * 1000]
        assert by_type["comm_msg"]["content"]["data"] == {"y": 2}
        assert [bytes(b) for b in by_type["comm_msg"]["buffers"]] == [b"abc", b""]
        assert by_type["execute_result"]["content"]["data"]["text/plain"] == "42"
        # the kernel's own socket is not where clients connect
        assert os.path.realpath(client) != os.path.realpath(
            f"{km.provisioner.runtime_dir.socket_prefix}-{km.iopub_port}"
        )

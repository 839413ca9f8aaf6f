"""A real Jupyter Server on loopback for tests, and a minimal client for its REST and
websocket channels APIs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import websocket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {self.token}"}
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kwargs)

    def channels(self, kernel_id: str) -> websocket.WebSocket:
        ws_url = self.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        return websocket.create_connection(
            ws_url, header=[f"Authorization: token {self.token}"], timeout=120
        )


@contextmanager
def jupyter_server(root_dir: Path, log_path: Path, *extra: str) -> Iterator[Server]:
    """Start `jupyter server` on 127.0.0.1 and stop it whatever happens."""
    port, token = free_port(), uuid.uuid4().hex
    log = open(log_path, "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--allow-root",
            "--no-browser",
            f"--ServerApp.port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root_dir}",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    server = Server(f"http://127.0.0.1:{port}", token, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.api("GET", "/api/status").ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jupyter server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def execute(ws: websocket.WebSocket, code: str, timeout: float = 120) -> dict:
    """Send an execute_request over the channels websocket; collect its outputs and reply."""
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "test",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            }
        )
    )
    result: dict[str, Any] = {
        "stdout": "",
        "stdout_bytes": 0,
        "reply": None,
        "idle": False,
        "data_bytes": 0,
    }
    deadline = time.monotonic() + timeout
    while not (result["reply"] and result["idle"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply to {code[:60]!r} within {timeout}s")
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream" and msg["content"]["name"] == "stdout":
            text = msg["content"]["text"]
            result["stdout_bytes"] += len(text)
            if len(result["stdout"]) < 10_000:
                result["stdout"] += text
        elif kind in ("display_data", "execute_result"):
            result["data_bytes"] += sum(len(str(v)) for v in msg["content"]["data"].values())
        elif kind == "execute_reply":
            result["reply"] = msg["content"]
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            result["idle"] = True
    return result

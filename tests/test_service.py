"""The sandbox service with real accounts: a user with no engine access starts working
sandboxed kernels through it (issue 15)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

# Run as a test account: start a sandboxed kernel with jupyter_client, run CODE, print JSON.
KERNEL_SCRIPT = """
import json, os, sys
import jupyter_client
km = jupyter_client.KernelManager(kernel_name={spec!r})
km.start_kernel(cwd={cwd!r})
try:
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
    out = []
    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("ERROR " + msg["content"]["ename"] + ": " + msg["content"]["evalue"])
    kc.execute_interactive({code!r}, timeout=60, output_hook=hook)
    kc.stop_channels()
    print(json.dumps({{"output": "".join(out), "kernel_id": km.kernel_id}}))
finally:
    km.shutdown_kernel(now=True)
"""


def kernel_script(code: str, cwd: str, spec: str = "python3-sandbox") -> str:
    return KERNEL_SCRIPT.format(code=code, cwd=cwd, spec=spec)


def test_a_user_without_engine_access_runs_a_sandboxed_kernel(sandbox_service, test_users):
    users = test_users
    env = {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}
    denied = users.run_as(
        "kstalice",
        "import socket\ns = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect('/var/run/docker.sock')\n"
        "except PermissionError:\n    print('denied')\n",
        env=env,
    )
    assert denied.stdout.strip() == "denied"
    home = users.add("kstalice").pw_dir
    result = users.run_as(
        "kstalice",
        kernel_script("import os; print(os.getuid(), os.getcwd())", cwd=home + "/work"),
        env=env,
        cwd=home,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])["output"]
    uid, cwd = output.split()
    assert int(uid) >= 2000000  # a uid of its own, not the caller's

"""The sandbox service with real accounts: a user with no engine access starts working
sandboxed kernels through it (issue 15)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support import REPO

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


def test_kernel_sandbox_run_through_the_service_as_a_user(sandbox_service, test_users, tmp_path):
    """The CI path for a tenant: `kernel-sandbox run` with no engine access."""
    home = test_users.add("kstbob").pw_dir
    folder = f"{home}/run-{tmp_path.name[-6:]}"
    test_users.run_as("kstbob", f"import os; os.makedirs({folder!r}, exist_ok=True)")
    account = test_users.add("kstbob")
    copy = shutil.copy(REPO / "notebooks" / "demo.ipynb", folder)
    os.chown(copy, account.pw_uid, account.pw_gid)
    result = test_users.run_as(
        "kstbob",
        "import sys\nfrom kernel_sandbox.cli import main\n"
        f"sys.exit(main(['run', 'demo.ipynb', '--output-dir', {folder + '/out'!r}]))",
        env={"KERNEL_SANDBOX_SERVICE": sandbox_service.socket},
        cwd=folder,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stderr + result.stdout
    executed = json.loads(open(f"{folder}/out/demo.ipynb").read())
    assert any(cell.get("outputs") for cell in executed["cells"])

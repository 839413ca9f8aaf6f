"""A read-write workspace is writable, and what the kernel writes there is the folder owner's.

Jupyter runs as root here (the README's setup): a kernel with the `analyst` profile runs as
the account that owns the notebook's folder, so its files belong to that account on the
host; a folder owned by root is refused at start with what to change, and no container
starts. Real kernels, under runc and runsc.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import uuid
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from test_containment import RUNTIMES

from kernel_sandbox.engine.container import workspace_target
from kernel_sandbox.errors import PolicyError

pytestmark = pytest.mark.integration

OWNER = (4242, 4243)  # the folder's owner: no account on this host, outside uid_range

WRITE = r"""
import json, os
os.makedirs('results/run1', exist_ok=True)
with open('results/run1/out.csv', 'w') as f:
    f.write('a,b\n1,2\n')
with open('/data/out/extra.txt', 'w') as f:
    f.write('x')
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                  "cwd": os.getcwd()}))
"""


@pytest.fixture
def as_root() -> None:
    if os.getuid() != 0:
        pytest.skip("without root the kernel runs as you: nothing to decide")


def owned(path: Path, uid: int, gid: int, mode: int = 0o755) -> Path:
    path.mkdir(parents=True)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_kernel_writes_as_the_workspace_owner(
    jupyter_path, leak_check, kernel_image, tmp_path, as_root, runtime
):
    tmp_path.chmod(0o755)
    project = owned(tmp_path / "project", *OWNER)
    out = owned(tmp_path / "out", *OWNER)
    name = make_kernelspec(
        f"owner-{runtime}-{uuid.uuid4().hex[:6]}",
        {"profile": "analyst", "runtime": runtime, "mounts": [f"{out}:/data/out:rw"]},
    )
    with sandbox_kernel(name, cwd=str(project)) as (_km, kc):
        result = run_cell(kc, WRITE, timeout=60)
    assert result["status"] == "ok", result
    inside = json.loads(result["stdout"].splitlines()[-1])
    assert (inside["uid"], inside["gid"]) == OWNER
    assert inside["cwd"] == workspace_target(str(project))
    for path in (
        project / "results",
        project / "results" / "run1",
        project / "results" / "run1" / "out.csv",
        out / "extra.txt",
    ):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == OWNER, path
    assert (project / "results" / "run1" / "out.csv").read_text() == "a,b\n1,2\n"


@pytest.fixture
def ordinary_account(as_root):
    """An ordinary host account: the first one here, or one made for the test (and removed)."""
    accounts = [a for a in pwd.getpwall() if 1000 <= a.pw_uid < 60000]
    if accounts:
        yield accounts[0]
        return
    name = "ks-owner-test"
    subprocess.run(["useradd", "--no-create-home", "--uid", "4243", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def test_an_accounts_folder_runs_the_kernel_with_the_accounts_group(
    jupyter_path, leak_check, kernel_image, tmp_path, ordinary_account
):
    account = ordinary_account
    tmp_path.chmod(0o755)
    project = owned(tmp_path / "project", account.pw_uid, 0)  # group root: never used
    name = make_kernelspec(f"owner-acct-{uuid.uuid4().hex[:6]}", {"profile": "analyst"})
    with sandbox_kernel(name, cwd=str(project)) as (_km, kc):
        result = run_cell(kc, "import os; open('n.txt','w').write('1'); print(os.getgid())")
    assert result["stdout"].strip() == str(account.pw_gid), result
    info = (project / "n.txt").stat()
    assert (info.st_uid, info.st_gid) == (account.pw_uid, account.pw_gid)


def test_a_root_owned_workspace_is_refused_with_what_to_change(
    jupyter_path, leak_check, kernel_image, tmp_path, as_root
):
    tmp_path.chmod(0o755)
    project = owned(tmp_path / "project", 0, 0, 0o777)  # even writable by all: never as root
    name = make_kernelspec(f"owner-root-{uuid.uuid4().hex[:6]}", {"profile": "analyst"})
    km = KernelManager(kernel_name=name)
    try:
        with pytest.raises(PolicyError) as info:
            km.start_kernel(cwd=str(project))
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    message = str(info.value)
    assert f"the read-write workspace {project} is owned by root" in message
    assert f"chown -R ACCOUNT:GROUP {project}" in message
    assert "workspace 'ro'" in message
    assert not list(project.iterdir())

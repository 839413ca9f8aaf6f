"""Who a kernel runs as (kernel_sandbox.provisioner.identity), for each rule and refusal."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.host.uids import UidRange
from kernel_sandbox.policy import SandboxPolicy
from kernel_sandbox.provisioner.identity import Identity, decide_identity, writable_folders

ROOT = (0, 0)
RANGE = UidRange(2000000, 2065535)


def account(name: str, uid: int, gid: int) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", "/home/" + name, "/bin/sh"))


def folder(tmp_path: Path, name: str, uid: int, gid: int) -> str:
    path = tmp_path / name
    path.mkdir()
    if (path.stat().st_uid, path.stat().st_gid) != (uid, gid):
        if os.getuid() != 0:
            pytest.skip("giving a folder to another uid needs root")
        os.chown(path, uid, gid)
    return str(path)


def rw(**values) -> SandboxPolicy:
    return SandboxPolicy.from_mapping({"workspace": "rw", **values})


def test_a_root_owner_gives_a_read_only_kernel_a_uid_of_its_own(tmp_path):
    workspace = folder(tmp_path, "ws", 0, 0)
    identity = decide_identity(SandboxPolicy(), workspace, RANGE, process=ROOT)
    assert identity.pooled and "uid_range 2000000-2065535" in identity.reason
    with pytest.raises(RuntimeError):
        identity.user  # noqa: B018 - a placeholder never reaches the engine
    assert identity.with_uid(2000007) == Identity(2000007, 2000007, identity.reason)
    assert identity.with_uid(2000007).user == "2000007:2000007"


def test_with_the_range_off_a_root_owner_uses_the_images_user():
    identity = decide_identity(SandboxPolicy(), None, None, process=ROOT)
    assert (identity.uid, identity.gid, identity.pooled) == (1000, 1000, False)


def test_without_root_the_kernel_runs_as_this_process(tmp_path):
    workspace = folder(tmp_path, "ws", 0, 0)  # even a root-owned rw workspace: as before
    identity = decide_identity(rw(), workspace, RANGE, process=(1234, 1235))
    assert (identity.uid, identity.gid) == (1234, 1235) and "own uid" in identity.reason


def test_the_policys_user_wins_and_is_refused_for_another_uid_without_root(tmp_path):
    workspace = folder(tmp_path, "ws", 1500, 1500)
    policy = rw(user="3000:3001")
    assert decide_identity(policy, workspace, RANGE, process=ROOT).user == "3000:3001"
    with pytest.raises(PolicyError, match="user: 3000:3001 differs from your uid 1234"):
        decide_identity(policy, workspace, RANGE, process=(1234, 1234))


def test_a_rw_workspace_makes_the_kernel_its_owner_with_the_accounts_group(tmp_path):
    workspace = folder(tmp_path, "ws", 1500, 0)

    def lookup(uid: int):
        return account("ana", 1500, 1600) if uid == 1500 else None

    identity = decide_identity(rw(), workspace, RANGE, process=ROOT, lookup=lookup)
    assert (identity.uid, identity.gid, identity.pooled) == (1500, 1600, False)
    assert f"the read-write workspace {workspace} (ana, uid 1500)" in identity.reason


@pytest.mark.parametrize(
    "folder_gid, account_gid, expected", [(1700, None, 1700), (0, None, 1500), (0, 0, 1500)]
)
def test_the_group_is_never_root(tmp_path, folder_gid, account_gid, expected):
    workspace = folder(tmp_path, "ws", 1500, folder_gid)

    def lookup(uid: int):
        return None if account_gid is None else account("x", uid, account_gid)

    identity = decide_identity(rw(), workspace, RANGE, process=ROOT, lookup=lookup)
    assert (identity.uid, identity.gid) == (1500, expected)


def test_rw_mounts_count_as_writable_folders(tmp_path):
    data = folder(tmp_path, "data", 1500, 1500)
    policy = SandboxPolicy.from_mapping({"mounts": [f"{data}:/data:rw"]})
    assert writable_folders(policy, "/ignored/ro/workspace") == [(f"the rw mount {data}", data)]
    identity = decide_identity(policy, None, RANGE, process=ROOT, lookup=lambda uid: None)
    assert (identity.uid, identity.gid) == (
        1500,
        1500,
    ) and "uid 1500, no account" in identity.reason
    ro = SandboxPolicy.from_mapping({"mounts": [f"{data}:/data"]})
    assert decide_identity(ro, None, RANGE, process=ROOT).pooled


def test_a_root_owned_rw_workspace_is_refused_with_what_to_change(tmp_path):
    workspace = folder(tmp_path, "ws", 0, 0)
    with pytest.raises(PolicyError) as info:
        decide_identity(rw(), workspace, RANGE, spec="agent", process=ROOT)
    message = str(info.value)
    assert message.startswith(f"kernelspec agent: the read-write workspace {workspace} is owned")
    assert f"chown -R ACCOUNT:GROUP {workspace}" in message
    assert "workspace 'ro'" in message and "never runs as root" in message


def test_folders_of_two_owners_are_refused(tmp_path):
    workspace = folder(tmp_path, "ws", 1500, 1500)
    data = folder(tmp_path, "data", 1501, 1501)
    policy = rw(mounts=[f"{data}:/data:rw"])
    with pytest.raises(PolicyError, match="belong to different accounts .*uid 1500.*uid 1501"):
        decide_identity(policy, workspace, RANGE, process=ROOT)


def test_a_folder_owned_by_a_range_uid_is_refused(tmp_path):
    workspace = folder(tmp_path, "ws", 2000001, 2000001)
    with pytest.raises(PolicyError, match="one of uid_range 2000000-2065535"):
        decide_identity(rw(), workspace, RANGE, process=ROOT)


def test_an_unmounted_workspace_does_not_decide(tmp_path):
    # resolve_workspace refused the folder (None): nothing writable, a uid of its own
    assert decide_identity(rw(), None, RANGE, process=ROOT).pooled

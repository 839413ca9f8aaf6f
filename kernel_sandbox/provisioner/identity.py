"""Who a sandboxed kernel runs as, and why: decided once per kernel, before its first start.

In order:

1. the policy's ``user`` key, when set (the operator chose);
2. without root, this process's own uid and gid: only root can give a runtime directory (and
   the files written in a workspace) to another uid;
3. with a read-write workspace or ``rw`` mounts, the account that owns those folders, so the
   files the kernel writes there are that account's on the host, as if it had written them.
   A folder owned by root is refused: a sandboxed kernel never runs as uid 0, and a kernel
   of another uid could not write it; the error says what to change;
4. otherwise a uid of its own from ``uid_range`` (:mod:`kernel_sandbox.host.uids`), shared
   with no host account and no other sandbox, so per-user kernel limits stay its own;
5. with ``uid_range`` off (``""``), the image's user ``1000:1000``.

Running as a folder's owner shares that account's per-user limits (inotify, message queues,
processes) with its processes on the host and with its other sandboxes; docs/threat-model.md
weighs it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.host.uids import UidRange
from kernel_sandbox.inside.contract import KERNEL_UID
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = ["Identity", "decide_identity", "writable_folders"]


@dataclass(frozen=True)
class Identity:
    """The uid and gid a kernel runs as (``pooled``: a uid still to be claimed from the
    range; ``uid`` and ``gid`` are then placeholders) and the reason, for the log."""

    uid: int
    gid: int
    reason: str
    pooled: bool = False

    @property
    def user(self) -> str:
        """``UID:GID`` for the engine.

        Raises:
            RuntimeError: the uid is still to be claimed (a bug: never start as a placeholder).
        """
        if self.pooled:
            raise RuntimeError("a pooled identity has no uid before its claim")
        return f"{self.uid}:{self.gid}"

    def with_uid(self, uid: int) -> Identity:
        """This identity with a claimed uid (gid = uid)."""
        return Identity(uid, uid, self.reason, pooled=False)


def writable_folders(policy: SandboxPolicy, workspace: str | None) -> list[tuple[str, str]]:
    """(what, host path) of every folder the kernel may write: the rw workspace, rw mounts."""
    found = []
    if workspace and policy.workspace == "rw":
        found.append(("the read-write workspace", workspace))
    found += [(f"the rw mount {m.source}", m.source) for m in policy.mounts if not m.read_only]
    return found


def _account(uid: int) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def _folder_owner(
    folders: list[tuple[str, str]],
    uid_range: UidRange | None,
    spec: str,
    lookup: Callable[[int], pwd.struct_passwd | None],
) -> Identity | None:
    owners: dict[int, list[tuple[str, str, int]]] = {}
    for what, path in folders:
        try:
            info = os.stat(path)
        except OSError:
            continue  # a missing source is refused elsewhere, with its own message
        owners.setdefault(info.st_uid, []).append((what, path, info.st_gid))
    if not owners:
        return None
    if 0 in owners:
        what, path, _ = owners[0][0]
        raise PolicyError(
            f"kernelspec {spec}: {what} {path} is owned by root, and a sandboxed kernel never "
            f"runs as root (nor could another uid write there). Either give the folder to the "
            f"account that should own what the kernel writes: `chown -R ACCOUNT:GROUP {path}` "
            "(the kernel then runs as that account), or use a read-only workspace (profile "
            "'strict', or workspace 'ro') and mounts marked :ro, or set the policy key user "
            "to a UID:GID that may write the folder"
        )
    if len(owners) > 1:
        listed = "; ".join(
            f"{what} {path} is uid {uid}" for uid, held in owners.items() for what, path, _ in held
        )
        raise PolicyError(
            f"kernelspec {spec}: the folders the kernel may write belong to different accounts "
            f"({listed}); a kernel runs as one: give them one owner (chown) or mount all but "
            "one read-only"
        )
    ((uid, held),) = owners.items()
    what, path, folder_gid = held[0]
    if uid_range is not None and uid in uid_range:
        raise PolicyError(
            f"kernelspec {spec}: {what} {path} is owned by uid {uid}, one of uid_range "
            f"{uid_range} (a sandbox's own uid, not an account's); `chown -R ACCOUNT:GROUP "
            f"{path}` to the account that should own it"
        )
    account = lookup(uid)
    gid = next(g for g in (account.pw_gid if account else 0, folder_gid, uid) if g != 0)
    name = f"{account.pw_name}, uid {uid}" if account else f"uid {uid}, no account"
    return Identity(
        uid,
        gid,
        f"the owner of {what} {path} ({name}): what the kernel writes there is that account's",
    )


def decide_identity(
    policy: SandboxPolicy,
    workspace: str | None,
    uid_range: UidRange | None,
    spec: str = "(unnamed)",
    process: tuple[int, int] | None = None,
    lookup: Callable[[int], pwd.struct_passwd | None] = _account,
) -> Identity:
    """Decide who the kernel runs as (module docstring).

    Args:
        workspace: the notebook's folder as it will be mounted (None: not mounted).
        uid_range: the range for sandboxes' own uids (None: off).
        process: this process's uid and gid (default: the real ones).
        lookup: finds the host account of a uid (default: the password database).

    Raises:
        PolicyError: a ``user`` other than one's own without root; a writable folder owned
            by root, by a range uid, or folders of several owners.
    """
    uid_now, gid_now = process or (os.getuid(), os.getgid())
    if policy.user:
        uid, gid = (int(x) for x in policy.user.split(":"))
        if uid_now not in (0, uid):
            raise PolicyError(
                f"user: {uid}:{gid} differs from your uid {uid_now}; without root the "
                "kernel must run as your own uid (leave 'user' unset)"
            )
        return Identity(uid, gid, "the policy's user key")
    if uid_now != 0:
        return Identity(
            uid_now,
            gid_now,
            "this process's own uid (only root may give the runtime directory to another uid)",
        )
    owner = _folder_owner(writable_folders(policy, workspace), uid_range, spec, lookup)
    if owner is not None:
        return owner
    if uid_range is None:
        return Identity(KERNEL_UID, KERNEL_UID, "the image's user (uid_range is off)")
    return Identity(0, 0, f"a uid of its own from uid_range {uid_range}", pooled=True)

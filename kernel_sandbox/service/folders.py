"""Folders a caller asks the service to mount: opened by the caller, checked, staged.

The service runs as root, so it must never mount what the caller could not reach. The caller
does not send a path to trust: its own process opens each folder (``O_RDONLY|O_DIRECTORY``,
so the kernel checks its read and search rights, symbolic links resolved as the caller) and
passes the open descriptor over the socket (``SCM_RIGHTS``). The service then works on that
object, never on a path: it checks the descriptor is a directory opened for reading (not an
``O_PATH`` handle, which needs no read right), takes its resolved path from the kernel for the
operator's rules, checks write rights for ``rw`` from the inode's owner and mode, and
bind-mounts the descriptor itself (``/proc/self/fd/N``) onto a fresh root-only staging
directory that the engine then mounts into the container. Nothing the caller renames or swaps
after opening changes what is mounted: the race is gone by construction.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.host import tmpfs
from kernel_sandbox.policy.mounts import _within, check_mount_source
from kernel_sandbox.service.callers import Caller

__all__ = ["CallerFolder", "NotMountable", "Staging", "receive_folder"]

MS_BIND = 4096
MS_REC = 16384
ACL_XATTR = "system.posix_acl_access"


class NotMountable(PolicyError):
    """A folder no sandbox may see (a host path the mount rules refuse, a home as a whole)."""


@dataclass
class CallerFolder:
    """A folder the caller opened and passed: its descriptor (ours to close) and where it is."""

    fd: int
    path: str  # resolved, absolute, as the kernel names the open directory
    mode: str  # "ro" or "rw"

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    return 0


def writable_by(info: os.stat_result, caller: Caller) -> bool:
    """Whether the mode bits give ``caller`` write and search rights on a directory.

    Decided from owner, group and mode only: a folder with an access control list is writable
    for its owner alone here (the list could refuse what the mode bits seem to allow).
    """
    if info.st_uid == caller.uid:
        return bool(info.st_mode & stat.S_IWUSR and info.st_mode & stat.S_IXUSR)
    if info.st_gid in caller.gids:
        return bool(info.st_mode & stat.S_IWGRP and info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IWOTH and info.st_mode & stat.S_IXOTH)


def _has_acl(fd: int) -> bool:
    try:
        os.getxattr(f"/proc/self/fd/{fd}", ACL_XATTR)
    except OSError:
        return False
    return True


def receive_folder(fd: int, caller: Caller, mode: str, what: str) -> CallerFolder:
    """Check a descriptor the caller sent for ``what`` (the workspace, a mount) in ``mode``.

    Takes ownership of ``fd`` (closed on refusal).

    Raises:
        PolicyError: not a directory the caller opened for reading, gone, a host path no
            sandbox may see, or (``rw``) not writable by the caller.
    """
    try:
        info = os.fstat(fd)
        flags = _flags(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not stat.S_ISDIR(info.st_mode):
            raise PolicyError(f"{what}: the descriptor sent is not a directory")
        if flags & os.O_PATH or flags & os.O_ACCMODE != os.O_RDONLY:
            raise PolicyError(
                f"{what}: send the folder opened with O_RDONLY|O_DIRECTORY (so that your "
                "right to read it is checked), not an O_PATH or writable descriptor"
            )
        if not path.startswith("/") or path.endswith(" (deleted)"):
            raise PolicyError(f"{what}: the folder sent is no longer on the file system")
        try:
            check_mount_source(what, path)
        except PolicyError as exc:
            raise NotMountable(str(exc)) from None
        if _within(caller.home, path) and os.path.isabs(caller.home) and caller.home != "/":
            raise NotMountable(
                f"{what}: refusing to mount {path}: it exposes your home directory as a "
                "whole; use a folder inside it"
            )
        if mode == "rw" and (
            not writable_by(info, caller) or (info.st_uid != caller.uid and _has_acl(fd))
        ):
            raise PolicyError(
                f"{what}: {caller.describe()} cannot write {path}, so the service will not "
                "mount it read-write; use 'ro' or a folder you can write"
            )
    except BaseException:
        os.close(fd)
        raise
    return CallerFolder(fd, path, mode)


@dataclass
class Staging:
    """Root-only directories where the service binds caller folders for the engine to mount.

    One per kernel start under ``root`` (mode 0700, root's); :meth:`release` unmounts them all
    (lazily: a container that has its own copy keeps it) and removes the directories.
    """

    root: str
    paths: list[Path] = field(default_factory=list)

    def bind(self, folder: CallerFolder) -> str:
        """Bind-mount the caller's open folder onto a new staging directory; return its path.

        Raises:
            OSError: the mount was refused.
        """
        base = Path(self.root)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(base, 0o700)
        target = base / secrets.token_hex(8)
        target.mkdir(mode=0o700)
        self.paths.append(target)
        source = f"/proc/self/fd/{folder.fd}".encode()
        if tmpfs._lib().mount(source, os.fsencode(target), None, MS_BIND, None) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"bind {folder.path} on {target}: {os.strerror(code)}")
        return str(target)

    def release(self) -> None:
        """Unmount and remove every staging directory (never raises)."""
        for target in self.paths:
            try:
                tmpfs.unmount(target)
                target.rmdir()
            except OSError:
                pass
        self.paths.clear()

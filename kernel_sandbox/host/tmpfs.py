"""A small tmpfs per kernel for the part of its runtime directory it can write.

Without it a kernel can write into ``/run/kernel-sandbox`` until the host's disk is full (the
sockets it needs take almost no space). Mounting needs CAP_SYS_ADMIN: an owner running as root
(the README's setup) gets a tmpfs of ``runtime_dir_size`` bytes with ``nosuid,nodev,noexec``
and an inode cap; any other owner gets a plain directory (docs/threat-model.md says what bounds
it then). Unmounted lazily (``MNT_DETACH``) before the directory is removed, so a container
that still holds it does not keep the removal from going on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

__all__ = ["MIN_INODES", "can_mount", "inodes_for", "mount", "mounts_under", "unmount"]

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2
MIN_INODES = 1024
BYTES_PER_INODE = 1024  # empty directories and links cost no pages: cap their number too

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def can_mount() -> bool:
    """Whether this process may mount (root; a user namespace is not enough for the engine)."""
    return os.geteuid() == 0


def inodes_for(size: int) -> int:
    return max(MIN_INODES, size // BYTES_PER_INODE)


def mount(target: Path, size: int, owner: tuple[int, int], mode: int = 0o700) -> None:
    """Mount a tmpfs of ``size`` bytes on the directory ``target`` (``mode``, ``owner``).

    Raises:
        OSError: the mount was refused (no privilege, or ``target`` is not a directory).
    """
    uid, gid = owner
    options = f"size={size},nr_inodes={inodes_for(size)},mode={mode:04o},uid={uid},gid={gid}"
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _lib().mount(b"tmpfs", os.fsencode(target), b"tmpfs", flags, options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount tmpfs on {target}: {os.strerror(code)}")


def unmount(target: Path) -> None:
    """Detach the mount at ``target``; not mounted is fine.

    Raises:
        OSError: the unmount was refused.
    """
    if _lib().umount2(os.fsencode(target), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise OSError(code, f"unmount {target}: {os.strerror(code)}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path`` in this process's view, deepest first."""
    prefix = str(path).rstrip("/")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)

"""Put the broker's token file and socket into a kernel's runtime directory, safely.

The shared part of the runtime directory belongs to the kernel's uid, so the kernel may have
planted a symlink at any name there. Everything is prepared in the host-only parent and
renamed into place: a chmod or chown on a path the kernel can write to would follow such a
link (to a host file); rename never follows one.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
from pathlib import Path

__all__ = ["bind_staged", "is_socket", "write_token_file"]


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def staging_path(path: Path) -> Path:
    """A name in the host-only parent of the kernel-writable directory ``path`` lives in.

    Files are prepared there and renamed into place: a chmod or chown on a path the kernel
    can write to would follow a symlink the kernel planted (to a host file); rename never
    follows one.
    """
    return path.parent.parent / f".{path.name}.{secrets.token_hex(4)}"


def bind_staged(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, reachable by the kernel's uid."""
    staging = staging_path(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(staging))
        os.chmod(staging, 0o666)  # the 0700 runtime directory is the real guard
        listener.listen(64)
        os.rename(staging, path)
    except BaseException:
        listener.close()
        staging.unlink(missing_ok=True)
        raise
    return listener


def write_token_file(path: Path, token: str, owner: tuple[int, int] | None) -> None:
    """Put the token at ``path`` atomically: mode 0400, owned by the kernel's uid."""
    staging = staging_path(path)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, (token + "\n").encode())
        if owner is not None and os.getuid() == 0:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    try:
        os.rename(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise

"""The per-kernel runtime directory: the only host path a kernel container shares by default.

``<root>/<id>/`` is private to the host user (mode 0700) and holds host-only state (the
owner record). Its subdirectory ``s/`` is the part the container sees (bind-mounted, owned by
the kernel's uid, 0700): the ipc sockets, the container's connection file and the lifeline.
The root is short because unix socket paths are limited to 107 bytes. The directory survives
restarts (clients keep their sockets) and is removed on the final cleanup.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.inside.contract import CONNECTION_FILE, SHARED_SUBDIR, SOCKET_PREFIX

__all__ = ["CHANNELS", "MAX_SOCKET_PATH", "RuntimeDir", "default_root", "ipc_connection_info"]

CHANNELS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
MAX_SOCKET_PATH = 107


def default_root() -> str:
    """A short, per-user root for runtime directories (``/tmp/kernel-sandbox-<uid>``)."""
    return f"/tmp/kernel-sandbox-{os.getuid()}"


def ipc_connection_info(socket_prefix: str, key: bytes, kernel_name: str) -> dict[str, Any]:
    """Connection info for an ipc-transport kernel; the "ports" are only socket suffixes."""
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": socket_prefix,
        "key": key,
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
    }
    info.update({name: number for number, name in enumerate(CHANNELS, start=1)})
    return info


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PolicyError(
            f"runtime_root: {path} is not a directory owned by you; remove it or configure "
            "c.DockerSandboxProvisioner.runtime_root"
        )
    os.chmod(path, 0o700)


class RuntimeDir:
    """One kernel's private directory on the host, and its view from inside the container."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @classmethod
    def create(cls, root: str, owner: tuple[int, int] | None) -> RuntimeDir:
        """Make a new private directory under ``root``, owned by ``owner`` (uid, gid) if given.

        Raises:
            PolicyError: the socket paths would exceed the unix limit, or the root is unsafe.
        """
        root_path = Path(root)
        _make_private_dir(root_path)
        path = root_path / secrets.token_hex(4)
        longest = len(str(path / SHARED_SUBDIR / f"{SOCKET_PREFIX}-{len(CHANNELS)}"))
        if longest > MAX_SOCKET_PATH:
            raise PolicyError(
                f"runtime_root: socket paths under {root} would be {longest} bytes, over the "
                f"unix limit of {MAX_SOCKET_PATH}; configure a shorter "
                "c.DockerSandboxProvisioner.runtime_root"
            )
        path.mkdir(mode=0o700)
        shared = path / SHARED_SUBDIR
        shared.mkdir(mode=0o700)
        if owner is not None and os.getuid() == 0:
            os.chown(shared, *owner)
        return cls(path)

    @property
    def shared(self) -> Path:
        """The part of the directory that is mounted into the container."""
        return self.path / SHARED_SUBDIR

    @property
    def socket_prefix(self) -> str:
        return str(self.shared / SOCKET_PREFIX)

    def socket_paths(self, info: Mapping[str, Any]) -> list[Path]:
        return [Path(f"{self.socket_prefix}-{info[name]}") for name in CHANNELS]

    def sockets_ready(self, info: Mapping[str, Any]) -> bool:
        """True once the kernel has bound all of its sockets."""
        try:
            return all(stat.S_ISSOCK(p.stat().st_mode) for p in self.socket_paths(info))
        except FileNotFoundError:
            return False

    def clear_sockets(self, info: Mapping[str, Any]) -> None:
        """Remove stale sockets of a previous container (before a restart's new one binds)."""
        for path in self.socket_paths(info):
            path.unlink(missing_ok=True)

    def write_container_connection_file(
        self, info: Mapping[str, Any], mount_point: str, owner: tuple[int, int] | None
    ) -> str:
        """Write the connection file the kernel reads, naming paths as the container sees them.

        Returns the path of that file inside the container.
        """
        inside = dict(info)
        inside["ip"] = f"{mount_point}/{SOCKET_PREFIX}"
        key = inside["key"]
        inside["key"] = key.decode() if isinstance(key, bytes) else key
        # Prepared in the host-only directory, then renamed into the shared one: the kernel
        # can write in ``s/``, and a symlink it planted there must never be followed by us.
        staging = self.path / f".{CONNECTION_FILE}.tmp"
        staging.unlink(missing_ok=True)
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(inside, handle, indent=1)
            if owner is not None and os.getuid() == 0:
                os.fchown(handle.fileno(), *owner)
        os.rename(staging, self.shared / CONNECTION_FILE)
        return f"{mount_point}/{CONNECTION_FILE}"

    def exists(self) -> bool:
        return self.path.is_dir()

    def remove(self) -> None:
        """Remove the directory and everything in it; already gone is fine."""
        shutil.rmtree(self.path, ignore_errors=True)

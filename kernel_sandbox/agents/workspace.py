"""The workspace folder, as the MCP file tools see it: list, read and write, never outside.

The MCP server runs on the host (as the operator), and a kernel with a read-write workspace
can plant anything in that folder: a symbolic link to ``/etc/shadow``, a FIFO that blocks a
reader, a hard link to a file elsewhere. So every path is walked from a handle on the
workspace root, one component at a time, with ``O_NOFOLLOW``: a link anywhere on the way is
refused, not followed; only regular files are read or written, and only with one link.

What the policy's ``workspace`` mode allows decides the rest: ``none`` refuses every tool,
``ro`` refuses writes, ``rw`` allows them (the files written are given to the workspace's
owner, the account the kernel runs as there).

:class:`FileRefused` never leaves the agents package: the server turns it into a tool error.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_ENTRIES", "MAX_READ", "FileRefused", "Workspace"]

MAX_READ = 1024 * 1024  # bytes a read returns at most
MAX_WRITE = 10 * 1024 * 1024  # bytes a write may carry
MAX_ENTRIES = 1000  # entries a listing returns at most

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}


class FileRefused(ValueError):
    """A file tool cannot do what was asked (the message says why, for the agent)."""


@dataclass(frozen=True)
class Workspace:
    """The host folder mounted as the kernels' workspace (``root``, or None when the
    operator gave none) and the policy's mode for it (``none``, ``ro`` or ``rw``)."""

    root: str | None
    mode: str

    def describe(self) -> str:
        if self.root is None:
            return "no workspace folder (the server was started without --workspace)"
        return f"{self.root} ({self.mode})"

    # -- the walk ---------------------------------------------------------------------------

    def _check_readable(self) -> str:
        if self.root is None:
            why = "the server was started without --workspace"
        elif self.mode == "none":
            why = "the policy's workspace mode is 'none'"
        else:
            return self.root
        raise FileRefused(
            f"this session has no workspace: {why}; files can only be made inside the kernel "
            "(its /tmp, lost at restart)"
        )

    def _parts(self, path: str) -> list[str]:
        if not isinstance(path, str) or "\x00" in path:
            raise FileRefused("a path must be text without NUL characters")
        if path.startswith("/"):
            raise FileRefused(
                f"{path!r}: give a path relative to the workspace (e.g. 'data/x.csv'), "
                "not an absolute one"
            )
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise FileRefused(f"{path!r}: '..' is not allowed; paths stay inside the workspace")
        return parts

    def _open_dir(self, parts: list[str], path: str) -> int:
        """A handle on the folder ``parts`` under the root, no link followed on the way."""
        root = self._check_readable()
        try:
            fd = os.open(root, _DIR_FLAGS)
        except OSError as exc:
            raise FileRefused(f"the workspace folder cannot be opened: {exc.strerror}") from exc
        for i, name in enumerate(parts):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                link = exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(name, fd)
                os.close(fd)
                at = "/".join(parts[: i + 1])
                raise FileRefused(_why(path, at, exc, folder=not link)) from exc
            os.close(fd)
            fd = child
        return fd

    # -- the tools --------------------------------------------------------------------------

    def list(self, path: str = ".") -> dict[str, Any]:
        """Entries of the folder ``path``: name, kind (file, dir, link, other), size."""
        fd = self._open_dir(self._parts(path), path)
        try:
            names = sorted(os.listdir(fd))
            entries = []
            for name in names[:MAX_ENTRIES]:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                kind = _KINDS.get(stat.S_IFMT(st.st_mode), "other")
                entry: dict[str, Any] = {"name": name, "kind": kind}
                if kind == "file":
                    entry["size"] = st.st_size
                entries.append(entry)
        finally:
            os.close(fd)
        listing: dict[str, Any] = {"path": path, "entries": entries}
        if len(names) > MAX_ENTRIES:
            listing["truncated"] = f"{len(names) - MAX_ENTRIES} more entries not shown"
        return listing

    def read(self, path: str, max_bytes: int = MAX_READ) -> tuple[bytes, int]:
        """(the first ``max_bytes`` of the regular file ``path``, its size)."""
        parts = self._parts(path)
        if not parts:
            raise FileRefused("give the path of a file, not of the workspace itself")
        fd = self._open_dir(parts[:-1], path)
        try:
            try:
                file = os.open(
                    parts[-1],
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                    dir_fd=fd,
                )
            except OSError as exc:
                raise FileRefused(_why(path, path, exc)) from exc
        finally:
            os.close(fd)
        try:
            size = _regular(file, path)
            data = os.read(file, max(0, min(max_bytes, MAX_READ)))
        finally:
            os.close(file)
        return data, size

    def write(self, path: str, data: bytes) -> int:
        """Create or replace the regular file ``path`` (its folder must exist); bytes written."""
        self._check_readable()
        if self.mode != "rw":
            raise FileRefused(
                "the workspace is read-only under this session's policy (workspace 'ro'); "
                "write files inside the kernel instead (its /tmp, lost at restart)"
            )
        if len(data) > MAX_WRITE:
            raise FileRefused(f"{len(data)} bytes is more than a write may carry ({MAX_WRITE})")
        parts = self._parts(path)
        if not parts:
            raise FileRefused("give the path of a file, not of the workspace itself")
        fd = self._open_dir(parts[:-1], path)
        try:
            owner = os.fstat(fd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                file = os.open(parts[-1], flags, 0o644, dir_fd=fd)
            except OSError as exc:
                raise FileRefused(_why(path, path, exc)) from exc
        finally:
            os.close(fd)
        try:
            _regular(file, path)
            os.ftruncate(file, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(file, view) :]
            if os.getuid() == 0:  # the kernel runs as the folder's owner in an rw workspace
                os.fchown(file, owner.st_uid, owner.st_gid)
        except OSError as exc:
            raise FileRefused(f"{path!r}: cannot write: {exc.strerror}") from exc
        finally:
            os.close(file)
        return len(data)


def _regular(fd: int, path: str) -> int:
    """The size of the open file ``fd``, which must be a regular file with one link."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        raise FileRefused(f"{path!r} is a {kind}, not a regular file")
    if st.st_nlink > 1:
        raise FileRefused(
            f"{path!r} has {st.st_nlink} hard links; such files are not read or written here "
            "(one could be a file outside the workspace)"
        )
    return st.st_size


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _why(path: str, at: str, exc: OSError, folder: bool = False) -> str:
    if exc.errno == errno.ELOOP or (not folder and exc.errno == errno.ENOTDIR):
        return f"{path!r}: {at!r} is a symbolic link; links are not followed here"
    if folder and exc.errno == errno.ENOTDIR:
        return f"{path!r}: {at!r} is not a folder"
    if exc.errno == errno.ENOENT:
        return f"{path!r}: {at!r} does not exist in the workspace"
    return f"{path!r}: {exc.strerror}"

"""Datasets in local directories, served without ever following a link out of them.

A :class:`LocalSource` opens each path component beneath the dataset's root with
``O_NOFOLLOW`` relative to its parent's descriptor, starting from a descriptor of the root
opened once (:mod:`.roots`), so a symlink can neither lead out nor be swapped in between a
check and the open (TOCTOU), not even in place of the root itself: a symlink met on the way
is read and its target walked the same way, never above the root. Writes go to a temporary
file renamed over the target on commit.

All methods block; the broker calls them in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from kernel_sandbox.broker.paths import Entry, Listing, Parts, escape, not_found
from kernel_sandbox.broker.protocol import Refusal

__all__ = ["TEMP_PREFIX", "LocalReader", "LocalSource", "LocalWriter"]

log = logging.getLogger("kernel_sandbox.broker")

MAX_SYMLINK_HOPS = 8
TEMP_PREFIX = ".ks-write-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _entry(name: str, st: os.stat_result) -> Entry:
    kind = (
        "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    )
    return {
        "name": name,
        "type": kind,
        "size": st.st_size if kind == "file" else 0,
        "mtime": st.st_mtime,
    }


class _SymlinkMet(Exception):
    pass


class LocalSource:
    """A directory on the host, served without ever following a link out of it.

    Every walk starts from ``root_fd``, a descriptor of the root opened once (by the broker
    at grant time, see :mod:`.roots`), never from the root's path: replacing the root on the
    host with a link changes nothing here. Without ``root_fd`` the root is opened now.
    """

    def __init__(self, root: str, root_fd: int | None = None):
        self.root = os.path.realpath(root) if root_fd is None else root
        if root_fd is None:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_fd = root_fd
        self.moved = False  # set by the broker: the root's path now names something else

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # -- walking ----------------------------------------------------------------------------

    def _open_root(self) -> int:
        """A fresh descriptor of the root (its own file offset, for concurrent listings)."""
        try:
            return os.open(".", _DIR_FLAGS, dir_fd=self.root_fd)
        except OSError as exc:
            log.error("dataset root %s cannot be opened: %s", self.root, exc)
            raise Refusal("source-error", "the dataset is not available on the host") from None

    def _step(self, dir_fd: int, name: str, flags: int, create_dir: bool = False) -> int:
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
            if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)  # O_PATH|O_NOFOLLOW opens the link itself
                raise _SymlinkMet(name)
            return fd
        except FileNotFoundError:
            if not create_dir:
                raise
            try:
                os.mkdir(name, 0o755, dir_fd=dir_fd)
            except FileExistsError:
                pass
            return os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                try:
                    if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                        raise _SymlinkMet(name) from None
                except FileNotFoundError:
                    pass
            raise

    def _link_parts(self, target: str) -> tuple[bool, Parts]:
        """A link's target as (from the root?, components); refuses an absolute target
        outside the root's path as it was granted."""
        if not target.startswith("/"):
            return False, [p for p in target.split("/") if p not in ("", ".")]
        target = os.path.normpath(target)
        if target != self.root and not target.startswith(self.root.rstrip("/") + "/"):
            raise escape("a symlink points outside")
        rel = os.path.relpath(target, self.root)
        return True, [p for p in rel.split("/") if p not in ("", ".")]

    def _walk(self, parts: Parts, final_flags: int | None, create_dirs: bool) -> int:
        """Open ``parts`` from the root, one component at a time with ``O_NOFOLLOW``; a link
        met on the way is read and its target walked the same way (``..`` never above the
        root), so nothing outside the dataset is ever opened. ``final_flags`` None: every
        component is a directory (created when ``create_dirs``)."""
        stack = [self._open_root()]  # the directories walked so far, the root first
        todo = list(parts)
        hops = 0
        try:
            while todo:
                name = todo.pop(0)
                if name == "..":  # only from a link's target: requests cannot carry it
                    if len(stack) == 1:
                        raise escape("a symlink points outside")
                    os.close(stack.pop())
                    continue
                last = not todo
                flags = final_flags if last and final_flags is not None else _DIR_FLAGS
                try:
                    fd = self._step(stack[-1], name, flags, create_dirs and flags == _DIR_FLAGS)
                except _SymlinkMet:
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise escape("too many symbolic links") from None
                    from_root, link = self._link_parts(os.readlink(name, dir_fd=stack[-1]))
                    if from_root:
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo = link + todo
                    continue
                stack.append(fd)
            result = stack.pop()
            return result
        finally:
            for fd in stack:
                os.close(fd)

    def _open(self, parts: Parts, final_flags: int | None = None, create_dirs: bool = False) -> int:
        """A descriptor for ``parts`` beneath the root (a directory when ``final_flags`` is
        None)."""
        try:
            return self._walk(parts, final_flags, create_dirs)
        except FileNotFoundError:
            raise not_found(parts) from None
        except NotADirectoryError:
            raise Refusal("not-a-directory", f"not a directory: {'/'.join(parts)}") from None
        except PermissionError:
            raise Refusal("denied", "the host does not allow access to this path") from None

    @contextmanager
    def _fd(self, parts: Parts, final_flags: int | None = None) -> Iterator[int]:
        fd = self._open(parts, final_flags)
        try:
            yield fd
        finally:
            os.close(fd)

    # -- operations -------------------------------------------------------------------------

    def stat(self, parts: Parts) -> Entry:
        flags = None if not parts else os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._fd(parts, flags) as fd:
            return _entry(parts[-1] if parts else "", os.fstat(fd))

    def list(self, parts: Parts) -> Listing:
        with self._fd(parts) as fd:
            entries = []
            with os.scandir(fd) as it:
                for item in it:
                    if item.name.startswith(TEMP_PREFIX):
                        continue
                    st = item.stat(follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        try:
                            entries.append({**self.stat([*parts, item.name]), "name": item.name})
                        except Refusal:
                            continue  # a link out of the dataset (or dangling): not shown
                        continue
                    entries.append(_entry(item.name, st))
        return sorted(entries, key=lambda e: e["name"])

    def open_read(self, parts: Parts, offset: int, length: int | None) -> LocalReader:
        if not parts:
            raise Refusal("is-a-directory", "the dataset itself is a directory")
        fd = self._open(parts, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Refusal("is-a-directory", f"is a directory: {'/'.join(parts)}")
            if not stat.S_ISREG(st.st_mode):
                raise Refusal("denied", f"not a regular file: {'/'.join(parts)}")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return LocalReader(fd, st.st_size, offset, length)

    def open_write(self, parts: Parts) -> LocalWriter:
        if not parts:
            raise Refusal("is-a-directory", "the dataset itself is a directory")
        dir_fd = self._open(parts[:-1], None, create_dirs=True)
        try:
            name = parts[-1]
            temp = f"{TEMP_PREFIX}{secrets.token_hex(6)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temp, flags, 0o644, dir_fd=dir_fd)
        except PermissionError:
            os.close(dir_fd)
            raise Refusal("denied", "the host does not allow writing here") from None
        except BaseException:
            os.close(dir_fd)
            raise
        return LocalWriter(dir_fd, fd, temp, name)


class LocalReader:
    def __init__(self, fd: int, size: int, offset: int, length: int | None):
        self.fd, self.size = fd, size
        self.pos = max(0, offset)
        self.end = size if length is None else min(size, self.pos + max(0, length))
        self.file = open(fd, "rb", buffering=0, closefd=False)  # for zero-copy sendfile

    def readinto(self, buffer: bytearray | memoryview) -> int:
        want = min(len(buffer), self.end - self.pos)
        if want <= 0:
            return 0
        n = os.preadv(self.fd, [memoryview(buffer)[:want]], self.pos)
        self.pos += n
        return n

    def close(self) -> None:
        self.file.close()
        os.close(self.fd)


class LocalWriter:
    """Writes to a temporary file next to the target and renames it over the target on
    commit (atomic: a half-written file never appears; a symlink there is replaced, not
    followed)."""

    def __init__(self, dir_fd: int, fd: int, temp: str, name: str):
        self.dir_fd, self.fd, self.temp, self.name = dir_fd, fd, temp, name
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def commit(self) -> int:
        os.close(self.fd)
        self.fd = -1
        try:
            try:
                if stat.S_ISDIR(os.lstat(self.name, dir_fd=self.dir_fd).st_mode):
                    raise Refusal("is-a-directory", f"is a directory: {self.name}")
            except FileNotFoundError:
                pass
            os.rename(self.temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            self.abort()
            raise
        os.close(self.dir_fd)
        self.dir_fd = -1
        return self.size

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            try:
                os.unlink(self.temp, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            os.close(self.dir_fd)
            self.dir_fd = -1

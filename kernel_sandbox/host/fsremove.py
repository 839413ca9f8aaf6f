"""Removing a tree a kernel could write: any depth, links never followed, any file type or mode.

What a kernel leaves in its runtime directory is attacker-made: chains thousands of levels
deep (``shutil.rmtree`` recurses and raises RecursionError), directories of mode 000, FIFOs
and sockets, symbolic links to host files, a directory where the host expects a socket.
:func:`remove_tree` walks it with directory descriptors, without recursion and without a
descriptor per level (it climbs back through ``..`` and checks that each directory is still the
one it left), opens nothing through a link (``O_NOFOLLOW``; a link is unlinked as a link), never
crosses into another file system (a mount point is left and reported), makes a directory it may
not read or change accessible through its own handle (never by path), and never raises: what it
could not remove is counted and described in the returned :class:`Removal`.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

__all__ = ["Removal", "remove_entry", "remove_tree"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH = getattr(os, "O_PATH", 0) | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PASSES = 3  # whole-tree passes when something moved under the walk (a live writer)
MAX_NOTES = 5  # descriptions kept of what could not be removed


@dataclass
class Removal:
    """What :func:`remove_tree` did: entries removed, and what it left (and why)."""

    path: str
    removed: int = 0
    failed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.failed == 0

    def left(self, where: str, why: object) -> None:
        self.failed += 1
        if len(self.notes) < MAX_NOTES:
            self.notes.append(f"{where[:200]}: {str(why)[:200]}")

    def __str__(self) -> str:
        if self.complete:
            return f"{self.path}: removed {self.removed} entries"
        more = self.failed - len(self.notes)
        tail = f" (and {more} more)" if more > 0 else ""
        return (
            f"{self.path}: removed {self.removed} entries, left {self.failed}: "
            + "; ".join(self.notes)
            + tail
        )


def remove_tree(path: str | os.PathLike[str]) -> Removal:
    """Remove ``path`` and everything under it; a missing path is fine. Never raises.

    ``path``'s parent directories are trusted (the host's own); from ``path`` down, nothing is.
    """
    text = os.fspath(path).rstrip("/") or "/"
    result = Removal(text)
    parent, name = os.path.split(text)
    try:
        parent_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return result
    except OSError as exc:
        result.left(text, exc)
        return result
    try:
        _remove_at(parent_fd, name, result, text)
    except Exception as exc:  # noqa: BLE001 - cleanup must never raise into its caller
        result.left(text, f"unexpected {type(exc).__name__}: {exc}")
    finally:
        os.close(parent_fd)
    return result


def remove_entry(dir_fd: int, name: str, result: Removal | None = None) -> Removal:
    """Remove whatever is at ``name`` in the directory ``dir_fd`` (a file, a link, a socket, a
    whole tree); never raises."""
    result = result if result is not None else Removal(name)
    try:
        _remove_at(dir_fd, name, result, name)
    except Exception as exc:  # noqa: BLE001
        result.left(name, f"unexpected {type(exc).__name__}: {exc}")
    return result


def _remove_at(parent_fd: int, name: str, result: Removal, where: str) -> None:
    try:
        info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        _unlink(parent_fd, name, result, where)
        return
    fd = _open_dir(parent_fd, name, result, where)
    if fd is None:
        return
    try:
        if os.fstat(fd).st_dev != os.fstat(parent_fd).st_dev:
            result.left(where, "a mount point (left in place)")
            return
        _empty(fd, result, where)
    finally:
        os.close(fd)
    _rmdir(parent_fd, name, result, where)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


@dataclass
class _Frame:
    name: str  # in the parent directory
    identity: tuple[int, int]
    entries: list[tuple[str, bool]]  # (name, is a directory), consumed from the end


def _empty(top: int, result: Removal, where: str) -> None:
    """Remove everything in the directory ``top`` (kept open by the caller)."""
    device = os.fstat(top).st_dev
    for _ in range(MAX_PASSES):
        fd = os.dup(top)
        stack = [_Frame("", _identity(fd), _listing(fd, result, where))]
        try:
            moved = False
            while stack:
                frame = stack[-1]
                label = f"{where}/…/{frame.name}" if len(stack) > 1 else where
                if not frame.entries:
                    if len(stack) == 1:
                        break
                    stack.pop()
                    up = _climb(fd, stack[-1].identity)
                    os.close(fd)
                    fd = -1
                    if up is None:  # moved under us: start this pass again from the top
                        moved = True
                        break
                    fd = up
                    _rmdir(fd, frame.name, result, label)
                    continue
                name, is_dir = frame.entries.pop()
                if not is_dir:
                    _unlink(fd, name, result, f"{label}/{name}")
                    continue
                child = _descend(fd, name, device, result, f"{label}/{name}")
                if child is None:
                    continue
                stack.append(_Frame(name, _identity(child), _listing(child, result, label)))
                os.close(fd)
                fd = child
        finally:
            if fd >= 0:
                os.close(fd)
        if not moved and not os.listdir(top):
            return
    left = len(os.listdir(top))
    if left:
        result.left(where, f"{left} entries still there after {MAX_PASSES} passes")


def _listing(fd: int, result: Removal, where: str) -> list[tuple[str, bool]]:
    try:
        with os.scandir(fd) as entries:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except PermissionError:
        pass
    try:
        os.fchmod(fd, 0o700)  # our own uid (or root): make it readable, then try once more
        with os.scandir(fd) as entries:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except OSError as exc:
        result.left(where, exc)
        return []


def _descend(fd: int, name: str, device: int, result: Removal, where: str) -> int | None:
    """Open the directory ``name`` for the walk, or finish it here (empty, or not a directory
    any more); None when there is nothing to walk."""
    try:
        os.rmdir(name, dir_fd=fd)  # the common case for leaves: no need to open it
        result.removed += 1
        return None
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        _unlink(fd, name, result, where)  # swapped for a file or a link since the listing
        return None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            _writable(fd)
    child = _open_dir(fd, name, result, where)
    if child is None:
        return None
    if os.fstat(child).st_dev != device:
        os.close(child)
        result.left(where, "a mount point (left in place)")
        return None
    return child


def _open_dir(parent_fd: int, name: str, result: Removal, where: str) -> int | None:
    for attempt in range(2):
        try:
            return os.open(name, _DIR, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except (NotADirectoryError, OSError) as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # a file or link now: unlink it
                _unlink(parent_fd, name, result, where)
                return None
            if exc.errno != errno.EACCES or attempt or not _accessible(parent_fd, name):
                result.left(where, exc)
                return None
    return None


def _accessible(parent_fd: int, name: str) -> bool:
    """Give the directory ``name`` mode 0700, through a handle that cannot be a link's target
    (``O_PATH|O_NOFOLLOW``, then its ``/proc/self/fd`` entry); whether that worked."""
    try:
        handle = os.open(name, _PATH | os.O_DIRECTORY, dir_fd=parent_fd)
    except OSError:
        return False
    try:
        os.chmod(f"/proc/self/fd/{handle}", 0o700)
        return True
    except OSError:
        return False
    finally:
        os.close(handle)


def _writable(fd: int) -> None:
    try:
        os.fchmod(fd, 0o700)
    except OSError:
        pass


def _unlink(fd: int, name: str, result: Removal, where: str) -> None:
    for attempt in range(2):
        try:
            os.unlink(name, dir_fd=fd)
            result.removed += 1
            return
        except FileNotFoundError:
            return
        except IsADirectoryError:  # swapped for a directory since the listing
            _remove_at(fd, name, result, where)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM) or attempt:
                result.left(where, exc)
                return
            _writable(fd)


def _rmdir(fd: int, name: str, result: Removal, where: str) -> None:
    for attempt in range(2):
        try:
            os.rmdir(name, dir_fd=fd)
            result.removed += 1
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM) or attempt:
                result.left(where, exc)
                return
            _writable(fd)


def _climb(fd: int, expected: tuple[int, int]) -> int | None:
    """The parent of ``fd`` if it is still the directory the walk came from, else None."""
    try:
        up = os.open("..", _DIR, dir_fd=fd)
    except OSError:
        return None
    if _identity(up) != expected:
        os.close(up)
        return None
    return up

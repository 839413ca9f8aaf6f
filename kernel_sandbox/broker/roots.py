"""Local dataset roots pinned at grant time: one directory handle per kernel and dataset.

Why: a dataset's root (or a parent of it) may lie in a folder some sandbox can write. If the
broker looked the root up by path on every request, a kernel could rename the dataset folder
and put a symbolic link to any host folder in its place, and the broker (root, in the README
setup) would read and write there. So the root is opened once, when the kernel is granted its
datasets: walked from ``/`` one component at a time with ``O_DIRECTORY|O_NOFOLLOW`` (a link
anywhere on the path is refused, not followed), and its identity (``st_dev``, ``st_ino``) is
recorded in the token's scope. Every request then starts from that handle, never from the
path: after a swap, requests still go to the original directory (the audit entry says
``root: moved``), and once that directory is deleted they are refused (``source-gone``).

A restarted owner that adopts a kernel opens the recorded path again the same way and serves
it only if the identity matches what the grant recorded (``source-moved`` otherwise). Handles
belong to one kernel, are closed when its grant is revoked or released, and are never shared:
each request works on its own fresh descriptor of the directory (``openat(handle, ".")``), so
closing a handle can never hand a request another file's descriptor number.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

from kernel_sandbox.broker.local import LocalSource
from kernel_sandbox.broker.protocol import Refusal
from kernel_sandbox.broker.tokens import Grant
from kernel_sandbox.errors import PolicyError

__all__ = ["PinnedRoot", "RootTable", "is_local", "local_path", "open_no_follow"]

log = logging.getLogger("kernel_sandbox.broker")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def is_local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def local_path(source: str) -> str:
    return source.removeprefix("file://")


def open_no_follow(path: str) -> int:
    """A directory descriptor for absolute ``path``, walked from ``/`` without following any
    link (race-free: each component is opened relative to its parent's descriptor).

    Raises:
        OSError: a component is missing, not a directory or a symbolic link (``ELOOP``, with
            the component named in ``filename``).
    """
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "not an absolute path", path)
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for name in (p for p in path.split("/") if p not in ("", ".")):
            walked += "/" + name
            if name == "..":
                raise OSError(errno.EINVAL, "'..' in a dataset root", walked)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    try:
                        if stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode):
                            raise OSError(errno.ELOOP, "is a symbolic link", walked) from None
                    except FileNotFoundError:
                        pass
                raise OSError(exc.errno, exc.strerror, walked) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@dataclass
class PinnedRoot:
    """A dataset's root directory as opened at grant time."""

    path: str
    fd: int
    ident: tuple[int, int]

    def path_leads_here(self) -> bool:
        """Whether ``path`` (walked without following links) still names this directory."""
        try:
            fd = open_no_follow(self.path)
        except OSError:
            return False
        try:
            return identity(fd) == self.ident
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RootTable:
    """The pinned roots of every kernel this broker serves: ``{kernel_id: {dataset: root}}``.

    Thread-safe: grants come from the provisioner's threads, requests from the broker's
    worker threads.
    """

    def __init__(self) -> None:
        self._roots: dict[str, dict[str, PinnedRoot]] = {}
        self._live: set[str] = set()  # kernels granted or adopted, not since revoked/released
        self._lock = threading.Lock()

    def adopt(self, kernel_id: str) -> None:
        """Serve ``kernel_id`` again (an adoption): its roots are re-opened on first use and
        checked against the identities its token recorded."""
        with self._lock:
            self._live.add(kernel_id)

    def pin(self, kernel_id: str, scope: Mapping[str, Grant]) -> dict[str, Grant]:
        """Open the roots of ``scope``'s local datasets for ``kernel_id`` (replacing its
        earlier ones); return the scope with each root's identity recorded.

        Raises:
            PolicyError: a root cannot be opened without following a link, or is missing.
        """
        opened: dict[str, PinnedRoot] = {}
        pinned: dict[str, Grant] = {}
        try:
            for name, grant in scope.items():
                if not is_local(grant.source):
                    pinned[name] = grant
                    continue
                path = local_path(grant.source)
                try:
                    fd = open_no_follow(path)
                except OSError as exc:
                    raise PolicyError(
                        f"datasets: {name!r}: cannot open {path} without following a link "
                        f"({exc.filename}: {exc.strerror}); name the directory itself, by a "
                        "path no sandbox can write"
                    ) from None
                opened[name] = PinnedRoot(path, fd, identity(fd))
                pinned[name] = replace(grant, root=opened[name].ident)
        except BaseException:
            for root in opened.values():
                root.close()
            raise
        with self._lock:
            old = self._roots.pop(kernel_id, {})
            self._roots[kernel_id] = opened
            self._live.add(kernel_id)
        for root in old.values():
            root.close()
        return pinned

    def release(self, kernel_id: str) -> None:
        """Close the kernel's handles (its grant was revoked or released)."""
        with self._lock:
            roots = self._roots.pop(kernel_id, {})
            self._live.discard(kernel_id)
        for root in roots.values():
            root.close()

    def close(self) -> None:
        with self._lock:
            kernels = list(self._roots)
        for kernel_id in kernels:
            self.release(kernel_id)

    def _root(self, kernel_id: str, name: str, grant: Grant) -> PinnedRoot:
        """The kernel's pinned root of ``name`` (re-opened and checked after an adoption).

        Call with the lock held.
        """
        if kernel_id not in self._live:  # a request that outlived the kernel's release
            raise Refusal("revoked", "token revoked")
        if grant.root is None:
            raise Refusal(
                "source-unpinned",
                f"dataset {name!r} was granted before dataset roots were pinned; restart the "
                "kernel for a new grant",
            )
        roots = self._roots.setdefault(kernel_id, {})
        root = roots.get(name)
        if root is not None and root.ident == tuple(grant.root) and root.fd >= 0:
            return root
        path = local_path(grant.source)
        try:
            fd = open_no_follow(path)
        except OSError as exc:
            log.warning("data broker: kernel %s: dataset %s at %s: %s", kernel_id, name, path, exc)
            raise Refusal(
                "source-moved",
                f"dataset {name!r} is no longer where it was granted on the host (moved or "
                "replaced by a link); restart the kernel",
            ) from None
        if identity(fd) != tuple(grant.root):
            os.close(fd)
            log.warning(
                "data broker: kernel %s: dataset %s: %s is not the directory granted",
                kernel_id,
                name,
                path,
            )
            raise Refusal(
                "source-moved",
                f"dataset {name!r} on the host was replaced since it was granted; restart the "
                "kernel",
            )
        if root is not None:
            root.close()
        roots[name] = PinnedRoot(path, fd, identity(fd))
        return roots[name]

    @contextmanager
    def borrow(self, kernel_id: str, name: str, grant: Grant) -> Iterator[LocalSource]:
        """A LocalSource on a fresh descriptor of the kernel's pinned root, closed after use.

        ``source.moved`` tells whether the root's path now names something else.

        Raises:
            Refusal: source-unpinned, source-moved (an adopted grant whose root changed),
                source-gone (the pinned directory was deleted).
        """
        with self._lock:
            root = self._root(kernel_id, name, grant)
            try:
                fd = os.open(".", _DIR_FLAGS, dir_fd=root.fd)
            except FileNotFoundError:
                fd = -1
        if fd < 0 or os.fstat(fd).st_nlink == 0:
            if fd >= 0:
                os.close(fd)
            raise Refusal(
                "source-gone",
                f"dataset {name!r}: its directory was removed from the host after this kernel "
                "was granted it",
            )
        source = LocalSource(root.path, root_fd=fd)
        try:
            source.moved = not root.path_leads_here()
            yield source
        finally:
            source.close()

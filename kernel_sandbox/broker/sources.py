"""Where datasets come from: local directories (symlink-safe) and fsspec URLs.

Every path a kernel sends is relative to its dataset. :func:`relative_parts` refuses
absolute paths, ``..`` and NUL bytes before anything touches a file system. A
:class:`LocalSource` then opens each component beneath the dataset's root with
``O_NOFOLLOW`` relative to its parent's descriptor, so a symlink can neither lead out nor be
swapped in between a check and the open (TOCTOU): a symlink met on the way is resolved,
allowed only when its target is inside the dataset, and the resolved path is walked again
the same way. A :class:`RemoteSource` serves any fsspec URL with storage options (the
credentials) taken from the host only, by :class:`Credentials`.

All methods block; the broker calls them in worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from kernel_sandbox.broker.protocol import Refusal
from kernel_sandbox.errors import CredentialsError

__all__ = [
    "Credentials",
    "LocalReader",
    "LocalSource",
    "RemoteSource",
    "Source",
    "open_source",
    "relative_parts",
]

log = logging.getLogger("kernel_sandbox.broker")

MAX_SYMLINK_HOPS = 8
TEMP_PREFIX = ".ks-write-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def source_unavailable() -> Refusal:
    """A new refusal each time (a shared instance would pile up tracebacks across threads)."""
    return Refusal("source-error", "the dataset's source is not available on the host")


def escape(why: str) -> Refusal:
    return Refusal("escape", f"path leaves the dataset ({why})")


def relative_parts(path: str) -> list[str]:
    """Split a dataset-relative path; refuse anything that could leave the dataset."""
    if "\x00" in path:
        raise escape("NUL byte in path")
    if path.startswith("/"):
        raise escape("absolute paths are not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise escape("'..' is not allowed")
    return parts


class Reader(Protocol):
    size: int

    def readinto(self, buffer: bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


class Source(Protocol):
    def list(self, parts: list[str]) -> list[dict[str, Any]]: ...

    def stat(self, parts: list[str]) -> dict[str, Any]: ...

    def open_read(self, parts: list[str], offset: int, length: int | None) -> Reader: ...

    def open_write(self, parts: list[str]) -> Writer: ...


def _not_found(parts: list[str]) -> Refusal:
    return Refusal("not-found", f"no such file or directory: {'/'.join(parts) or '.'}")


def _entry(name: str, st: os.stat_result) -> dict[str, Any]:
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
    """A directory on the host, served without ever following a link out of it."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)

    # -- walking ----------------------------------------------------------------------------

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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

    def _walk_once(self, parts: list[str], final_flags: int | None, create_dirs: bool) -> int:
        fd = self._open_root()
        try:
            dirs = parts if final_flags is None else parts[:-1]
            for name in dirs:
                child = self._step(fd, name, _DIR_FLAGS, create_dirs)
                os.close(fd)
                fd = child
            if final_flags is None:
                return fd
            child = self._step(fd, parts[-1], final_flags)
            os.close(fd)
            return child
        except BaseException:
            os.close(fd)
            raise

    def _resolve_inside(self, parts: list[str]) -> list[str]:
        real = os.path.realpath(os.path.join(self.root, *parts))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise escape("a symlink points outside")
        return [p for p in os.path.relpath(real, self.root).split(os.sep) if p not in ("", ".")]

    def _open(
        self, parts: list[str], final_flags: int | None = None, create_dirs: bool = False
    ) -> int:
        """A descriptor for ``parts`` beneath the root (its parent's, when ``final_flags`` is
        None and the caller wants a directory: then all of ``parts`` are directories)."""
        for _ in range(MAX_SYMLINK_HOPS):
            try:
                return self._walk_once(parts, final_flags, create_dirs)
            except _SymlinkMet:
                parts = self._resolve_inside(parts)
            except FileNotFoundError:
                raise _not_found(parts) from None
            except NotADirectoryError:
                raise Refusal("not-a-directory", f"not a directory: {'/'.join(parts)}") from None
            except PermissionError:
                raise Refusal("denied", "the host does not allow access to this path") from None
        raise escape("too many symbolic links")

    @contextmanager
    def _fd(self, parts: list[str], final_flags: int | None = None) -> Iterator[int]:
        fd = self._open(parts, final_flags)
        try:
            yield fd
        finally:
            os.close(fd)

    # -- operations -------------------------------------------------------------------------

    def stat(self, parts: list[str]) -> dict[str, Any]:
        flags = None if not parts else os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._fd(parts, flags) as fd:
            return _entry(parts[-1] if parts else "", os.fstat(fd))

    def list(self, parts: list[str]) -> list[dict[str, Any]]:
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

    def open_read(self, parts: list[str], offset: int, length: int | None) -> Reader:
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

    def open_write(self, parts: list[str]) -> Writer:
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
        return _LocalWriter(dir_fd, fd, temp, name)


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


class _LocalWriter:
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


class Credentials:
    """Storage options (credentials, endpoints) for remote sources, from the host only.

    Looked up by URL prefix, the longest prefix winning, in two places:

    - a JSON file (``path``), mode 0600, mapping URL prefixes to fsspec storage options::

        {"s3://sales-bucket": {"key": "AKIA...", "secret": "...",
                               "client_kwargs": {"endpoint_url": "https://..."}}}

    - the system keyring (if the ``keyring`` package is installed): service
      ``kernel-sandbox``, user name the URL prefix, password the same JSON object.

    With neither, fsspec's own host-side defaults apply (e.g. ``~/.aws/credentials``).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, keyring_service: str = "kernel-sandbox"
    ):
        self.path = Path(path) if path else None
        self.keyring_service = keyring_service

    @staticmethod
    def prefixes(url: str) -> list[str]:
        """``s3://b/x/y`` -> ``["s3://b", "s3://b/x", "s3://b/x/y"]`` (shortest first)."""
        scheme, sep, rest = url.rstrip("/").partition("://")
        parts = rest.split("/")
        return [f"{scheme}{sep}{'/'.join(parts[:i])}" for i in range(1, len(parts) + 1)]

    def _file(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        mode = self.path.stat().st_mode
        if mode & 0o077:
            raise CredentialsError(
                f"credentials file {self.path} is readable by others; `chmod 600 {self.path}`"
            )
        try:
            data = json.loads(self.path.read_text())
        except ValueError as exc:
            raise CredentialsError(
                f"credentials file {self.path} is not valid JSON: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise CredentialsError(f"credentials file {self.path}: expected a JSON object")
        return data

    def _keyring(self, prefix: str) -> dict[str, Any]:
        try:
            import keyring
            import keyring.errors
        except ImportError:
            return {}
        try:
            value = keyring.get_password(self.keyring_service, prefix)
        except keyring.errors.KeyringError:
            return {}
        if not value:
            return {}
        try:
            options = json.loads(value)
        except ValueError:
            raise CredentialsError(
                f"keyring entry {self.keyring_service}/{prefix} is not a JSON object"
            ) from None
        return options if isinstance(options, dict) else {}

    def storage_options(self, url: str) -> dict[str, Any]:
        stored = self._file()
        options: dict[str, Any] = {}
        for prefix in self.prefixes(url):
            options.update(stored.get(prefix) or stored.get(prefix + "/") or {})
            options.update(self._keyring(prefix))
        return options


class RemoteSource:
    """Any fsspec URL (``s3://bucket/prefix``, ``gcs://...``, ``https://...``)."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        try:
            from fsspec.core import url_to_fs
        except ImportError:
            log.error("dataset %s needs fsspec on the host: pip install 'kernel-sandbox[s3]'", url)
            raise source_unavailable() from None
        self.url = url
        self.fs, root = url_to_fs(url, **storage_options)
        self.root = str(root).rstrip("/")

    def _path(self, parts: list[str]) -> str:
        return "/".join([self.root, *parts]) if parts else self.root

    @staticmethod
    def _entry(info: dict[str, Any], name: str) -> dict[str, Any]:
        kind = "directory" if info.get("type") == "directory" else "file"
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return {
            "name": name,
            "type": kind,
            "size": int(info.get("size") or 0),
            "mtime": mtime if isinstance(mtime, (int, float)) else None,
        }

    def list(self, parts: list[str]) -> list[dict[str, Any]]:
        base = self._path(parts)
        infos = self.fs.ls(base, detail=True, refresh=True)
        entries = []
        for info in infos:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if str(info["name"]).rstrip("/") == base.rstrip("/"):
                if info.get("type") != "directory":
                    raise Refusal("not-a-directory", f"not a directory: {'/'.join(parts)}")
                continue
            entries.append(self._entry(info, name))
        return sorted(entries, key=lambda e: e["name"])

    def stat(self, parts: list[str]) -> dict[str, Any]:
        self.fs.invalidate_cache(self._path(parts))
        return self._entry(self.fs.info(self._path(parts)), parts[-1] if parts else "")

    def open_read(self, parts: list[str], offset: int, length: int | None) -> Reader:
        info = self.stat(parts)
        if info["type"] == "directory":
            raise Refusal("is-a-directory", f"is a directory: {'/'.join(parts)}")
        handle = self.fs.open(self._path(parts), "rb", block_size=4 * 1024 * 1024)
        return _RemoteReader(handle, int(info["size"]), offset, length)

    def open_write(self, parts: list[str]) -> Writer:
        if not parts:
            raise Refusal("is-a-directory", "the dataset itself is a directory")
        return _RemoteWriter(self.fs.open(self._path(parts), "wb"))


class _RemoteReader:
    def __init__(self, handle: Any, size: int, offset: int, length: int | None):
        self.handle, self.size = handle, size
        self.pos = max(0, offset)
        self.end = size if length is None else min(size, self.pos + max(0, length))
        handle.seek(self.pos)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        want = min(len(buffer), self.end - self.pos)
        if want <= 0:
            return 0
        data = self.handle.read(want)
        memoryview(buffer)[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.handle.close()


class _RemoteWriter:
    def __init__(self, handle: Any):
        self.handle = handle
        self.size = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.size += len(data)

    def commit(self) -> int:
        self.handle.close()
        return self.size

    def abort(self) -> None:
        try:
            self.handle.discard()
        except Exception:  # noqa: BLE001 - best effort; nothing was committed
            pass


def is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def open_source(source: str, credentials: Credentials) -> Source:
    """The Source for a dataset's ``source`` (a local directory or an fsspec URL)."""
    if not is_remote(source):
        return LocalSource(source.removeprefix("file://"))
    try:
        return RemoteSource(source, credentials.storage_options(source))
    except CredentialsError as exc:
        log.error("dataset source %s: %s", source, exc)
        raise source_unavailable() from None

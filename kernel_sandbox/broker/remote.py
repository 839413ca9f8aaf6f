"""Datasets at any fsspec URL (``s3://bucket/prefix``, ``gcs://...``, ``https://...``).

The storage options (the credentials) come from the host only (:mod:`.credentials`); the
kernel names a dataset, never a URL. All methods block; the broker calls them in worker
threads.
"""

from __future__ import annotations

from typing import Any

from kernel_sandbox.broker.paths import Entry, Listing, Parts
from kernel_sandbox.broker.protocol import Refusal

__all__ = ["RemoteReader", "RemoteSource", "RemoteWriter", "source_unavailable"]


def source_unavailable(detail: str | None = None) -> Refusal:
    """A new refusal each time (a shared instance would pile up tracebacks across threads);
    ``detail`` goes to the owner's log, through the kernel's log budget."""
    return Refusal("source-error", "the dataset's source is not available on the host", detail)


class RemoteSource:
    """Any fsspec URL (``s3://bucket/prefix``, ``gcs://...``, ``https://...``)."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        try:
            from fsspec.core import url_to_fs
        except ImportError:
            raise source_unavailable(
                f"dataset {url} needs fsspec on the host: pip install 'kernel-sandbox[s3]'"
            ) from None
        self.url = url
        self.fs, root = url_to_fs(url, **storage_options)
        self.root = str(root).rstrip("/")

    def _path(self, parts: Parts) -> str:
        return "/".join([self.root, *parts]) if parts else self.root

    @staticmethod
    def _entry(info: dict[str, Any], name: str) -> Entry:
        kind = "directory" if info.get("type") == "directory" else "file"
        # fsspec's info dicts are untyped: a number, a datetime, or nothing
        mtime: Any = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return {
            "name": name,
            "type": kind,
            "size": int(info.get("size") or 0),
            "mtime": mtime if isinstance(mtime, (int, float)) else None,
        }

    def list(self, parts: Parts) -> Listing:
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

    def stat(self, parts: Parts) -> Entry:
        self.fs.invalidate_cache(self._path(parts))
        return self._entry(self.fs.info(self._path(parts)), parts[-1] if parts else "")

    def open_read(self, parts: Parts, offset: int, length: int | None) -> RemoteReader:
        info = self.stat(parts)
        if info["type"] == "directory":
            raise Refusal("is-a-directory", f"is a directory: {'/'.join(parts)}")
        handle = self.fs.open(self._path(parts), "rb", block_size=4 * 1024 * 1024)
        return RemoteReader(handle, int(info["size"]), offset, length)

    def open_write(self, parts: Parts) -> RemoteWriter:
        if not parts:
            raise Refusal("is-a-directory", "the dataset itself is a directory")
        return RemoteWriter(self.fs.open(self._path(parts), "wb"))


class RemoteReader:
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


class RemoteWriter:
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

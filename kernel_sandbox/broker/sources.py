"""Where datasets come from: local directories (symlink-safe) and fsspec URLs.

What a source is (:class:`Source`, with its :class:`Reader` and :class:`Writer`), which one a
dataset's ``source`` string names (:func:`open_source`), and a cache of opened sources
(:class:`SourceCache`). The sources themselves: :mod:`.local` (a directory on the host,
walked with ``O_NOFOLLOW``), :mod:`.remote` (fsspec), with :mod:`.credentials` for the
remote ones and :mod:`.paths` for the path checks every request passes first.

All source methods block; the broker calls them in worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from kernel_sandbox.broker.credentials import Credentials
from kernel_sandbox.broker.local import LocalReader, LocalSource, LocalWriter
from kernel_sandbox.broker.paths import Entry, Listing, Parts, escape, relative_parts
from kernel_sandbox.broker.remote import RemoteSource, source_unavailable
from kernel_sandbox.broker.roots import RootTable
from kernel_sandbox.broker.tokens import Grant
from kernel_sandbox.errors import CredentialsError

__all__ = [
    "Credentials",
    "CredentialsError",
    "LocalReader",
    "LocalSource",
    "LocalWriter",
    "Reader",
    "RemoteSource",
    "Source",
    "SourceCache",
    "Writer",
    "escape",
    "is_remote",
    "open_source",
    "relative_parts",
    "source_unavailable",
]


REMOTE_SOURCE_TTL = 300.0


class Reader(Protocol):
    size: int

    def readinto(self, buffer: bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


class Source(Protocol):
    def list(self, parts: Parts) -> Listing: ...

    def stat(self, parts: Parts) -> Entry: ...

    def open_read(self, parts: Parts, offset: int, length: int | None) -> Reader: ...

    def open_write(self, parts: Parts) -> Writer: ...


def is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def open_source(source: str, credentials: Credentials) -> Source:
    """The Source for a dataset's ``source`` (a local directory or an fsspec URL)."""
    if not is_remote(source):
        return LocalSource(source.removeprefix("file://"))
    try:
        return RemoteSource(source, credentials.storage_options(source))
    except CredentialsError as exc:
        raise source_unavailable(f"dataset source {source}: {exc}") from None


class SourceCache:
    """The sources requests are served from: a local dataset through its kernel's root
    pinned at grant time (:class:`~.roots.RootTable`, never by path), a remote one opened
    by its ``source`` string and kept ``remote_ttl`` seconds (so changed credentials are
    picked up). Thread-safe."""

    def __init__(self, credentials: Credentials, remote_ttl: float = REMOTE_SOURCE_TTL):
        self.credentials = credentials
        self.remote_ttl = remote_ttl
        self.roots = RootTable()
        self._sources: dict[str, tuple[float, Source]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self, kernel_id: str, name: str, grant: Grant) -> Iterator[Source]:
        """The source of dataset ``name`` as ``kernel_id``'s grant names it (blocking)."""
        if is_remote(grant.source):
            yield self.get(grant.source)
            return
        with self.roots.borrow(kernel_id, name, grant) as local:
            yield local

    def get(self, source: str) -> Source:
        with self._lock:
            cached = self._sources.get(source)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        if not is_remote(source):
            raise ValueError("local sources are served through their pinned roots (borrow)")
        opened = open_source(source, self.credentials)
        ttl = self.remote_ttl if "://" in source else float("inf")
        with self._lock:
            self._sources[source] = (time.monotonic() + ttl, opened)
        return opened

"""Hash-chained JSON-lines files, appended by several processes, rotated without a break.

Every line of a chained file is one JSON object whose last three keys the writer adds::

    {..., "seq": 17, "prev": "<hash of record 16>", "hash": "<sha256 of this line up to prev>"}

``hash`` is the SHA-256 (hex) of the line's bytes with ``,"hash":"..."`` taken out (that is,
of the object ending at ``"prev":"..."}``), and ``prev`` is the previous record's ``hash``
(64 zeros for the first record ever). So a record edited, deleted, inserted or moved breaks the
chain at that point (:mod:`kernel_sandbox.audit.verify`). Beside ``FILE`` live two small files:

- ``.FILE.head`` (hidden): the last record's ``seq`` and ``hash`` (and the file's inode and
  size after it), rewritten in place after every append. A file cut short (its last records
  removed) no longer reaches the head.
- ``.FILE.anchor``: written when retention deletes the oldest rotated file: the ``seq`` and
  ``hash`` of the last record deleted, from which the oldest remaining file's chain continues.

Rotation (``max_bytes``) renames ``FILE`` to ``FILE.1`` (``FILE.1`` to ``FILE.2``, ...; the
oldest beyond ``backups`` is deleted, its end written to the anchor first); the new ``FILE``'s
first record links to ``FILE.1``'s last. Writers (threads and processes) take an exclusive
``flock`` on the head file for each append, so the chain has one order whatever the writers.
Nothing is fsynced: a machine crash may lose the last records (never tear the chain: a writer
that finds the head behind the file recovers from the file's last line).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "GENESIS",
    "ChainedAppender",
    "anchor_path",
    "head_path",
    "Link",
    "chain_files",
    "read_anchor",
    "read_head",
    "seal",
    "shared_appender",
    "split_hash",
]

GENESIS = "0" * 64
HEAD_SIZE = 256  # bytes of the head file (JSON, space-padded: rewritten in place)
_HASH_TAIL = len(',"hash":"') + 64 + len('"}')
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class Link:
    """A point in a chain: a record's ``seq`` and ``hash``."""

    __slots__ = ("hash", "seq")

    def __init__(self, seq: int, hash: str):
        self.seq, self.hash = seq, hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Link) and (self.seq, self.hash) == (other.seq, other.hash)

    def __repr__(self) -> str:
        return f"Link({self.seq}, {self.hash[:12]})"


def seal(body: bytes, prev: Link) -> tuple[bytes, Link]:
    """Chain one JSON object (``body``, bytes ending in ``}``, no newline) after ``prev``;
    the line to write (with its newline) and its link.

    Raises:
        ValueError: ``body`` is not a JSON object's text.
    """
    body = body.rstrip()
    if not body.startswith(b"{") or not body.endswith(b"}"):
        raise ValueError("a chained record is one JSON object")
    seq = prev.seq + 1
    sep = b"" if body[1:-1].strip() == b"" else b","
    hashed = b'%s%s"seq":%d,"prev":"%s"}' % (body[:-1], sep, seq, prev.hash.encode())
    digest = hashlib.sha256(hashed).hexdigest()
    return b'%s,"hash":"%s"}\n' % (hashed[:-1], digest.encode()), Link(seq, digest)


def split_hash(line: bytes) -> tuple[bytes, str] | None:
    """(the hashed part, the stated hash) of a chained line, or None if it is not one."""
    line = line.rstrip(b"\r\n")
    if len(line) < _HASH_TAIL + 2 or not line.endswith(b'"}'):
        return None
    tail = line[-_HASH_TAIL:]
    if not tail.startswith(b',"hash":"'):
        return None
    stated = tail[9:73].decode("ascii", "replace")
    return line[:-_HASH_TAIL] + b"}", stated


def chain_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of one chain, oldest first: ``FILE.N`` ... ``FILE.1``, ``FILE`` (those present)."""
    base = Path(path)
    rotated = []
    for entry in base.parent.glob(base.name + ".*"):
        suffix = entry.name[len(base.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), entry))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if base.exists():
        files.append(base)
    return files


def head_path(path: str | os.PathLike[str]) -> Path:
    base = Path(path)
    return base.parent / f".{base.name}.head"


def anchor_path(path: str | os.PathLike[str]) -> Path:
    base = Path(path)
    return base.parent / f".{base.name}.anchor"


def read_head(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The head record beside ``path`` (None: none, or unreadable)."""
    try:
        value = json.loads(head_path(path).read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_anchor(path: str | os.PathLike[str]) -> Link | None:
    """Where the oldest remaining file's chain starts after retention deleted older ones."""
    try:
        value = json.loads(anchor_path(path).read_text())
        return Link(int(value["seq"]), str(value["hash"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_line(fd: int) -> bytes | None:
    """The last complete line of an open file (None: empty, or no complete line)."""
    end = os.fstat(fd).st_size
    if end == 0:
        return None
    chunk, position, data = 65536, end, b""
    while position > 0:
        start = max(0, position - chunk)
        data = os.pread(fd, position - start, start) + data
        position = start
        lines = data.rstrip(b"\n").rsplit(b"\n", 1)
        if len(lines) == 2 or position == 0:
            return lines[-1]
    return None


def _link_of(line: bytes | None) -> Link | None:
    if line is None:
        return None
    split = split_hash(line)
    if split is None:
        return None
    try:
        seq = int(json.loads(split[0])["seq"])
    except (ValueError, KeyError, TypeError):
        return None
    return Link(seq, split[1])


class ChainedAppender:
    """Appends chained records to ``path`` (0600, in a 0700 directory); see the module docstring.

    Drop-in for :class:`~kernel_sandbox.host.logfile.RotatingAppender` (``write(line)``,
    ``close()``): a line given to :meth:`write` must be one JSON object.

    Args:
        path: the file.
        max_bytes: rotate when the file would grow past this (0: never).
        backups: rotated files kept (retention); the oldest beyond it is deleted, anchored.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 0, backups: int = 5):
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, max(0, backups)
        self._fd = -1
        self._head_fd = -1
        self._lock = threading.Lock()
        # the head we wrote last, the file's (inode, size) then, and the link
        self._last: tuple[bytes, int, int, Link] | None = None

    def write(self, line: bytes) -> Link:
        """Chain and append one JSON object's line (one ``write(2)``), rotating first when full.

        Raises:
            ValueError: ``line`` is not one JSON object.
            OSError: a file cannot be created or written.
        """
        with self._lock:
            head_fd = self._head()
            fcntl.flock(head_fd, fcntl.LOCK_EX)
            try:
                fd = self._current()
                prev = self._prev(head_fd, fd)
                sealed, link = seal(line, prev)
                if self.max_bytes > 0 and os.fstat(fd).st_size + len(sealed) > self.max_bytes:
                    fd = self._rotate(fd)
                os.write(fd, sealed)
                self._save_head(head_fd, fd, link)
                return link
            finally:
                fcntl.flock(head_fd, fcntl.LOCK_UN)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain and append ``record`` (JSON-safe); the record as written (with seq, prev, hash)."""
        body = json.dumps(record, separators=(",", ":"), default=str).encode()
        link = self.write(body)
        return {**record, "seq": link.seq, "hash": link.hash}

    def close(self) -> None:
        with self._lock:
            for name in ("_fd", "_head_fd"):
                fd = getattr(self, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)

    # -- under the lock ---------------------------------------------------------------------

    def _head(self) -> int:
        if self._head_fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._head_fd = os.open(head_path(self.path), flags, 0o600)
        return self._head_fd

    def _current(self) -> int:
        """Our descriptor of ``path``, reopened when the path names another file (rotated)."""
        if self._fd >= 0:
            try:
                if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)
        self._fd = os.open(self.path, _FLAGS | os.O_NOFOLLOW, 0o600)
        return self._fd

    def _prev(self, head_fd: int, fd: int) -> Link:
        """The link to chain after: the head, when it describes the file as it is; else the
        file's last record (a writer died between its line and the head), else the previous
        file's, else the anchor or the genesis."""
        info = os.fstat(fd)
        raw = os.pread(head_fd, HEAD_SIZE, 0)
        last = self._last
        if last is not None and (raw, info.st_ino, info.st_size) == last[:3]:
            return last[3]  # the head is still ours and the file as we left it
        try:
            head = json.loads(raw or b"null")
            if head["ino"] == info.st_ino and head["size"] == info.st_size:
                return Link(int(head["seq"]), str(head["hash"]))
        except (ValueError, KeyError, TypeError):
            pass
        found = _link_of(_last_line(fd))
        if found is None and info.st_size == 0:
            for older in reversed(chain_files(self.path)[:-1]):
                with contextlib.suppress(OSError):
                    old_fd = os.open(older, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                    try:
                        found = _link_of(_last_line(old_fd))
                    finally:
                        os.close(old_fd)
                    break
        return found or read_anchor(self.path) or Link(0, GENESIS)

    def _save_head(self, head_fd: int, fd: int, link: Link) -> None:
        info = os.fstat(fd)
        text = (
            f'{{"seq": {link.seq}, "hash": "{link.hash}", "ino": {info.st_ino}, '
            f'"size": {info.st_size}}}'
        )
        raw = text.encode().ljust(HEAD_SIZE)
        os.pwrite(head_fd, raw, 0)
        self._last = (raw, info.st_ino, info.st_size, link)

    def _rotate(self, fd: int) -> int:
        """``FILE`` -> ``FILE.1`` -> ...; the oldest beyond ``backups`` deleted, anchored first."""
        name = str(self.path)
        if os.fstat(fd).st_size == 0:
            return fd
        doomed = f"{name}.{self.backups}" if self.backups > 0 else name
        if os.path.exists(doomed):
            self._anchor(doomed)
            os.unlink(doomed)
        for n in range(self.backups, 1, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{name}.{n - 1}", f"{name}.{n}")
        if self.backups > 0:
            os.rename(name, f"{name}.1")
        os.close(fd)
        self._fd = -1
        return self._current()

    def _anchor(self, doomed: str) -> None:
        old_fd = os.open(doomed, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            link = _link_of(_last_line(old_fd))
        finally:
            os.close(old_fd)
        if link is None:
            return
        target = anchor_path(self.path)
        staging = f"{target}.{os.getpid()}.tmp"
        with open(staging, "w", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
            json.dump({"seq": link.seq, "hash": link.hash}, handle)
        os.rename(staging, target)


_SHARED: dict[tuple[str, int, int], ChainedAppender] = {}
_SHARED_LOCK = threading.Lock()


def shared_appender(path: str | os.PathLike[str], max_bytes: int, backups: int) -> ChainedAppender:
    """This process's one appender for ``path`` (kernels of one process share it)."""
    key = (os.path.abspath(path), max_bytes, backups)
    with _SHARED_LOCK:
        appender = _SHARED.get(key)
        if appender is None:
            appender = _SHARED[key] = ChainedAppender(key[0], max_bytes, backups)
        return appender

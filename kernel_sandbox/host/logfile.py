"""Append-only JSON-lines files that several processes share, rotated by size.

The audit log (:mod:`kernel_sandbox.broker.audit`) and the egress decision log
(:mod:`kernel_sandbox.egress.proxy`) are written by every broker and every egress proxy of a
user at once (one per Jupyter Server, one per allowlist kernel). Each line is one ``write(2)``
on a descriptor opened with ``O_APPEND``, so lines never interleave. When the file reaches
``max_bytes`` the writer that notices renames ``log`` to ``log.1`` (``log.1`` to ``log.2``,
..., the oldest beyond ``backups`` is deleted) under an exclusive ``flock`` on the file being
rotated; the others see that the path now names another file and reopen it.

What is guaranteed, with writers on one local file system: no line is lost, duplicated or torn
by a rotation. A line written by a writer that opened the file just before another rotated it
lands at the end of ``log.1`` rather than in the new ``log`` (so the order across the two files
is off by the lines in flight), and a file may exceed ``max_bytes`` by those lines. The oldest
file is deleted only when the newest backup is created, so a writer never appends to a deleted
file unless it held it open through ``backups`` rotations between two of its own lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

__all__ = ["DEFAULT_BACKUPS", "DEFAULT_MAX_BYTES", "RotatingAppender"]

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 5
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class RotatingAppender:
    """Appends whole lines to ``path`` (0600, in a 0700 directory), rotating by size.

    ``max_bytes <= 0`` never rotates. ``backups`` is how many rotated files are kept
    (``path.1`` is the newest); 0 keeps none (the full file is simply started anew).
    Thread-safe; safe with other processes appending to the same path (module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ):
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, max(0, backups)
        self._fd = -1
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        """Append ``line`` (one ``write(2)``), rotating the file first when it is full.

        Raises:
            OSError: the file or its directory cannot be created or written.
        """
        with self._lock:
            fd = self._current()
            if self.max_bytes > 0 and os.fstat(fd).st_size + len(line) > self.max_bytes:
                fd = self._rotate(fd)
            os.write(fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _open(self) -> int:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(self.path, _FLAGS, 0o600)

    def _current(self) -> int:
        """Our descriptor, reopened when the path names another file (rotated by someone)."""
        if self._fd >= 0:
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            os.close(self._fd)
            self._fd = -1
        self._fd = self._open()
        return self._fd

    def _rotate(self, fd: int) -> int:
        """Rotate unless another writer did meanwhile; the descriptor to write to next."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                still = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                still = False
            if still and os.fstat(fd).st_size > 0:
                name = str(self.path)
                for n in range(self.backups, 0, -1):
                    older = f"{name}.{n - 1}" if n > 1 else None
                    if older is None:
                        os.rename(name, f"{name}.1")
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(older, f"{name}.{n}")
                if self.backups == 0:
                    os.unlink(name)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._fd = self._open()
        return self._fd

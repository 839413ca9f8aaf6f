"""Kernels that end with their owner: what this process still holds when it exits normally.

``jupyter console`` only sends its kernel a shutdown request, and a script may forget its
kernels; a local kernel ends with its parent, and so does a sandbox. Every kernel's host-side
resources register here while they hold anything; at interpreter exit each is closed with
blocking calls (no worker thread may start then). A killed owner cannot run this: its kernels
wait for re-adoption, then the in-sandbox watchdog ends them.

The ``atexit`` hook is registered on the first :meth:`ExitRegistry.add`, never at import.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any, Protocol

from kernel_sandbox.host.logtext import clip

__all__ = ["PROCESS_EXITS", "Closable", "ExitRegistry"]


class Closable(Protocol):
    """What can be ended at exit: a synchronous, idempotent close."""

    kernel_id: str
    log: Any  # a logging.Logger or LoggerAdapter

    def close(self, restart: bool = False) -> None: ...


class ExitRegistry:
    """Resources to close when this process exits, each with the pid that registered it.

    A forked child inherits the registry and the hook, but never closes its parent's kernels.
    """

    def __init__(self) -> None:
        self._entries: dict[Closable, int] = {}
        self._lock = threading.Lock()
        self._hooked = False

    def add(self, resources: Closable) -> None:
        with self._lock:
            self._entries[resources] = os.getpid()
            if not self._hooked:
                atexit.register(self.close_all)
                self._hooked = True

    def discard(self, resources: Closable) -> None:
        with self._lock:
            self._entries.pop(resources, None)

    def __contains__(self, resources: object) -> bool:
        return resources in self._entries

    def close_all(self) -> None:
        """Close what this process registered (the atexit hook); one failure stops no other."""
        with self._lock:
            mine = [r for r, pid in self._entries.items() if pid == os.getpid()]
        for resources in mine:
            try:
                resources.close()
            except Exception as exc:
                # the error may quote what the kernel planted in its runtime directory
                resources.log.warning(
                    "kernel %s: not cleaned up at exit: %s", resources.kernel_id, clip(exc)
                )
            self.discard(resources)


# The default for every provisioner of this process (a test can hand in its own).
PROCESS_EXITS = ExitRegistry()

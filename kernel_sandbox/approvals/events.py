"""Jupyter Events for egress requests: one when a request starts waiting, one when it ends.

Front ends subscribed to the server's event stream (``/api/events/subscribe``; JupyterLab's
``serviceManager.events``) learn about requests without polling. The server side has to
notice them: the requests live in the kernels' proxies, other processes, so :class:`Watcher`
asks them every ``interval`` seconds (a unix-socket round trip per proxy) and emits the
differences. A request that disappears was decided here (``once``, ``kernel``, ``deny``),
elsewhere (the CLI, another server: ``elsewhere``) or timed out (``expired``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kernel_sandbox.approvals.store import PendingStore, Request

__all__ = ["SCHEMA", "SCHEMA_ID", "Watcher", "event"]

log = logging.getLogger(__name__)

SCHEMA_ID = "https://events.kernel-sandbox.dev/egress-request/v1"
_TEXT = {"type": ["string", "null"]}
SCHEMA: dict[str, Any] = {
    "$id": SCHEMA_ID,
    "version": "1",
    "title": "kernel-sandbox egress requests",
    "personal-data": True,
    "description": "A sandboxed kernel's request to an unlisted host (egress_mode: ask) "
    "starts waiting for a person (action 'waiting') or stops waiting (action 'decided', "
    "with the outcome).",
    "type": "object",
    "required": ["action", "id", "kernel_id", "target", "host", "port"],
    "properties": {
        "action": {"enum": ["waiting", "decided"]},
        "outcome": {"enum": ["once", "kernel", "deny", "expired", "elsewhere", None]},
        "id": {"type": "string"},
        "kernel_id": {"type": "string"},
        "target": {"type": "string", "description": "host:port, exactly as it will connect"},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "since": {"type": "number"},
        "expires": {"type": "number"},
        "waiting": {"type": "integer"},
        "reason": _TEXT,
        "notebook": _TEXT,
        "kernel_name": _TEXT,
    },
}


def event(action: str, request: Request, outcome: str | None = None) -> dict[str, Any]:
    """An event's data for ``request``."""
    fields = {k: v for k, v in request.as_json().items() if k in SCHEMA["properties"]}
    return {**fields, "action": action, "outcome": outcome}


class Watcher:
    """Polls ``store`` and calls ``emit(data)`` for each request that appears or goes.

    ``before`` (optional) runs in the loop before each look, e.g. to refresh notebook names.
    """

    def __init__(
        self,
        store: PendingStore,
        emit: Callable[[dict[str, Any]], None],
        interval: float = 0.5,
        before: Callable[[], Awaitable[None]] | None = None,
    ):
        self.store, self.emit, self.interval, self.before = store, emit, interval, before
        self.known: dict[tuple[str, str, float], Request] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None  # one look (or decision) at a time
        self.settled_here: set[tuple[str, str, float]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.look()
            except Exception as exc:  # never end the watch: log and look again
                log.warning("kernel-sandbox approvals: could not list egress requests: %s", exc)
            await asyncio.sleep(self.interval)

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def look(self) -> list[Request]:
        """One round: list, emit what changed, return what waits now."""
        async with self._locked():
            return await self._look()

    async def settled(self, request: Request, outcome: str) -> None:
        """A decision made here: its event now, even if no round saw the request wait."""
        async with self._locked():
            key = (request.kernel_id, request.target, request.since)
            self.known.pop(key, None)
            self.settled_here.add(key)
            self.emit(event("decided", request, outcome))

    async def _look(self) -> list[Request]:
        if self.before is not None:
            await self.before()
        current = await asyncio.to_thread(self.store.pending)
        now = {(r.kernel_id, r.target, r.since): r for r in current}
        self.settled_here &= set(now)  # a listing made before the decision may still hold it
        for key in self.settled_here:
            del now[key]
        for key, request in now.items():
            if key not in self.known:
                self.emit(event("waiting", request))
        for key, request in self.known.items():
            if key not in now:
                self.emit(event("decided", request, self._outcome(request)))
        self.known = now
        return list(now.values())

    def _outcome(self, request: Request) -> str:
        decided = self.store.decided.get((request.kernel_id, request.target))
        if decided is not None and decided[1] >= request.since:
            return decided[0]
        return "expired" if time.time() >= request.expires - 0.5 else "elsewhere"

"""The broker: one asyncio loop in a thread of the owner process, a unix socket per kernel.

The provisioner :meth:`~DataBroker.grant`\\ s a kernel its datasets at launch: the broker
mints a token (only its hash is stored), writes it into the kernel's runtime directory as a
file, and listens on ``data.sock`` next to it. A connection's socket tells the broker which
kernel sent the request, so a token copied from kernel A is refused on kernel B's socket.
How a request is checked and served is :mod:`.operations`; how the token file and socket are
put in place without following a link the kernel planted is :mod:`.staging`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import ssl
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from kernel_sandbox.broker.audit import AuditLog
from kernel_sandbox.broker.operations import CHUNK_SIZE, RequestHandler
from kernel_sandbox.broker.protocol import Refusal, send_error
from kernel_sandbox.broker.sources import Credentials, SourceCache
from kernel_sandbox.broker.staging import bind_staged, is_socket, write_token_file
from kernel_sandbox.broker.tokens import PRUNE_AFTER, Grant, TokenRecord, TokenStore
from kernel_sandbox.host.logtext import KernelLog, LineBudget, LogLimits
from kernel_sandbox.inside.contract import DATA_SOCKET, DATA_TOKEN
from kernel_sandbox.inside.wire import MAX_MESSAGE

__all__ = ["DataBroker", "shared_broker"]

log = logging.getLogger("kernel_sandbox.broker")
T = TypeVar("T")


@dataclass
class _Endpoint:
    """One kernel's listening socket and its live connections."""

    path: Path | None  # None: a TCP port (a pod kernel's, grant_tcp)
    server: asyncio.AbstractServer
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    port: int = 0  # the TCP port (path None)


class DataBroker:
    """Serves the datasets of many kernels; see the module docstring.

    Args:
        tokens: the token records (SQLite).
        audit: where each request's decision is appended.
        credentials: host-side storage options for remote (fsspec) sources.
        max_message: cap on a JSON request, in bytes (larger ones are refused unread).
        chunk_size: bytes per data frame when streaming a file to a kernel.
        max_connections: concurrent connections one kernel may hold (the rest are refused).
        request_timeout: seconds a kernel may take to send a request (or a write's next frame).
        recheck_every: seconds between token re-checks during a long read or write, so a
            revocation also cuts a transfer in progress.
        sendfile: stream local files with ``sendfile(2)`` (zero-copy) rather than through
            Python buffers.
        prune_after: when the broker starts, delete the records of tokens that expired or
            were revoked more than this many seconds ago (None keeps them all).
        log_lines: what a kernel's requests may add to the owner's log (Python logging):
            clipped, and at most so many lines per kernel per interval (default 20 per 10 s).
            The audit log has a budget of its own (:class:`AuditLog`).
    """

    def __init__(
        self,
        tokens: TokenStore,
        audit: AuditLog,
        credentials: Credentials | None = None,
        *,
        max_message: int = MAX_MESSAGE,
        chunk_size: int = CHUNK_SIZE,
        max_connections: int = 16,
        request_timeout: float = 30.0,
        recheck_every: float = 1.0,
        sendfile: bool = True,
        prune_after: float | None = PRUNE_AFTER,
        log_lines: KernelLog | None = None,
    ):
        self.tokens, self.audit = tokens, audit
        self.log_lines = log_lines or KernelLog(log)
        self.credentials = credentials or Credentials()
        self.max_connections, self.prune_after = max_connections, prune_after
        self._sources = SourceCache(self.credentials)
        self._requests = RequestHandler(
            tokens,
            audit,
            self._sources,
            max_message=max_message,
            chunk_size=chunk_size,
            request_timeout=request_timeout,
            recheck_every=recheck_every,
            sendfile=sendfile,
            log_lines=self.log_lines,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}

    # -- lifecycle (called from any thread but the broker's) ---------------------------------

    def start(self) -> None:
        """Start the broker's thread and loop (idempotent); first prune long-dead tokens."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._prune()
            loop = asyncio.new_event_loop()
            loop.set_default_executor(ThreadPoolExecutor(32, thread_name_prefix="ks-broker-io"))
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.call_soon(self._summarize, loop)
                loop.run_forever()

            self._loop = loop
            self._thread = threading.Thread(target=run, name="kernel-sandbox-broker", daemon=True)
            self._thread.start()
            ready.wait()

    def _prune(self) -> None:
        if self.prune_after is None:
            return
        try:
            pruned = self.tokens.purge(self.prune_after)
        except sqlite3.Error as exc:  # housekeeping: never a reason to refuse a kernel
            log.warning("data broker: cannot prune old tokens in %s: %s", self.tokens.path, exc)
            return
        if pruned:
            log.info("data broker: pruned %d expired or revoked token records", pruned)

    def _summarize(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the summaries of what kernels' budgets held back; again every interval."""
        try:
            self.log_lines.flush()
            self.audit.flush()
        except OSError as exc:
            log.error("data broker: cannot write the audit log %s: %s", self.audit.path, exc)
        interval = min(self.log_lines.budget.interval, self.audit.budget.interval)
        loop.call_later(max(interval, 0.5), self._summarize, loop)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` in the broker's loop and wait for its result (from another thread)."""
        self.start()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def grant(
        self,
        kernel_id: str,
        shared_dir: Path,
        scope: Mapping[str, Grant],
        ttl: float,
        owner: tuple[int, int] | None = None,
    ) -> TokenRecord:
        """Give ``kernel_id`` a fresh token for ``scope`` and serve it on its socket.

        Revokes the kernel's earlier tokens (a restart), opens each local dataset's root now,
        once, without following links (:mod:`.roots`; requests start from that handle, never
        from the path), records its identity in the new token's scope, writes the token to
        ``shared_dir/data-token`` (mode 0400, owned by ``owner`` when we are root) and listens
        on ``shared_dir/data.sock``.

        Raises:
            PolicyError: a local dataset's root cannot be opened without following a link.
        """
        self.tokens.revoke_kernel(kernel_id, "replaced by a new token")
        scope = self._sources.roots.pin(kernel_id, scope)
        token, record = self.tokens.mint(kernel_id, scope, ttl)
        write_token_file(shared_dir / DATA_TOKEN, token, owner)
        self.serve(kernel_id, shared_dir)
        return record

    def grant_tcp(
        self,
        kernel_id: str,
        scope: Mapping[str, Grant],
        ttl: float,
        host: str,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[str, TokenRecord, int]:
        """:meth:`grant` for a kernel in a pod: the token is returned (for the pod's Secret)
        and the kernel's requests are served on TCP at ``host`` (``port``, 0 for any: kept
        while it serves), over TLS with ``tls``. Requests are told apart by the port, as by
        the socket on the Docker path, and authenticated by the token.

        Returns:
            (token, its record, the port).
        """
        self.tokens.revoke_kernel(kernel_id, "replaced by a new token")
        scope = self._sources.roots.pin(kernel_id, scope)
        token, record = self.tokens.mint(kernel_id, scope, ttl)
        bound = self._run(self._listen_tcp(kernel_id, host, port, tls))
        return token, record, bound

    def serve_tcp(self, kernel_id: str, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """:meth:`serve` for a kernel in a pod (after an adoption): its port again, with the
        token it has."""
        self._sources.roots.adopt(kernel_id)
        return self._run(self._listen_tcp(kernel_id, host, port, tls))

    def serve(self, kernel_id: str, shared_dir: Path) -> None:
        """Listen on ``shared_dir/data.sock`` for ``kernel_id`` (again after an adoption: its
        dataset roots are then re-opened on first use, checked against the identities its
        token recorded)."""
        self._sources.roots.adopt(kernel_id)
        self._run(self._listen(kernel_id, shared_dir / DATA_SOCKET))

    def revoke(self, kernel_id: str, reason: str) -> int:
        """Revoke the kernel's live tokens and close its dataset roots; its socket stays (for
        the restarted container, whose grant opens the roots again)."""
        try:
            return self.tokens.revoke_kernel(kernel_id, reason)
        finally:
            self._sources.roots.release(kernel_id)

    def release(self, kernel_id: str, reason: str = "kernel shut down") -> None:
        """Revoke the kernel's tokens, stop serving its socket and cut its connections, close
        its dataset roots."""
        try:
            self.tokens.revoke_kernel(kernel_id, reason)
            if self._loop is not None:
                self._run(self._unlisten(kernel_id))
        finally:
            self._sources.roots.release(kernel_id)
        self.log_lines.forget(kernel_id)
        try:
            self.audit.forget(kernel_id)
        except OSError as exc:
            log.error("data broker: cannot write the audit log %s: %s", self.audit.path, exc)

    def close(self) -> None:
        """Stop serving every kernel, close every dataset root and end the broker's thread."""
        self._sources.roots.close()
        if self._loop is None or self._thread is None:
            return
        for kernel_id in list(self._endpoints):
            self._run(self._unlisten(kernel_id))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None
        self.tokens.close()
        self.log_lines.flush(force=True)
        with contextlib.suppress(OSError):
            self.audit.close()

    # -- sockets (in the broker's loop) ------------------------------------------------------

    async def _listen(self, kernel_id: str, path: Path) -> None:
        current = self._endpoints.get(kernel_id)
        if current is not None:
            if current.path == path and current.server.is_serving() and is_socket(path):
                return
            await self._unlisten(kernel_id)
        listener = bind_staged(path)
        server = await asyncio.start_unix_server(partial(self._serve, kernel_id), sock=listener)
        self._endpoints[kernel_id] = _Endpoint(path, server)

    async def _listen_tcp(
        self, kernel_id: str, host: str, port: int, tls: ssl.SSLContext | None
    ) -> int:
        current = self._endpoints.get(kernel_id)
        if current is not None:
            if current.path is None and current.server.is_serving():
                return current.port
            await self._unlisten(kernel_id)
        server = await asyncio.start_server(partial(self._serve, kernel_id), host, port, ssl=tls)
        bound = int(server.sockets[0].getsockname()[1])
        self._endpoints[kernel_id] = _Endpoint(None, server, port=bound)
        return bound

    async def _unlisten(self, kernel_id: str) -> None:
        endpoint = self._endpoints.pop(kernel_id, None)
        if endpoint is None:
            return
        endpoint.server.close()
        for writer in list(endpoint.writers):
            writer.close()
        try:
            if endpoint.path is not None and is_socket(endpoint.path):
                endpoint.path.unlink()
        except OSError:
            pass

    # -- connections (in the broker's loop) -------------------------------------------------

    async def _serve(
        self, kernel_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        endpoint = self._endpoints.get(kernel_id)
        if endpoint is None:
            writer.close()
            return
        try:
            if len(endpoint.writers) >= self.max_connections:
                limit = self.max_connections
                refusal = Refusal("busy", f"too many concurrent requests (limit {limit})")
                self._requests.audit_decision(kernel_id, {}, "deny", refusal.code)
                await send_error(writer, refusal)
                return
            endpoint.writers.add(writer)
            writer.transport.set_write_buffer_limits(high=4 * self._requests.chunk_size)
            await self._requests.handle(kernel_id, reader, writer)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            endpoint.writers.discard(writer)
            writer.close()


_SHARED: dict[tuple[str, str, str], DataBroker] = {}
_SHARED_LOCK = threading.Lock()


def shared_broker(
    token_db: str, audit_log: str, credentials_file: str = "", limits: LogLimits | None = None
) -> DataBroker:
    """The broker of this process for these files: every kernel started here shares it (with
    the ``limits`` of the first one that asked)."""
    key = (os.path.abspath(token_db), os.path.abspath(audit_log), credentials_file)
    limits = limits or LogLimits()
    with _SHARED_LOCK:
        broker = _SHARED.get(key)
        if broker is None:
            audit = AuditLog(
                key[1],
                max_bytes=limits.max_bytes,
                backups=limits.backups,
                budget=LineBudget(limits.records, limits.interval),
            )
            broker = DataBroker(
                TokenStore(key[0]),
                audit,
                Credentials(credentials_file or None),
                log_lines=KernelLog(log, LineBudget(limits.lines, limits.interval)),
            )
            _SHARED[key] = broker
        return broker

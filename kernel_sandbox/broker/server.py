"""The broker: one asyncio loop in a thread of the owner process, a unix socket per kernel.

The provisioner :meth:`~DataBroker.grant`\\ s a kernel its datasets at launch: the broker
mints a token (only its hash is stored), writes it into the kernel's runtime directory as a
file, and listens on ``data.sock`` next to it. A connection's socket tells the broker which
kernel sent the request, so a token copied from kernel A is refused on kernel B's socket.
Every request is checked in this order, and audited whatever the outcome: shape and size,
token (known, this kernel's, not revoked, not expired: looked up in SQLite on every request,
so a revocation from another process counts at once), dataset in scope, operation allowed,
path inside the dataset. Blocking work (SQLite, files, fsspec) runs in worker threads; a
refusal or a failure ends that one connection, never the broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sqlite3
import stat
import threading
import time
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from kernel_sandbox.broker.audit import AuditLog
from kernel_sandbox.broker.protocol import (
    END_FRAME,
    Refusal,
    data_frame_header,
    read_frame,
    read_request,
    send_error,
    send_json,
)
from kernel_sandbox.broker.sources import (
    Credentials,
    LocalReader,
    Source,
    open_source,
    relative_parts,
)
from kernel_sandbox.broker.tokens import (
    PRUNE_AFTER,
    Grant,
    TokenRecord,
    TokenRefused,
    TokenStore,
)
from kernel_sandbox.inside.contract import DATA_SOCKET, DATA_TOKEN
from kernel_sandbox.inside.wire import DATA, END, MAX_CHUNK, MAX_MESSAGE, OPS

__all__ = ["DataBroker", "shared_broker"]

log = logging.getLogger("kernel_sandbox.broker")
T = TypeVar("T")

CHUNK_SIZE = 1024 * 1024
SENDFILE_FRAME = MAX_CHUNK  # the protocol's cap on a data frame
REMOTE_SOURCE_TTL = 300.0


@dataclass
class _Endpoint:
    """One kernel's listening socket and its live connections."""

    path: Path
    server: asyncio.AbstractServer
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


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
    ):
        self.tokens, self.audit = tokens, audit
        self.credentials = credentials or Credentials()
        self.max_message, self.chunk_size = max_message, chunk_size
        self.max_connections, self.request_timeout = max_connections, request_timeout
        self.recheck_every = recheck_every
        self.sendfile = sendfile
        self.prune_after = prune_after
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._endpoints: dict[str, _Endpoint] = {}
        self._sources: dict[str, tuple[float, Source]] = {}
        self._sources_lock = threading.Lock()

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

    def _run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        self.start()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def grant(
        self,
        kernel_id: str,
        shared_dir: Path,
        scope: Mapping[str, Grant],
        ttl: float,
        owner: tuple[int, int] | None = None,
    ) -> TokenRecord:
        """Give ``kernel_id`` a fresh token for ``scope`` and serve it on its socket.

        Revokes the kernel's earlier tokens (a restart), writes the new one to
        ``shared_dir/data-token`` (mode 0400, owned by ``owner`` when we are root) and listens
        on ``shared_dir/data.sock``.
        """
        self.tokens.revoke_kernel(kernel_id, "replaced by a new token")
        token, record = self.tokens.mint(kernel_id, scope, ttl)
        _write_token_file(shared_dir / DATA_TOKEN, token, owner)
        self.serve(kernel_id, shared_dir)
        return record

    def serve(self, kernel_id: str, shared_dir: Path) -> None:
        """Listen on ``shared_dir/data.sock`` for ``kernel_id`` (again after an adoption)."""
        self._run(self._listen(kernel_id, shared_dir / DATA_SOCKET))

    def revoke(self, kernel_id: str, reason: str) -> int:
        """Revoke the kernel's live tokens; its socket stays (for the restarted container)."""
        return self.tokens.revoke_kernel(kernel_id, reason)

    def release(self, kernel_id: str, reason: str = "kernel shut down") -> None:
        """Revoke the kernel's tokens, stop serving its socket and cut its connections."""
        self.tokens.revoke_kernel(kernel_id, reason)
        if self._loop is not None:
            self._run(self._unlisten(kernel_id))

    def close(self) -> None:
        """Stop serving every kernel and end the broker's thread."""
        if self._loop is None or self._thread is None:
            return
        for kernel_id in list(self._endpoints):
            self._run(self._unlisten(kernel_id))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None
        self.tokens.close()

    # -- sockets (in the broker's loop) ------------------------------------------------------

    async def _listen(self, kernel_id: str, path: Path) -> None:
        current = self._endpoints.get(kernel_id)
        if current is not None:
            if current.path == path and current.server.is_serving() and _is_socket(path):
                return
            await self._unlisten(kernel_id)
        listener = _bind_staged(path)
        server = await asyncio.start_unix_server(partial(self._serve, kernel_id), sock=listener)
        self._endpoints[kernel_id] = _Endpoint(path, server)

    async def _unlisten(self, kernel_id: str) -> None:
        endpoint = self._endpoints.pop(kernel_id, None)
        if endpoint is None:
            return
        endpoint.server.close()
        for writer in list(endpoint.writers):
            writer.close()
        try:
            if _is_socket(endpoint.path):
                endpoint.path.unlink()
        except OSError:
            pass

    # -- requests -----------------------------------------------------------------------------

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
                self._audit(kernel_id, {}, "deny", refusal.code)
                await send_error(writer, refusal)
                return
            endpoint.writers.add(writer)
            writer.transport.set_write_buffer_limits(high=4 * self.chunk_size)
            await self._handle(kernel_id, reader, writer)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            endpoint.writers.discard(writer)
            writer.close()

    async def _handle(
        self, kernel_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        entry: dict[str, Any] = {}
        try:
            request = await asyncio.wait_for(
                read_request(reader, self.max_message), self.request_timeout
            )
            entry = {
                "op": request["op"],
                "dataset": request.get("dataset"),
                "path": request.get("path"),
            }
            if request["op"] not in OPS:
                raise Refusal(
                    "bad-request", f"malformed request: unknown operation {request['op']!r}"
                )
            record = await self._check_token(request["token"], kernel_id)
            entry["token_id"] = record.token_id
            handler: Callable[..., Awaitable[dict[str, Any]]]
            handler = getattr(self, f"_op_{request['op']}")
            result = await handler(kernel_id, record, request, reader, writer)
            self._audit(kernel_id, {**entry, **result}, "allow")
        except Refusal as refusal:
            self._audit(kernel_id, entry, "deny", refusal.code, message=refusal.message)
            if refusal.code in ("bad-request", "too-large"):
                log.warning("data broker: kernel %s: %s", kernel_id, refusal.message)
            await send_error(writer, refusal)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._audit(kernel_id, entry, "error", "disconnected")
        except asyncio.TimeoutError:
            self._audit(kernel_id, entry, "error", "timeout")
        except Exception:  # one failed request must never take the broker down
            log.exception("data broker: kernel %s: %s failed", kernel_id, entry.get("op"))
            self._audit(kernel_id, entry, "error", "internal")
            failure = Refusal("internal", "the data broker failed; see its log on the host")
            await send_error(writer, failure)

    def _audit(
        self,
        kernel_id: str,
        entry: Mapping[str, Any],
        decision: str,
        reason: str | None = None,
        **extra: Any,
    ) -> None:
        try:
            self.audit.record(
                kernel_id=kernel_id,
                op=entry.get("op"),
                decision=decision,
                dataset=entry.get("dataset"),
                path=entry.get("path"),
                token_id=entry.get("token_id"),
                reason=reason,
                **{
                    k: v for k, v in entry.items() if k not in ("op", "dataset", "path", "token_id")
                },
                **extra,
            )
        except OSError as exc:
            log.error("data broker: cannot write the audit log %s: %s", self.audit.path, exc)

    async def _check_token(self, token: str, kernel_id: str) -> TokenRecord:
        try:
            return await asyncio.to_thread(self.tokens.check, token, kernel_id)
        except TokenRefused as exc:
            raise Refusal(exc.code, str(exc)) from None

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        """Run source I/O in a thread; turn a remote file system's errors into refusals."""
        try:
            return await asyncio.to_thread(func, *args)
        except (Refusal, asyncio.CancelledError):
            raise
        except FileNotFoundError:
            raise Refusal("not-found", "no such file or directory") from None
        except IsADirectoryError:
            raise Refusal("is-a-directory", "is a directory") from None
        except NotADirectoryError:
            raise Refusal("not-a-directory", "not a directory") from None
        except PermissionError as exc:
            log.warning("data broker: the source refused access: %s", exc)
            raise Refusal("denied", "the data source refused access (see the host's log)") from None
        except OSError as exc:
            log.error("data broker: source error: %s", exc)
            raise Refusal("source-error", "the data source failed (see the host's log)") from None

    def _source(self, source: str) -> Source:
        with self._sources_lock:
            cached = self._sources.get(source)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        opened = open_source(source, self.credentials)
        ttl = REMOTE_SOURCE_TTL if "://" in source else float("inf")
        with self._sources_lock:
            self._sources[source] = (time.monotonic() + ttl, opened)
        return opened

    async def _target(
        self, record: TokenRecord, request: Mapping[str, Any], write: bool = False
    ) -> tuple[Source, list[str]]:
        """The checked dataset source and path parts of a request."""
        name = request.get("dataset")
        if not name:
            raise Refusal("bad-request", "malformed request: no dataset named")
        grant = record.scope.get(name)
        if grant is None:
            raise Refusal("scope", f"dataset {name!r} is not in this kernel's scope")
        if write and not grant.writable:
            raise Refusal("read-only", f"dataset {name!r} is read-only for this kernel")
        parts = relative_parts(request.get("path", ""))
        return await self._blocking(self._source, grant.source), parts

    # -- operations ---------------------------------------------------------------------------

    async def _op_scope(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        reader: StreamReader,
        writer: StreamWriter,
    ) -> dict[str, Any]:
        datasets = {name: grant.access for name, grant in record.scope.items()}
        await send_json(writer, {"ok": True, "datasets": datasets, "expires": record.expires})
        return {}

    async def _op_list(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        reader: StreamReader,
        writer: StreamWriter,
    ) -> dict[str, Any]:
        source, parts = await self._target(record, request)
        entries = await self._blocking(source.list, parts)
        await send_json(writer, {"ok": True, "entries": entries})
        return {"entries": len(entries)}

    async def _op_stat(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        reader: StreamReader,
        writer: StreamWriter,
    ) -> dict[str, Any]:
        source, parts = await self._target(record, request)
        await send_json(writer, {"ok": True, "entry": await self._blocking(source.stat, parts)})
        return {}

    async def _op_read(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        reader: StreamReader,
        writer: StreamWriter,
    ) -> dict[str, Any]:
        offset, length = request.get("offset", 0), request.get("length")
        if not _count(offset) or not (length is None or _count(length)):
            raise Refusal("bad-request", "malformed request: offset and length must be counts")
        source, parts = await self._target(record, request)
        handle = await self._blocking(source.open_read, parts, offset, length)
        sent = 0
        try:
            await send_json(writer, {"ok": True, "size": handle.size})
            recheck = time.monotonic() + self.recheck_every
            while True:
                if isinstance(handle, LocalReader) and self.sendfile:
                    n = await self._sendfile_frame(writer, handle)
                else:
                    n = await self._copy_frame(writer, handle)
                if n == 0:
                    break
                sent += n
                if time.monotonic() >= recheck:
                    await self._check_token(request["token"], kernel_id)
                    recheck = time.monotonic() + self.recheck_every
            writer.write(END_FRAME)
            await writer.drain()
        finally:
            await asyncio.to_thread(handle.close)
        return {"bytes": sent}

    async def _copy_frame(self, writer: StreamWriter, handle: Any) -> int:
        buffer = bytearray(self.chunk_size)  # fresh: the transport may keep a reference
        n = await self._blocking(handle.readinto, buffer)
        if n:
            writer.write(data_frame_header(n))
            writer.write(memoryview(buffer)[:n])
            await writer.drain()
        return n

    async def _sendfile_frame(self, writer: StreamWriter, handle: LocalReader) -> int:
        """One frame straight from the page cache to the socket (no copy through Python)."""
        n = min(SENDFILE_FRAME, handle.end - handle.pos)
        if n <= 0:
            return 0
        writer.write(data_frame_header(n))
        await writer.drain()
        loop = asyncio.get_running_loop()
        done = await loop.sendfile(writer.transport, handle.file, handle.pos, n)
        if done != n:  # the file shrank under us: the frame cannot be completed
            raise ConnectionAbortedError(f"file shrank during the read ({done} of {n} bytes)")
        handle.pos += n
        return n

    async def _op_write(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        reader: StreamReader,
        writer: StreamWriter,
    ) -> dict[str, Any]:
        source, parts = await self._target(record, request, write=True)
        handle = await self._blocking(source.open_write, parts)
        committed = False
        try:
            await send_json(writer, {"ok": True})
            recheck = time.monotonic() + self.recheck_every
            while True:
                kind, payload = await asyncio.wait_for(read_frame(reader), self.request_timeout)
                if kind == END:
                    break
                if kind != DATA:
                    raise Refusal("bad-request", "malformed request: expected data frames")
                await self._blocking(handle.write, payload)
                if time.monotonic() >= recheck:
                    await self._check_token(request["token"], kernel_id)
                    recheck = time.monotonic() + self.recheck_every
            size = await self._blocking(handle.commit)
            committed = True
        finally:
            if not committed:
                await asyncio.to_thread(handle.abort)
        await send_json(writer, {"ok": True, "size": size})
        return {"bytes": size}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def _staging(path: Path) -> Path:
    """A name in the host-only parent of the kernel-writable directory ``path`` lives in.

    Files are prepared there and renamed into place: a chmod or chown on a path the kernel
    can write to would follow a symlink the kernel planted (to a host file); rename never
    follows one.
    """
    return path.parent.parent / f".{path.name}.{secrets.token_hex(4)}"


def _bind_staged(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, reachable by the kernel's uid."""
    staging = _staging(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(staging))
        os.chmod(staging, 0o666)  # the 0700 runtime directory is the real guard
        listener.listen(64)
        os.rename(staging, path)
    except BaseException:
        listener.close()
        staging.unlink(missing_ok=True)
        raise
    return listener


def _write_token_file(path: Path, token: str, owner: tuple[int, int] | None) -> None:
    """Put the token at ``path`` atomically: mode 0400, owned by the kernel's uid."""
    staging = _staging(path)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        os.write(fd, (token + "\n").encode())
        if owner is not None and os.getuid() == 0:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    try:
        os.rename(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


_SHARED: dict[tuple[str, str, str], DataBroker] = {}
_SHARED_LOCK = threading.Lock()


def shared_broker(token_db: str, audit_log: str, credentials_file: str = "") -> DataBroker:
    """The broker of this process for these settings: every kernel started here shares it."""
    key = (os.path.abspath(token_db), os.path.abspath(audit_log), credentials_file)
    with _SHARED_LOCK:
        broker = _SHARED.get(key)
        if broker is None:
            broker = DataBroker(
                TokenStore(key[0]), AuditLog(key[1]), Credentials(credentials_file or None)
            )
            _SHARED[key] = broker
        return broker

"""One request from a kernel, checked and served: the broker's request handling.

Every request is checked in this order, and audited whatever the outcome: shape and size,
token (known, this kernel's, not revoked, not expired: looked up in SQLite on every request,
so a revocation from another process counts at once), dataset in scope, operation allowed,
path inside the dataset. Blocking work (SQLite, files, fsspec) runs in worker threads; a
refusal or a failure ends that one connection, never the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable, Mapping
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
    LocalReader,
    Reader,
    SourceCache,
    Writer,
    relative_parts,
)
from kernel_sandbox.broker.tokens import Grant, TokenRecord, TokenRefused, TokenStore
from kernel_sandbox.host.logtext import KernelLog
from kernel_sandbox.inside.wire import DATA, END, MAX_CHUNK, MAX_MESSAGE, OPS

__all__ = ["CHUNK_SIZE", "RequestHandler"]

log = logging.getLogger("kernel_sandbox.broker")
T = TypeVar("T")

CHUNK_SIZE = 1024 * 1024
SENDFILE_FRAME = MAX_CHUNK  # the protocol's cap on a data frame


class RequestHandler:
    """Reads, checks, serves and audits the request of one connection (see the module
    docstring); the operations are the ``_op_*`` methods, one per ``op`` of the wire format.
    The arguments are :class:`~kernel_sandbox.broker.server.DataBroker`'s.
    """

    def __init__(
        self,
        tokens: TokenStore,
        audit: AuditLog,
        sources: SourceCache,
        *,
        max_message: int = MAX_MESSAGE,
        chunk_size: int = CHUNK_SIZE,
        request_timeout: float = 30.0,
        recheck_every: float = 1.0,
        sendfile: bool = True,
        log_lines: KernelLog | None = None,
    ):
        self.tokens, self.audit, self.sources = tokens, audit, sources
        # what a kernel's requests make us write to the owner's log: clipped, budgeted
        self.log = log_lines or KernelLog(log)
        self.max_message, self.chunk_size = max_message, chunk_size
        self.request_timeout, self.recheck_every = request_timeout, recheck_every
        self.sendfile = sendfile

    async def handle(
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
            record = await self.check_token(request["token"], kernel_id)
            entry["token_id"] = record.token_id
            handler: Callable[..., Awaitable[dict[str, Any]]]
            handler = getattr(self, f"_op_{request['op']}")
            result = await handler(kernel_id, record, request, reader, writer)
            self.audit_decision(kernel_id, {**entry, **result}, "allow")
        except Refusal as refusal:
            self.audit_decision(kernel_id, entry, "deny", refusal.code, message=refusal.message)
            if refusal.detail is not None:
                level = logging.ERROR if refusal.code == "source-error" else logging.WARNING
                self.log.log(
                    level, kernel_id, "data broker: kernel %s: %s", kernel_id, refusal.detail
                )
            elif refusal.code in ("bad-request", "too-large"):
                self.log.warning(
                    kernel_id, "data broker: kernel %s: %s", kernel_id, refusal.message
                )
            await send_error(writer, refusal)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.audit_decision(kernel_id, entry, "error", "disconnected")
        except asyncio.TimeoutError:
            self.audit_decision(kernel_id, entry, "error", "timeout")
        except Exception as exc:  # one failed request must never take the broker down
            self.log.error(
                kernel_id, "data broker: kernel %s: %s failed", kernel_id, entry.get("op"), exc=exc
            )
            self.audit_decision(kernel_id, entry, "error", "internal")
            failure = Refusal("internal", "the data broker failed; see its log on the host")
            await send_error(writer, failure)

    def audit_decision(
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
            self.log.error(
                kernel_id, "data broker: cannot write the audit log %s: %s", self.audit.path, exc
            )

    async def check_token(self, token: str, kernel_id: str) -> TokenRecord:
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
            raise Refusal(
                "denied",
                "the data source refused access (see the host's log)",
                f"the source refused access: {exc}",
            ) from None
        except OSError as exc:
            raise Refusal(
                "source-error",
                "the data source failed (see the host's log)",
                f"source error: {exc}",
            ) from None

    def _checked(
        self, record: TokenRecord, request: Mapping[str, Any], write: bool
    ) -> tuple[str, Grant, list[str]]:
        """The dataset name, its grant and the path parts of a request, checked."""
        name = request.get("dataset")
        if not name:
            raise Refusal("bad-request", "malformed request: no dataset named")
        grant = record.scope.get(name)
        if grant is None:
            raise Refusal("scope", f"dataset {name!r} is not in this kernel's scope")
        if write and not grant.writable:
            raise Refusal("read-only", f"dataset {name!r} is read-only for this kernel")
        return name, grant, relative_parts(request.get("path", ""))

    async def _call(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        method: str,
        *args: Any,
        write: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """``source.method(parts, *args)`` on the checked dataset, in a worker thread; with
        the notes for the audit entry (``root: moved`` when a local root's path no longer
        names the directory granted, which is still the one served)."""
        name, grant, parts = self._checked(record, request, write)

        def run() -> tuple[Any, dict[str, Any]]:
            with self.sources.borrow(kernel_id, name, grant) as source:
                result = getattr(source, method)(parts, *args)
                if not getattr(source, "moved", False):
                    return result, {}
            log.warning(
                "data broker: kernel %s: dataset %s: %s no longer names the directory granted; "
                "serving the granted one",
                kernel_id,
                name,
                grant.source,
            )
            return result, {"root": "moved"}

        return await self._blocking(run)

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
        entries, notes = await self._call(kernel_id, record, request, "list")
        await send_json(writer, {"ok": True, "entries": entries})
        return {"entries": len(entries), **notes}

    async def _op_stat(
        self,
        kernel_id: str,
        record: TokenRecord,
        request: Mapping[str, Any],
        reader: StreamReader,
        writer: StreamWriter,
    ) -> dict[str, Any]:
        entry, notes = await self._call(kernel_id, record, request, "stat")
        await send_json(writer, {"ok": True, "entry": entry})
        return notes

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
        handle: Reader
        handle, notes = await self._call(kernel_id, record, request, "open_read", offset, length)
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
                    await self.check_token(request["token"], kernel_id)
                    recheck = time.monotonic() + self.recheck_every
            writer.write(END_FRAME)
            await writer.drain()
        finally:
            await asyncio.to_thread(handle.close)
        return {"bytes": sent, **notes}

    async def _copy_frame(self, writer: StreamWriter, handle: Reader) -> int:
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
        handle: Writer
        handle, notes = await self._call(kernel_id, record, request, "open_write", write=True)
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
                    await self.check_token(request["token"], kernel_id)
                    recheck = time.monotonic() + self.recheck_every
            size = await self._blocking(handle.commit)
            committed = True
        finally:
            if not committed:
                await asyncio.to_thread(handle.abort)
        await send_json(writer, {"ok": True, "size": size})
        return {"bytes": size, **notes}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

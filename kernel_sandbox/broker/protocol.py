"""The broker's end of the wire protocol of :mod:`kernel_sandbox.inside.wire` (one definition,
shared with the in-kernel client), and the one exception a request handler raises to refuse."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kernel_sandbox.inside.wire import (
    DATA,
    END,
    FRAME,
    JSON,
    MAX_CHUNK,
    MAX_MESSAGE,
    encode_frame,
    encode_json,
)

__all__ = ["Refusal", "read_frame", "read_request", "send_error", "send_json"]


class Refusal(Exception):
    """A request the broker will not serve: ``code`` goes to the kernel with ``message``.

    Codes: bad-request, too-large, bad-token, wrong-kernel, expired, revoked, scope, escape,
    read-only, not-found, is-a-directory, not-a-directory, denied, busy, source-error.
    ``detail``, when given, is for the owner's log only (clipped and held to the kernel's
    budget there: it may quote what the kernel sent).
    """

    def __init__(self, code: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


async def read_frame(
    reader: asyncio.StreamReader, max_json: int = MAX_MESSAGE, max_data: int = MAX_CHUNK
) -> tuple[bytes, bytes]:
    """One frame; its declared length is checked against the cap before anything is read.

    Raises:
        Refusal: an unknown kind (bad-request) or a frame over its cap (too-large).
        asyncio.IncompleteReadError: the peer closed the connection.
    """
    kind, length = FRAME.unpack(await reader.readexactly(FRAME.size))
    if kind not in (JSON, DATA, END):
        raise Refusal("bad-request", f"malformed request: unknown frame kind {kind!r}")
    cap = max_json if kind == JSON else max_data if kind == DATA else 0
    if length > cap:
        raise Refusal(
            "too-large",
            f"request refused: a {kind.decode()} frame of {length} bytes "
            f"is over the limit of {cap}",
        )
    return kind, await reader.readexactly(length) if length else b""


async def read_request(reader: asyncio.StreamReader, max_json: int = MAX_MESSAGE) -> dict[str, Any]:
    """The request at the start of a connection, checked for shape (not for permission)."""
    kind, payload = await read_frame(reader, max_json=max_json)
    if kind != JSON:
        raise Refusal("bad-request", "malformed request: expected a JSON frame first")
    try:
        request = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise Refusal("bad-request", "malformed request: not valid JSON") from None
    if not isinstance(request, dict):
        raise Refusal("bad-request", "malformed request: expected a JSON object")
    for key in ("op", "token"):
        if not isinstance(request.get(key), str):
            raise Refusal("bad-request", f"malformed request: {key!r} must be a string")
    for key in ("dataset", "path"):
        if key in request and not isinstance(request[key], str):
            raise Refusal("bad-request", f"malformed request: {key!r} must be a string")
    return request


async def send_json(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(encode_json(message))
    await writer.drain()


async def send_error(writer: asyncio.StreamWriter, refusal: Refusal) -> None:
    await send_json(writer, {"ok": False, "error": refusal.code, "message": refusal.message})


def data_frame_header(length: int) -> bytes:
    return FRAME.pack(DATA, length)


END_FRAME = encode_frame(END)

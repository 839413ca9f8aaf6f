"""The data broker's wire format, spoken by both ends: framing, limits and refusal codes.

A frame is a 1-byte kind (``J`` JSON, ``D`` data, ``E`` end) and a 4-byte big-endian length,
then the payload. A request is one JSON frame (``{"op": ..., "token": ..., ...}``); a reply
is a JSON frame ``{"ok": true, ...}`` or ``{"ok": false, "error": CODE, "message": ...}``,
where CODE names one of the exceptions below (the in-kernel client raises it). Standard
library only: the kernel's client (:mod:`.data`) and the host's broker both import it.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = [
    "DATA",
    "END",
    "FRAME",
    "JSON",
    "MAX_CHUNK",
    "MAX_MESSAGE",
    "OPS",
    "PROTOCOL_VERSION",
    "WRITE_CHUNK",
    "AccessDenied",
    "BrokerUnavailable",
    "DataError",
    "DataIsADirectory",
    "DataNotADirectory",
    "DataNotFound",
    "NotInScope",
    "PathEscape",
    "ProtocolError",
    "ReadOnly",
    "TokenExpired",
    "TokenInvalid",
    "TokenRevoked",
    "encode_frame",
    "encode_json",
    "error_from_reply",
    "expect_ok",
    "recv_exactly",
    "recv_header",
    "recv_json",
]

PROTOCOL_VERSION = 1
FRAME = struct.Struct(">cI")
JSON, DATA, END = b"J", b"D", b"E"
MAX_MESSAGE = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024
WRITE_CHUNK = 1024 * 1024
OPS = ("scope", "list", "stat", "read", "write")


# -- errors ---------------------------------------------------------------------------------


class DataError(Exception):
    """Base class of every error raised by the data client."""

    code = "error"


class BrokerUnavailable(DataError, ConnectionError):
    """This kernel has no data broker (its policy grants no datasets), or it went away."""

    code = "unavailable"


class AccessDenied(DataError, PermissionError):
    """The broker refused the request."""

    code = "denied"


class TokenRevoked(AccessDenied):
    code = "revoked"


class TokenExpired(AccessDenied):
    code = "expired"


class TokenInvalid(AccessDenied):
    code = "bad-token"


class NotInScope(AccessDenied):
    code = "scope"


class PathEscape(AccessDenied):
    code = "escape"


class ReadOnly(AccessDenied):
    code = "read-only"


class DataNotFound(DataError, FileNotFoundError):
    code = "not-found"


class DataIsADirectory(DataError, IsADirectoryError):
    code = "is-a-directory"


class DataNotADirectory(DataError, NotADirectoryError):
    code = "not-a-directory"


class ProtocolError(DataError, RuntimeError):
    code = "bad-request"


_ERRORS: dict[str, type[DataError]] = {
    cls.code: cls
    for cls in (
        AccessDenied,
        TokenRevoked,
        TokenExpired,
        TokenInvalid,
        NotInScope,
        PathEscape,
        ReadOnly,
        DataNotFound,
        DataIsADirectory,
        DataNotADirectory,
        ProtocolError,
    )
}
_ERRORS["wrong-kernel"] = TokenInvalid
_ERRORS["too-large"] = ProtocolError


def error_from_reply(reply: dict[str, Any]) -> DataError:
    """The exception for a broker's ``{"ok": false, "error": CODE, "message": ...}``."""
    code = str(reply.get("error", "error"))
    cls = _ERRORS.get(code, DataError)
    return cls(str(reply.get("message") or code))


# -- framing (shared with the broker) -------------------------------------------------------


def encode_frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def encode_json(message: dict[str, Any]) -> bytes:
    return encode_frame(JSON, json.dumps(message, separators=(",", ":")).encode())


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise BrokerUnavailable("the data broker closed the connection")
        got += n
    return bytes(buf)


def recv_header(sock: socket.socket) -> tuple[bytes, int]:
    kind, length = FRAME.unpack(recv_exactly(sock, FRAME.size))
    return kind, length


def recv_json(sock: socket.socket, kind: bytes, length: int) -> dict[str, Any]:
    if kind != JSON or length > MAX_MESSAGE:
        raise ProtocolError(f"unexpected frame {kind!r} ({length} bytes) from the data broker")
    reply = json.loads(recv_exactly(sock, length))
    if not isinstance(reply, dict):
        raise ProtocolError("the data broker sent a reply that is not a JSON object")
    return reply


def expect_ok(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise error_from_reply(reply)
    return reply

"""A minimal ZMTP 3.0 SUB reader (NULL mechanism) that never buffers more than its limits.

libzmq counts its high-water marks in complete messages and keeps an incomplete multi-part
message whatever its size; ``ZMQ_MAXMSGSIZE`` bounds one frame, not a message of many frames.
So a host-side SUB socket lets a kernel make the host hold as much as it sends. This reader
speaks the wire protocol itself (rfc.zeromq.org/spec/23) over a unix socket on asyncio and
enforces :class:`Limits` while reading: a message that would pass them is discarded as it
streams (frames are read in small chunks and dropped), and only a :class:`Dropped` summary is
kept. Bytes held at any time: the message being assembled (<= ``max_bytes``, each frame
counted with :data:`FRAME_OVERHEAD`; a large frame is read straight into its own buffer) plus
a few chunks.

Only what a PUB peer sends a SUB is supported: a greeting, a READY command, then messages
(other commands are skipped). The greeting offers version 3.0, so libzmq takes the
subscription as a message (``\\x01`` + prefix).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FRAME_OVERHEAD",
    "Dropped",
    "Limits",
    "ProtocolError",
    "ZmtpSubReader",
    "open_unix_socket",
]

FRAME_OVERHEAD = 64  # bytes each frame costs on top of its payload (object, list slot)
CHUNK = 256 * 1024  # what is read at once while discarding (and the stream buffer)
MAX_COMMAND = 64 * 1024  # a READY command (or any other) is small
MAX_PARENT = 1024 * 1024  # a parent header larger than this is not parsed
DELIMITER = b"<IDS|MSG>"
_FLAG_MORE, _FLAG_LONG, _FLAG_COMMAND = 0x01, 0x02, 0x04
_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32


class ProtocolError(ConnectionError):
    """The peer broke ZMTP (or is not a PUB socket); the connection is unusable."""


@dataclass(frozen=True)
class Limits:
    """What one message may hold: ``max_bytes`` (payload plus FRAME_OVERHEAD per frame) and
    ``max_frames``."""

    max_bytes: int
    max_frames: int = 4096


@dataclass
class Dropped:
    """A message discarded while it streamed: its size as announced, and the parent header
    (of a Jupyter message) when the frames before the first over-limit one carried it."""

    size: int
    frames: int
    reason: str  # "size" or "frames"
    parent: dict[str, Any] | None = field(default=None)


def open_unix_socket(path: str, owner: int | None = None) -> socket.socket:
    """Connect to the unix socket at ``path`` without following a link at its last component,
    and only if it is a socket (of uid ``owner``, if given): a kernel can replace what is in
    its directory.

    Raises:
        OSError: not a socket (of that owner), gone, or refused.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode):
            raise OSError(f"{path} is not a socket")
        if owner is not None and info.st_uid != owner:
            raise OSError(f"{path} belongs to uid {info.st_uid}, not {owner}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(f"/proc/self/fd/{fd}")  # the inode we checked, whatever raced
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(fd)
    sock.setblocking(False)
    return sock


def parent_header(frames: Sequence[bytes | bytearray]) -> dict[str, Any] | None:
    """The parent header of a Jupyter message's frames, if they reach that far."""
    try:
        at = frames.index(DELIMITER)
        raw = frames[at + 3]
        if len(raw) > MAX_PARENT:
            return None
        value = json.loads(raw)
    except (ValueError, IndexError):
        return None
    return value if isinstance(value, dict) else None


class ZmtpSubReader:
    """One ZMTP connection to a PUB socket, subscribed to everything.

    Args:
        reader, writer: an asyncio stream over the connected socket.
        limits: what one message may hold.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits):
        self.reader, self.writer, self.limits = reader, writer, limits
        self._buffer = bytearray()  # read, not yet parsed from self._at on
        self._at = 0

    @classmethod
    async def connect(cls, path: str, limits: Limits, owner: int | None = None) -> ZmtpSubReader:
        """Connect to the PUB socket at ``path`` (see :func:`open_unix_socket`) and subscribe
        to all messages.

        Raises:
            OSError: no socket there (yet), refused; ProtocolError: not a ZMTP PUB.
        """
        sock = open_unix_socket(path, owner)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=CHUNK)
        self = cls(reader, writer, limits)
        try:
            await self._handshake()
        except BaseException:
            self.close()
            raise
        return self

    async def _handshake(self) -> None:
        self.writer.write(_GREETING)
        greeting = await self._exactly(64)
        if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
            raise ProtocolError("not a ZMTP 3 peer")
        if greeting[12:32].rstrip(b"\0") != b"NULL":
            raise ProtocolError("peer wants a security mechanism other than NULL")
        self.writer.write(_command(b"READY", {b"Socket-Type": b"SUB"}))
        flags, size = await self._frame_head()
        if not flags & _FLAG_COMMAND or size > MAX_COMMAND:
            raise ProtocolError("peer sent no READY command")
        body = await self._exactly(size)
        if body[:6] != b"\x05READY" or _properties(body[6:]).get(b"socket-type") not in (
            b"PUB",
            b"XPUB",
        ):
            raise ProtocolError("peer is not a PUB socket")
        self.writer.write(b"\x00\x01\x01")  # subscribe to every prefix
        await self.writer.drain()

    async def _fill(self, size: int) -> None:
        """Have ``size`` unread bytes in the buffer (reading at most CHUNK beyond them)."""
        while len(self._buffer) - self._at < size:
            if self._at:
                del self._buffer[: self._at]
                self._at = 0
            chunk = await self.reader.read(max(CHUNK, size - len(self._buffer)))
            if not chunk:
                raise ConnectionResetError("peer closed the connection")
            self._buffer += chunk

    async def _exactly(self, size: int) -> bytes | bytearray:
        """The next ``size`` bytes: small ones from the buffer, large ones read straight into
        a bytearray of their own (held once, not copied)."""
        if size <= CHUNK:
            await self._fill(size)
            with memoryview(self._buffer) as view:
                data = bytes(view[self._at : self._at + size])
            self._at += size
            return data
        frame = bytearray(size)
        with memoryview(frame) as target:
            have = min(size, len(self._buffer) - self._at)
            target[:have] = self._buffer[self._at : self._at + have]
            self._at += have
            while have < size:
                chunk = await self.reader.read(min(size - have, 4 * CHUNK))
                if not chunk:
                    raise ConnectionResetError("peer closed the connection")
                target[have : have + len(chunk)] = chunk
                have += len(chunk)
        return frame

    async def _frame_head(self) -> tuple[int, int]:
        await self._fill(2)
        flags = self._buffer[self._at]
        if flags & _FLAG_LONG:
            await self._fill(9)
            (size,) = struct.unpack_from(">Q", self._buffer, self._at + 1)
            self._at += 9
        else:
            size = self._buffer[self._at + 1]
            self._at += 2
        return flags, size

    async def _discard(self, size: int) -> None:
        have = min(size, len(self._buffer) - self._at)
        self._at += have
        size -= have
        while size > 0:
            chunk = await self.reader.read(min(size, 4 * CHUNK))
            if not chunk:
                raise ConnectionResetError("peer closed the connection")
            size -= len(chunk)

    async def receive(self) -> list[bytes | bytearray] | Dropped:
        """The next message's frames, or a :class:`Dropped` for one that broke the limits
        (its frames were read and discarded).

        Raises:
            ConnectionError: the peer closed the connection (even in mid-message).
        """
        frames: list[bytes | bytearray] = []
        held, count, size = 0, 0, 0
        dropped: Dropped | None = None
        while True:
            flags, length = await self._frame_head()
            if flags & _FLAG_COMMAND:  # e.g. a PING: no part of any message
                await self._discard(length)
                continue
            count += 1
            size += length
            if dropped is None:
                cost = length + FRAME_OVERHEAD
                if count > self.limits.max_frames:
                    dropped = Dropped(0, 0, "frames", parent_header(frames))
                elif held + cost > self.limits.max_bytes:
                    dropped = Dropped(0, 0, "size", parent_header(frames))
                else:
                    frames.append(await self._exactly(length))
                    held += cost
                if dropped is not None:
                    frames = []
            if dropped is not None:
                await self._discard(length)
            if not flags & _FLAG_MORE:
                break
        if dropped is not None:
            dropped.size, dropped.frames = size, count
            return dropped
        return frames

    def close(self) -> None:
        self.writer.close()


def _command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes([len(name)]) + name
    for key, value in properties.items():
        body += bytes([len(key)]) + key + struct.pack(">I", len(value)) + value
    if len(body) > 255:
        return bytes([_FLAG_COMMAND | _FLAG_LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([_FLAG_COMMAND, len(body)]) + body


def _properties(data: bytes | bytearray) -> dict[bytes, bytes]:
    """A command's properties (names lower-cased); malformed input raises ProtocolError."""
    found: dict[bytes, bytes] = {}
    at = 0
    try:
        while at < len(data):
            name_len = data[at]
            name = data[at + 1 : at + 1 + name_len]
            at += 1 + name_len
            (value_len,) = struct.unpack(">I", data[at : at + 4])
            found[bytes(name).lower()] = bytes(data[at + 4 : at + 4 + value_len])
            at += 4 + value_len
    except (IndexError, struct.error) as exc:
        raise ProtocolError("malformed command properties") from exc
    return found

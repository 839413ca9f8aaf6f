"""Datasets in a sandboxed kernel, served by the host's data broker through a scoped token.

Runs INSIDE the sandbox (it is copied into the kernel image): standard library only; the
``sandbox://`` fsspec filesystem is registered only when fsspec happens to be installed.
The wire format both ends speak is :mod:`kernel_sandbox.inside.wire`; the host side
(:mod:`kernel_sandbox.broker`) imports it from there. ::

    from kernel_sandbox import data
    data.datasets()                          # {'sales': 'read'}: what this kernel may see
    data.ls("sales")                         # ['sales/2024.csv', ...]
    data.info("sales/2024.csv")              # {'name': ..., 'type': 'file', 'size': ...}
    with data.open("sales/2024.csv") as f:   # text or binary mode, as with open()
        header = f.readline()
    pandas.read_csv("sandbox://sales/2024.csv")   # through fsspec, when installed

The kernel never holds a credential: only an opaque token (the file ``data-token`` in the
runtime directory) that the broker accepts on this kernel's own socket (``data.sock``), for
the datasets and access its policy grants, until it expires or is revoked.

Protocol (one request per connection over the unix socket)::

    frame    = kind (1 byte) + length (4 bytes, big-endian) + payload
    kind     = b"J" a JSON object (at most MAX_MESSAGE bytes)
             | b"D" a chunk of file data (at most MAX_CHUNK bytes)
             | b"E" end of data (empty)
    request  = J {"v": 1, "op": OP, "token": ..., "dataset": ..., "path": ..., ...}
    reply    = J {"ok": true, ...} | J {"ok": false, "error": CODE, "message": ...}
    read     = request {"offset": N, "length": N|null} -> J ok {"size"} D* (E | J error)
    write    = request -> J ok -> the client sends D* E -> J ok {"size"} | J error
    OP       = scope | list | stat | read | write

Errors, each a builtin too, so ``except FileNotFoundError`` works as usual::

    DataError                              base of everything below
    ├── BrokerUnavailable (ConnectionError)   no broker for this kernel, or it went away
    ├── AccessDenied (PermissionError)        the broker refused the request
    │   ├── TokenRevoked                      "token revoked"
    │   ├── TokenExpired                      "token expired"
    │   ├── TokenInvalid                      unknown token, or another kernel's
    │   ├── NotInScope                        "dataset 'x' is not in this kernel's scope"
    │   ├── PathEscape                        "path leaves the dataset"
    │   └── ReadOnly                          "dataset 'x' is read-only for this kernel"
    ├── DataNotFound (FileNotFoundError)
    ├── DataIsADirectory (IsADirectoryError)
    ├── DataNotADirectory (NotADirectoryError)
    └── ProtocolError (RuntimeError)          a malformed, oversized or failed exchange
"""

from __future__ import annotations

import io
import os
import socket
from typing import Any

from kernel_sandbox.inside.contract import (
    DATA_SOCKET,
    DATA_TOKEN,
    HOST_SOCKETS_MOUNT,
    RUNTIME_MOUNT,
)
from kernel_sandbox.inside.sandbox_fs import register_fsspec
from kernel_sandbox.inside.wire import (
    DATA,
    END,
    FRAME,
    MAX_CHUNK,
    PROTOCOL_VERSION,
    WRITE_CHUNK,
    AccessDenied,
    BrokerUnavailable,
    DataError,
    DataIsADirectory,
    DataNotADirectory,
    DataNotFound,
    NotInScope,
    PathEscape,
    ProtocolError,
    ReadOnly,
    TokenExpired,
    TokenInvalid,
    TokenRevoked,
    encode_frame,
    encode_json,
    error_from_reply,
    expect_ok,
    recv_exactly,
    recv_header,
    recv_json,
)

__all__ = [
    "AccessDenied",
    "BrokerUnavailable",
    "Client",
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
    "datasets",
    "info",
    "ls",
    "open",
    "read_bytes",
]

_builtin_open = open


# -- the client -----------------------------------------------------------------------------


def split_path(path: str) -> tuple[str, str]:
    """``"sales/2024/q1.csv"`` -> ``("sales", "2024/q1.csv")``; ``sandbox://`` is optional.

    Only the dataset name is split off: the rest goes to the broker as it is, and the broker
    alone decides whether it stays inside the dataset.
    """
    if not isinstance(path, str):
        path = os.fspath(path)
    if path.startswith("sandbox://"):
        path = path[len("sandbox://") :]
    dataset, _, rest = path.partition("/")
    if not dataset:
        raise PathEscape(
            f"{path!r}: path leaves the dataset (name a dataset first, e.g. 'sales/2024.csv')"
        )
    return dataset, rest


def _host_path(name: str) -> str:
    """Where the host put ``name``: its read-only part (hosts since the move), else the
    runtime directory itself (older hosts)."""
    path = f"{HOST_SOCKETS_MOUNT}/{name}"
    return path if os.path.lexists(path) else f"{RUNTIME_MOUNT}/{name}"


class Client:
    """Talks to this kernel's data broker; one short connection per request.

    ``socket_path`` and ``token_file`` default to the ones in the runtime directory; a
    ``token`` given here is used instead of the file's.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        timeout: float = 120.0,
    ):
        self.socket_path = socket_path or _host_path(DATA_SOCKET)
        self.token_file = token_file or _host_path(DATA_TOKEN)
        self._token = token
        self.timeout = timeout

    def token(self) -> str:
        """The token to present: read from the token file on every request (never cached)."""
        if self._token is not None:
            return self._token
        try:
            with _builtin_open(self.token_file) as handle:
                return handle.read().strip()
        except FileNotFoundError:
            raise BrokerUnavailable(
                "this kernel has no data token: its policy grants no datasets (ask for a "
                "kernelspec with `datasets`, e.g. `kernel-sandbox install --dataset "
                "sales=/srv/sales:read`)"
            ) from None

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(
                f"cannot reach the data broker at {self.socket_path} ({exc.strerror or exc}); "
                "it runs in the process that started this kernel"
            ) from None
        return sock

    def start(
        self, op: str, dataset: str | None = None, path: str = "", **fields: Any
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Send a request; return the open connection and the broker's first (ok) reply."""
        message = {"v": PROTOCOL_VERSION, "op": op, "token": self.token(), **fields}
        if dataset is not None:
            message.update(dataset=dataset, path=path)
        sock = self.connect()
        try:
            sock.sendall(encode_json(message))
            reply = expect_ok(recv_json(sock, *recv_header(sock)))
        except BaseException:
            sock.close()
            raise
        return sock, reply

    def request(
        self, op: str, dataset: str | None = None, path: str = "", **fields: Any
    ) -> dict[str, Any]:
        sock, reply = self.start(op, dataset, path, **fields)
        sock.close()
        return reply

    # -- the user's surface ---------------------------------------------------------------

    def datasets(self) -> dict[str, str]:
        """The datasets this kernel may use, with their access ('read' or 'read-write')."""
        return dict(self.request("scope")["datasets"])

    def ls(self, path: str = "", detail: bool = False) -> list[Any]:
        """Entries of a directory (``"sales"`` or ``"sales/2024"``); ``""`` lists datasets."""
        if not str(path).removeprefix("sandbox://").strip("/"):
            names = sorted(self.datasets())
            if detail:
                return [{"name": n, "type": "directory", "size": 0} for n in names]
            return names
        dataset, rest = split_path(path)
        entries = self.request("list", dataset, rest)["entries"]
        prefix = "/".join(p for p in (dataset, rest.strip("/")) if p)
        for entry in entries:
            entry["name"] = f"{prefix}/{entry['name']}"
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str) -> dict[str, Any]:
        """``{"name", "type" ('file' or 'directory'), "size", "mtime"}`` of one path."""
        dataset, rest = split_path(path)
        entry = self.request("stat", dataset, rest)["entry"]
        entry["name"] = "/".join(p for p in (dataset, rest.strip("/")) if p)
        return entry

    def read_bytes(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        """The bytes of a file (or of ``[start, end)``), streamed from the broker."""
        dataset, rest = split_path(path)
        length = None if end is None else max(0, end - start)
        sock, _ = self.start("read", dataset, rest, offset=start, length=length)
        with sock:
            parts = []
            while (chunk := _next_chunk(sock)) is not None:
                parts.append(chunk)
        return b"".join(parts)

    def open(
        self,
        path: str,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object, as the built-in ``open`` gives: modes r, rb, w, wb (rt, wt)."""
        kind = mode.replace("t", "")
        if kind not in ("r", "rb", "w", "wb"):
            raise ValueError(f"mode {mode!r} is not supported (use r, rb, w or wb)")
        binary = "b" in mode
        if binary and (encoding or errors or newline):
            raise ValueError("binary mode does not take an encoding, errors or newline argument")
        dataset, rest = split_path(path)
        size = buffering if buffering > 1 else 256 * 1024
        raw: io.RawIOBase
        if kind.startswith("r"):
            entry = self.request("stat", dataset, rest)["entry"]
            if entry["type"] == "directory":
                raise DataIsADirectory(f"{path!r} is a directory")
            raw = _Reader(self, dataset, rest, int(entry["size"]), path)
            buffered: io.BufferedIOBase = io.BufferedReader(raw, buffer_size=size)
        else:
            raw = _Writer(self, dataset, rest, path)
            buffered = io.BufferedWriter(raw, buffer_size=max(size, WRITE_CHUNK))
        if binary:
            return buffered
        return io.TextIOWrapper(
            buffered, encoding=encoding or "utf-8", errors=errors, newline=newline
        )


def _next_chunk(sock: socket.socket) -> bytes | None:
    kind, length = recv_header(sock)
    if kind == DATA and length <= MAX_CHUNK:
        return recv_exactly(sock, length)
    if kind == END:
        return None
    raise error_from_reply(recv_json(sock, kind, length))


class _Reader(io.RawIOBase):
    """A seekable file streamed from the broker: one read request from the current position
    to the end, restarted at the new position after a seek."""

    def __init__(self, client: Client, dataset: str, path: str, size: int, name: str):
        super().__init__()
        self._client, self._dataset, self._path = client, dataset, path
        self.size, self.name = size, name
        self._pos = 0
        self._sock: socket.socket | None = None
        self._left_in_frame = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        target = base + offset
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target != self._pos:
            self._stop()
            self._pos = target
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        if self._sock is None:
            if self._pos >= self.size and self._eof:
                return 0
            self._sock, _ = self._client.start(
                "read", self._dataset, self._path, offset=self._pos, length=None
            )
            self._eof = False
        while self._left_in_frame == 0:
            if self._eof:
                return 0
            kind, length = recv_header(self._sock)
            if kind == END:
                self._eof = True
                return 0
            if kind != DATA or length > MAX_CHUNK:
                raise error_from_reply(recv_json(self._sock, kind, length))
            self._left_in_frame = length
        n = self._sock.recv_into(view[: min(len(view), self._left_in_frame)])
        if n == 0:
            raise BrokerUnavailable("the data broker closed the connection during a read")
        self._left_in_frame -= n
        self._pos += n
        return n

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._left_in_frame = 0
        self._eof = False

    def close(self) -> None:
        self._stop()
        super().close()


class _Writer(io.RawIOBase):
    """A file written through the broker; it appears (atomically) when closed."""

    def __init__(self, client: Client, dataset: str, path: str, name: str):
        super().__init__()
        self.name = name
        self._sock: socket.socket | None
        self._sock, _ = client.start("write", dataset, path)
        self.size: int | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._sock is None:
            raise ValueError("write to a closed file")
        view = memoryview(data).cast("B")
        for start in range(0, len(view), MAX_CHUNK):
            chunk = view[start : start + MAX_CHUNK]
            self._sock.sendall(FRAME.pack(DATA, len(chunk)))
            self._sock.sendall(chunk)
        return len(view)

    def close(self) -> None:
        if self.closed:
            return
        sock, self._sock = self._sock, None
        try:
            super().close()  # flushes nothing (raw), marks closed
            if sock is not None:
                sock.sendall(encode_frame(END))
                reply = expect_ok(recv_json(sock, *recv_header(sock)))
                self.size = int(reply.get("size", 0))
        finally:
            if sock is not None:
                sock.close()


# -- module-level shortcuts (the default client of this kernel) -----------------------------

_default: Client | None = None


def client() -> Client:
    """This kernel's client (created on first use, so importing this module does nothing)."""
    global _default
    if _default is None:
        _default = Client()
    return _default


def datasets() -> dict[str, str]:
    return client().datasets()


def ls(path: str = "", detail: bool = False) -> list[Any]:
    return client().ls(path, detail)


def info(path: str) -> dict[str, Any]:
    return client().info(path)


def read_bytes(path: str, start: int = 0, end: int | None = None) -> bytes:
    return client().read_bytes(path, start, end)


def open(
    path: str,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,  # noqa: A001
    errors: str | None = None,
    newline: str | None = None,
) -> Any:
    return client().open(path, mode, buffering, encoding, errors, newline)


ls.__doc__, info.__doc__, open.__doc__ = Client.ls.__doc__, Client.info.__doc__, Client.open.__doc__
datasets.__doc__, read_bytes.__doc__ = Client.datasets.__doc__, Client.read_bytes.__doc__


# ``sandbox://DATASET/PATH`` for pandas and every fsspec user, when fsspec is installed.
register_fsspec(client)

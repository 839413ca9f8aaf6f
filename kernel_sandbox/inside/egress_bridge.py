"""Runs INSIDE the sandbox: the loopback bridge to the host-side egress proxy, and the kernel
extension that shows egress denials in the cell that caused them.

``python -m kernel_sandbox.inside.egress_bridge 127.0.0.1:PORT SOCKET -- ARGV...``

binds ``127.0.0.1:PORT`` on the container's loopback (its only interface), forks a child that
forwards every connection to the unix socket SOCKET (the kernel's proxy, on the host), and
execs ARGV. The bridge decides nothing: it only carries bytes; the proxy on the host decides.
If the proxy is gone, a client gets a 502 answer, never another way out.

As an IPython extension (``--ext=kernel_sandbox.inside.egress_bridge``) it reads the proxy's notices
from ``$KERNEL_SANDBOX_EGRESS_NOTICES`` and prints each on stderr of the running cell.
Standard library only: it runs in the kernel image.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

CHUNK = 256 * 1024
_GONE = b"egress proxy unavailable: this kernel's host-side proxy is not running\n"
UNAVAILABLE = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_GONE), _GONE)
)


# -- the bridge -----------------------------------------------------------------------------


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _relay(
    proxy_path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(proxy_path)
    except OSError:
        with contextlib.suppress(OSError):
            writer.write(UNAVAILABLE)
            await writer.drain()
        writer.close()
        return
    try:
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
    finally:
        up_writer.close()
        writer.close()


async def _serve(listener: socket.socket, proxy_path: str, parent: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: _relay(proxy_path, r, w), sock=listener, limit=CHUNK
    )
    async with server:
        while os.getppid() == parent:  # end with the process that started us
            await asyncio.sleep(2)


def bridge(listener: socket.socket, proxy_path: str) -> None:
    """Serve the bridge until the parent process ends (call in a forked child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are meant for the kernel
    asyncio.run(_serve(listener, proxy_path, os.getppid()))


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(
            "usage: python -m kernel_sandbox.inside.egress_bridge HOST:PORT SOCKET -- ARGV...",
            file=sys.stderr,
        )
        return 2
    host, _, port = argv[0].rpartition(":")
    proxy_path, command = argv[1], argv[3:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))  # bound before the kernel starts: no race
    listener.listen(128)
    if os.fork() == 0:
        try:
            bridge(listener, proxy_path)
        finally:
            os._exit(0)
    listener.close()
    os.execvp(command[0], command)
    return 127  # not reached


# -- the notice extension -------------------------------------------------------------------


class Notices:
    """Read the proxy's notices and print each one on the kernel's stderr."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def _read_available(self, timeout: float) -> None:
        """Print every complete notice that has arrived (waiting at most ``timeout``)."""
        sock = self.sock
        if sock is None:
            return
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
            while ready:
                data = sock.recv(65536)
                if not data:
                    raise OSError("closed")
                self.buffer += data
                ready, _, _ = select.select([sock], [], [], 0)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sock.close()
            self.sock = None
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                message = json.loads(line).get("message")
                if message:
                    print(message, file=sys.stderr, flush=True)

    def run(self) -> None:
        while True:
            if self.sock is None:
                self.sock = self._connect()
                if self.sock is None:
                    time.sleep(1.0)
                    continue
            with contextlib.suppress(OSError, ValueError):
                select.select([self.sock], [], [], 1.0)
            with self.lock:
                self._read_available(0)

    def drain(self, *_: Any) -> None:
        """At the end of a cell: print what arrived, so a denial shows in its own cell."""
        with self.lock:
            self._read_available(0)


def load_ipython_extension(ipython: Any) -> None:
    path = os.environ.get("KERNEL_SANDBOX_EGRESS_NOTICES")
    if not path:
        return
    notices = Notices(path)
    notices.sock = notices._connect()
    ipython.events.register("post_run_cell", notices.drain)
    threading.Thread(target=notices.run, name="kernel-sandbox-egress-notices", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

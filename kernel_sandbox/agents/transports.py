"""How ``kernel-sandbox mcp`` is reached: stdio, or streamable HTTP (optionally behind a
bearer token).

Over stdio the SDK reads stdin in a worker thread, which a stopped server (SIGTERM) would wait
for until the client closes the pipe; :func:`serve_stdio` reads it in the event loop instead,
so SIGTERM ends the server as soon as its kernels are shut down. Like the SDK, it points fd 0
at the null device while serving, so no child process can read the protocol stream.

HTTP is served by uvicorn on the SDK's Starlette app, which turns on DNS rebinding protection
(Host and Origin must be local) when it listens on a loopback address; :class:`BearerToken`
adds the operator's token check in front of it, compared in constant time.
"""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

from kernel_sandbox.agents.options import ServerOptions

__all__ = ["BearerToken", "serve", "serve_stdio"]

MAX_LINE = 64 * 1024 * 1024  # bytes of one JSON-RPC message on stdin (a write_file's content)


async def serve(server: MCPServer[Any], options: ServerOptions) -> None:
    """Serve until stdin closes (stdio) or the process is stopped (http)."""
    if options.transport == "stdio":
        await serve_stdio(server)
        return
    import uvicorn

    app: Any = server.streamable_http_app(
        host=options.host, session_idle_timeout=options.session_idle_timeout
    )
    if options.token:
        app = BearerToken(app, options.token)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning")
    await uvicorn.Server(config).serve()


class BearerToken:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer TOKEN``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = (
                    b'{"error": "missing or wrong bearer token (kernel-sandbox mcp --token-file)"}'
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def serve_stdio(server: MCPServer[Any]) -> None:
    """The SDK's stdio transport, with stdin read in the event loop when it is a pipe or a
    socket (else the SDK's own reader)."""
    mode = os.fstat(0).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        await server.run_stdio_async()
        return
    private = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    saved = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        lowlevel = server._lowlevel_server  # what MCPServer.run_stdio_async runs
        async with stdio_server(stdin=_Lines(private)) as (read, write):  # type: ignore[arg-type]
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
    finally:
        os.dup2(saved, 0)
        os.close(saved)


class _Lines:
    """The lines of a pipe, read by the event loop (an ``async for`` source for the SDK)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        pipe = os.fdopen(self.fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as end:
                    if end.partial.strip():
                        yield end.partial.decode("utf-8", "replace")
                    return
                except asyncio.LimitOverrunError as exc:
                    await reader.readexactly(exc.consumed)  # drop the oversized message
                    yield "{}"  # an invalid message: the client gets an error, not silence
                    continue
                yield line.decode("utf-8", "replace")
        finally:
            transport.close()

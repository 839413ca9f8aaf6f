"""How ``kernel-sandbox mcp`` is reached: stdio, or streamable HTTP (optionally behind a
bearer token).

HTTP is served by uvicorn on the SDK's Starlette app, which turns on DNS rebinding protection
(Host and Origin must be local) when it listens on a loopback address; :class:`BearerToken`
adds the operator's token check in front of it, compared in constant time.
"""

from __future__ import annotations

import hmac
from typing import Any

from mcp.server.mcpserver import MCPServer

from kernel_sandbox.agents.options import ServerOptions

__all__ = ["BearerToken", "serve"]


async def serve(server: MCPServer[Any], options: ServerOptions) -> None:
    """Serve until stdin closes (stdio) or the process is stopped (http)."""
    if options.transport == "stdio":
        await server.run_stdio_async()
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

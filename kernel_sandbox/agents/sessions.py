"""One sandboxed kernel per MCP session, shut down when the session ends.

An MCP session is a connection of the ``mcp`` SDK: the one stdio connection of the process,
or one streamable-HTTP session (``Mcp-Session-Id``). Its kernel is started at the first tool
call that needs it and kept in the connection's state; the connection's exit stack (unwound
by the SDK however the session ends: the client closing stdin or deleting the session, an
idle timeout, the server stopping) hands it to :class:`Sessions`, whose task group shuts it
down outside the SDK's short, bounded teardown. Leaving the server waits for every shutdown.

The SDK gives tools the connection only through its request session (``_connection``, the
per-connection state its docs tell handlers to use): :func:`connection_of` is the one place
that reaches it, and refuses clearly if an SDK release moves it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from kernel_sandbox.agents.kernel import SandboxKernel
from kernel_sandbox.agents.options import ServerOptions

__all__ = ["SessionState", "Sessions", "connection_of"]

STATE_KEY = "kernel_sandbox.session"
SHUTDOWN_LIMIT = 120.0  # seconds one kernel's shutdown may take before it is abandoned
log = logging.getLogger(__name__)


class NoSession(RuntimeError):
    """The request has no session to keep a kernel in (the server turns it into a tool
    error)."""


@dataclass
class SessionState:
    """What one MCP session holds: its kernel and the egress requests it made."""

    kernel: SandboxKernel
    egress_requests: list[dict[str, Any]] = field(default_factory=list)


def connection_of(ctx: Any) -> Any:
    """The SDK's per-connection object (``state`` and ``exit_stack``) of a tool call."""
    session = getattr(getattr(ctx, "request_context", None), "session", None)
    connection = getattr(session, "_connection", None)
    if connection is None or not hasattr(connection, "state"):
        raise NoSession(
            "this mcp SDK does not give tools the connection's state; kernel-sandbox mcp "
            "needs mcp>=2.3,<3"
        )
    return connection


class Sessions:
    """The kernels of the open sessions, and the task group that shuts them down."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.open: set[SandboxKernel] = set()
        self._tg: anyio.abc.TaskGroup | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Sessions]:
        """While the server serves; on the way out, every kernel is shut down."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield self
            finally:
                for kernel in list(self.open):
                    tg.start_soon(self._shutdown, kernel)
                self._tg = None

    def state(self, ctx: Any) -> SessionState:
        """The calling session's state, made (with a kernel not yet started) at first use."""
        connection = connection_of(ctx)
        state = connection.state.get(STATE_KEY)
        if state is not None:
            return state  # type: ignore[no-any-return]
        if self.options.transport == "http" and getattr(connection, "session_id", None) is None:
            raise NoSession(
                "this server keeps a kernel per MCP session, and this request has none; "
                "connect with a session (the initialize handshake, protocol 2025-11-25 or "
                "earlier) instead of stateless requests"
            )
        kernel = SandboxKernel(
            self.options.kernel,
            self.options.config,
            self.options.workspace,
            self.options.startup_timeout,
        )
        state = SessionState(kernel)
        connection.state[STATE_KEY] = state
        self.open.add(kernel)
        connection.exit_stack.push_async_callback(self._ended, kernel)
        return state

    async def _ended(self, kernel: SandboxKernel) -> None:
        """The session is over (called in the SDK's teardown: hand the work off, at once)."""
        if self._tg is not None:
            self._tg.start_soon(self._shutdown, kernel)
        else:
            await self._shutdown(kernel)

    async def _shutdown(self, kernel: SandboxKernel) -> None:
        if kernel not in self.open:
            return
        self.open.discard(kernel)
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_LIMIT):
            await kernel.shutdown()

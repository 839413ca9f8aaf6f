"""``Sandbox``: the blocking twin of :class:`~kernel_sandbox.api.sandbox.AsyncSandbox`.

Not a second implementation: each call runs the async one on an event loop of the sandbox's
own, in a thread of its own, so a ``Sandbox`` works the same from a plain script, a thread,
or code that already runs an event loop (a notebook, an async agent framework).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import IO, Any, TypeVar

from kernel_sandbox.api.results import RunResult
from kernel_sandbox.api.sandbox import DEFAULT, AsyncSandbox

__all__ = ["Sandbox"]

T = TypeVar("T")


class Sandbox:
    """One sandboxed kernel: ``with Sandbox(profile="untrusted") as sb: sb.run("2+2")``.

    Takes exactly :class:`AsyncSandbox`'s arguments (``profile``, ``kernelspec``, ``cwd``,
    ``timeout``, ``start_timeout``, ``interrupt_grace``, ``config``, policy keys) and raises
    what it raises.
    """

    def __init__(self, profile: str | None = None, **kwargs: Any):
        self._sandbox = AsyncSandbox(profile, **kwargs)  # checks the arguments, starts nothing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="kernel-sandbox", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> Sandbox:
        """Start the kernel (see :meth:`AsyncSandbox.start`)."""
        try:
            self._call(self._sandbox.start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def close(self) -> None:
        """Shut the kernel down and remove its container (idempotent)."""
        if self._loop is None:
            return
        try:
            self._call(self._sandbox.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, code: str, *, timeout: float | None = DEFAULT) -> RunResult:
        """Run ``code``; see :meth:`AsyncSandbox.run`."""
        return self._call(self._sandbox.run(code, timeout=timeout))

    def upload(self, path: str, data: bytes | str | IO[Any]) -> None:
        """Write ``data`` to ``path`` in the workspace; see :meth:`AsyncSandbox.upload`."""
        self._call(self._sandbox.upload(path, data))

    def download(self, path: str) -> bytes:
        """Read ``path`` from the workspace; see :meth:`AsyncSandbox.download`."""
        return self._call(self._sandbox.download(path))

    def restart(self) -> None:
        """A fresh kernel in a new container; see :meth:`AsyncSandbox.restart`."""
        self._call(self._sandbox.restart())

    @property
    def timeout(self) -> float | None:
        return self._sandbox.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._sandbox.timeout = value

    @property
    def kernel_id(self) -> str | None:
        return self._sandbox.kernel_id

    @property
    def container_name(self) -> str | None:
        return self._sandbox.container_name

    @property
    def policy(self) -> Any:
        return self._sandbox.policy

    @property
    def profile(self) -> str:
        return self._sandbox.profile

    @property
    def cwd(self) -> str:
        return self._sandbox.cwd

    @property
    def is_running(self) -> bool:
        return self._sandbox.is_running

"""Sandboxed terminals through the sandbox service: the user's server holds only a pty.

On a shared machine the user's Jupyter Server has no engine access, so it cannot create a
terminal's container nor run ``docker start -ai``. It asks the service instead
(``terminal_start``, with the terminal's folder opened by this process and passed as a
descriptor, as kernels do): the service creates the container under the operator's rules for
this user, runs the attach on the slave side of a new pty, and sends back the pty's master
descriptor. terminado then drives that descriptor through :class:`FdPtyProcess`, a pty with no
local process: reading, writing and resizing (``TIOCSWINSZ`` on the master reaches the attach
as ``SIGWINCH``) work as on any pty.

Closing: the terminal manager asks the service to close it (``terminal_close``), which removes
the container; when this process dies, its master descriptor closes, the attach sees the
hangup and the service removes the container too (its owner sweep is the backstop).
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import fcntl
import os
import select
import struct
import termios
from typing import Any

from terminado.management import PtyWithClients

from kernel_sandbox.errors import SandboxError
from kernel_sandbox.provisioner.via_service import open_folders

__all__ = ["FdPtyProcess", "ServiceTerminal", "open_service_terminal"]


class FdPtyProcess:
    """The part of ``ptyprocess.PtyProcessUnicode`` terminado uses, over a pty master
    descriptor whose process runs elsewhere (the service's attach)."""

    delayafterterminate = 0.1

    def __init__(self, fd: int, on_kill: Any = None):
        self.fd = fd
        self.pid = -1
        self.closed = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._on_kill = on_kill

    def read(self, size: int = 1024) -> str:
        """Text read from the terminal; EOFError once its other side is gone (as ptyprocess)."""
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            return ""
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF):
                raise EOFError("the terminal's sandbox ended") from None
            raise
        if not data:
            raise EOFError("the terminal's sandbox ended")
        return str(self.decoder.decode(data, final=False))

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[written:]
        return len(data)

    def setwinsize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def getwinsize(self) -> tuple[int, int]:
        packed = fcntl.ioctl(self.fd, termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols = struct.unpack("HHHH", packed)[:2]
        return rows, cols

    def isalive(self) -> bool:
        """Whether the attach still holds the pty's other side (no hangup on the master)."""
        if self.closed:
            return False
        poller = select.poll()
        poller.register(self.fd, select.POLLHUP)
        return not any(event & select.POLLHUP for _, event in poller.poll(0))

    def kill(self, sig: int) -> None:
        """There is no local process to signal: any signal asks the service to end the
        terminal (once)."""
        if self._on_kill is not None and self.isalive():
            on_kill, self._on_kill = self._on_kill, None
            on_kill()

    def close(self, force: bool = False) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass


class ServiceTerminal:
    """The service's side of one terminal, as the terminal manager closes it."""

    def __init__(self, client: Any, terminal_id: str, container_name: str, log: Any):
        self.client = client
        self.terminal_id = terminal_id
        self.container_name = container_name
        self.log = log
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    def close(self) -> None:
        """Ask the service to end the terminal and remove its container (never raises)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.ask("terminal_close", terminal_id=self.terminal_id)
        except SandboxError as exc:
            self.log.warning(
                "terminal %s: the sandbox service did not confirm its end: %s",
                self.terminal_id,
                exc,
            )

    def close_soon(self) -> None:
        """:meth:`close` without blocking the event loop (terminado's kill is synchronous)."""
        if self._closing is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.close()
            return
        self._closing = loop.run_in_executor(None, self.close)

    async def aclose(self) -> None:
        self.close_soon()
        if self._closing is not None:
            await asyncio.shield(self._closing)


class _ServicePty(PtyWithClients):  # type: ignore[misc]
    """terminado's pty with clients, over a descriptor instead of a spawned process."""

    def __init__(self, ptyproc: FdPtyProcess):
        self.clients: list[Any] = []
        from collections import deque

        self.read_buffer: deque[str] = deque([], maxlen=1000)
        self.ptyproc = ptyproc

    def killpg(self, sig: int = 15) -> None:
        self.kill(sig)


def open_service_terminal(
    provisioner: Any,
    name: str,
    cwd: str,
    term: str,
    shell: list[str],
    log: Any,
) -> PtyWithClients:
    """Ask the service for terminal ``name`` (its folder ``cwd``) under ``provisioner``'s
    kernelspec and config; a terminado pty over the master descriptor it sends.

    Raises:
        SandboxError: the service refused (ServiceRefused, PolicyError name the rule) or is
            not there (ServiceUnavailable).
    """
    service = provisioner.via_service
    spec = provisioner.kernel_spec
    asked = service.requested()
    fds, folders = open_folders(provisioner, asked, cwd)
    try:
        reply, received = service.client.ask_fds(
            "terminal_start",
            fds,
            name=name,
            kernelspec={
                "name": provisioner._spec_name,
                "argv": list(spec.argv),
                "env": dict(spec.env or {}),
                "language": spec.language,
                "display_name": spec.display_name,
            },
            config=asked,
            cwd=cwd,
            folders=folders,
            term=term,
            shell=list(shell),
        )
    finally:
        for fd in fds:
            os.close(fd)
    handle = ServiceTerminal(
        service.client, str(reply["terminal_id"]), str(reply.get("container") or ""), log
    )
    if len(received) != 1:
        for fd in received:
            os.close(fd)
        handle.close()
        raise SandboxError(
            f"the sandbox service at {service.socket_path} sent {len(received)} descriptors for "
            "a terminal instead of one; is it the same version as this server?"
        )
    os.set_blocking(received[0], False)
    for note in reply.get("notes") or []:
        log.warning("terminal %s: %s", name, note)
    pty = _ServicePty(FdPtyProcess(received[0], on_kill=handle.close_soon))
    pty.sandbox = handle  # type: ignore[attr-defined]
    return pty

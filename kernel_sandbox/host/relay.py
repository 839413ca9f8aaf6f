"""The host-side IOPub relay: what a kernel publishes, passed on to clients within limits.

Without it every client's SUB socket connects straight to the kernel's PUB socket, and libzmq
queues up to 1000 complete messages per client whatever their size (plus any incomplete
multi-part message): a kernel publishing a 200 MiB buffer ten times while a client is idle
grows that client's process (the Jupyter Server, a jupyter_client) by 2 GB. The relay sits
between them, one per kernel, for the kernel's whole life (restarts included)::

    kernel PUB --ipc--> ZmtpSubReader (zmtp.py) --limits--> PUB (pyzmq) --ipc--> clients

- ``max_message``: a message larger than this (payload plus a per-frame overhead, or more
  than ``max_frames`` frames) is discarded while it streams in; the relay never holds it.
- ``rate``: bytes per second passed on (a token bucket whose burst holds one largest message).
  Over budget the relay stops reading, so the excess waits in the kernel's own socket queue,
  in the kernel's memory (its cgroup), and nothing is dropped by the relay.
- ``hwm``: the send high-water mark of the client socket, in messages per client.

A dropped message gets a notice in the notebook: a signed ``stream`` (stderr) message with the
dropped message's parent header (or the last one seen), so it shows under the cell that made
it. Notices are rate-limited too: at most one per ``NOTICE_INTERVAL``; the rest are summed up
in one later notice. The relay runs its own asyncio loop in a daemon thread; the layout of the
runtime directory is the caller's business (it passes both socket paths).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from jupyter_client.session import Session

from kernel_sandbox.host.zmtp import (
    DELIMITER,
    MAX_PARENT,
    Dropped,
    Limits,
    ProtocolError,
    ZmtpSubReader,
)

__all__ = [
    "NOTICE_INTERVAL",
    "IopubRelay",
    "RelayLimits",
    "TokenBucket",
    "human_size",
    "link_socket",
    "unlink_socket",
]

NOTICE_INTERVAL = 2.0  # seconds between two drop notices (and log lines) of one kernel
RETRY = 0.01  # seconds between attempts to reach the kernel's socket (start, restart)
TRAIT = "c.DockerSandboxProvisioner"


@dataclass(frozen=True)
class RelayLimits:
    """The relay's bounds (see the module docstring); 0 for ``rate`` is no rate limit."""

    max_message: int = 64 * 1024**2
    rate: int = 64 * 1024**2
    hwm: int = 1000
    max_frames: int = 4096


def human_size(size: int) -> str:
    """200 MiB, 64 KiB, 12 bytes."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            shown = f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"
            return f"{shown} {unit}"
    return f"{size} bytes"


class TokenBucket:
    """``rate`` bytes per second, up to ``burst`` saved; a take may go into debt, which the
    caller sleeps off (so a message as large as the burst always passes)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def take(self, cost: float) -> float:
        """Spend ``cost``; return the seconds to wait before passing it on."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= cost
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class IopubRelay:
    """Relay one kernel's IOPub: read ``kernel_path`` (the kernel's PUB socket, reconnecting
    after a restart), publish on ``client_path`` (bound here, in a host-only directory).

    jupyter_client removes every ``<ip>-<port>`` path when a kernel restarts, so the relay's
    socket lives at a path of its own and clients reach it through a hard link
    (:meth:`expose`), made again on every start.

    Args:
        kernel_path, client_path: unix socket paths (the kernel's, and where to bind).
        key, signature_scheme: the kernel's connection info, to sign drop notices.
        limits: the bounds.
        log: a logger (warnings for drops, rate-limited like the notices).
        name: the kernel, in log lines.
        kernel_uid: the owner the kernel's socket must have (None: any).
    """

    def __init__(
        self,
        kernel_path: str,
        client_path: str,
        key: bytes,
        signature_scheme: str,
        limits: RelayLimits,
        log: Any,
        name: str = "",
        kernel_uid: int | None = None,
    ):
        self.kernel_path, self.client_path = kernel_path, client_path
        self.kernel_uid = kernel_uid
        self.limits, self.log, self.name = limits, log, name
        self.session = Session(
            key=key, signature_scheme=signature_scheme, username="kernel-sandbox"
        )
        self.attached = threading.Event()  # connected to the kernel's socket now
        self.relayed = 0  # messages passed on
        self.dropped = 0  # messages discarded
        self._socket: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._parent: bytes | None = None  # the last parent header passed on (raw JSON)
        self._last_notice = float("-inf")
        self._pending: list[Dropped] = []  # drops not yet noticed
        self._flush: asyncio.TimerHandle | None = None

    @property
    def client_url(self) -> str:
        return f"ipc://{self.client_path}"

    def start(self) -> None:
        """Bind the client socket (clients may connect when this returns) and start reading
        the kernel's socket in the background.

        Raises:
            zmq.ZMQError: the client path cannot be bound.
        """
        unlink_socket(self.client_path)
        socket: zmq.Socket = zmq.Context.instance().socket(zmq.PUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, self.limits.hwm)
        try:
            socket.bind(self.client_url)
        except BaseException:
            socket.close()
            raise
        self._socket = socket
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name=f"kernel-sandbox-iopub-{self.name}", daemon=True
        )
        self._thread.start()
        ready.wait()

    def expose(self, path: str) -> None:
        """Make ``path`` (same file system, host-only directory) a hard link to the relay's
        socket, replacing whatever is there atomically.

        Raises:
            OSError: the link could not be made.
        """
        link_socket(self.client_path, path)

    def publish(
        self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None
    ) -> None:
        """Send clients a message of the host's, signed with the kernel's key, under ``parent``
        (default: the parent of the last message passed on, i.e. the running or last cell).
        Thread-safe; returns once it is queued for every client. For notices the kernel cannot
        give (why it ended): the relay's socket outlives the container.

        Raises:
            RuntimeError: the relay is not running.
        """
        loop = self._loop
        if loop is None or self._thread is None or self._socket is None:
            raise RuntimeError("the IOPub relay is not running")

        async def send() -> None:
            self._send(msg_type, content, parent if parent is not None else self._last_parent())

        asyncio.run_coroutine_threadsafe(send(), loop).result(timeout=5)

    def _last_parent(self) -> dict[str, Any]:
        if self._parent is not None:
            with contextlib.suppress(ValueError):
                value = json.loads(self._parent)
                if isinstance(value, dict):
                    return value
        return {}

    def _send(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any]) -> None:
        assert self._socket is not None
        message = self.session.msg(msg_type, content, parent=parent)
        self._socket.send_multipart(self.session.serialize(message, f"{msg_type}".encode()))

    async def wait_attached(self, timeout: float) -> bool:
        """Wait until the relay reads the kernel's socket (after a start or restart)."""
        deadline = time.monotonic() + timeout
        while not self.attached.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        return self.attached.is_set()

    def close(self) -> None:
        """Stop relaying, release both sockets (idempotent, never raises)."""
        loop, thread, self._thread = self._loop, self._thread, None
        if loop is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(self._cancel)
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            unlink_socket(self.client_path)

    # -- the relay's thread ---------------------------------------------------------------------

    def _main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._run())
            ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._task)
        finally:
            ready.set()
            loop.close()

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        limits = Limits(self.limits.max_message, self.limits.max_frames)
        burst = max(self.limits.rate, self.limits.max_message)
        bucket = TokenBucket(self.limits.rate, burst)
        while True:
            try:
                reader = await ZmtpSubReader.connect(self.kernel_path, limits, self.kernel_uid)
            except (OSError, ProtocolError):  # not there yet, or between two containers
                await asyncio.sleep(RETRY)
                continue
            self.attached.set()
            try:
                await self._pump(reader, bucket)
            except ConnectionError as exc:  # the container ended; a restart's binds anew
                self.log.debug("kernel %s: IOPub relay lost the kernel: %s", self.name, exc)
            finally:
                self.attached.clear()
                reader.close()

    async def _pump(self, reader: ZmtpSubReader, bucket: TokenBucket) -> None:
        assert self._socket is not None
        while True:
            message = await reader.receive()
            if isinstance(message, Dropped):
                self.dropped += 1
                self._pending.append(message)
                self._notify()
                continue
            wait = bucket.take(sum(map(len, message)))
            if wait > 0:  # not reading meanwhile: the kernel's own queue holds the rest
                await asyncio.sleep(wait)
            self._remember_parent(message)
            self._socket.send_multipart(message, copy=False)
            self.relayed += 1

    def _remember_parent(self, frames: list[bytes | bytearray]) -> None:
        try:
            at = frames.index(DELIMITER)
            parent = frames[at + 3]
        except (ValueError, IndexError):
            return
        if 2 < len(parent) <= MAX_PARENT:  # not "{}"
            self._parent = bytes(parent)

    # -- notices ------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Send the pending notices now, or once NOTICE_INTERVAL has passed since the last."""
        assert self._loop is not None
        wait = self._last_notice + NOTICE_INTERVAL - time.monotonic()
        if wait <= 0:
            self._send_notice()
        elif self._flush is None:
            self._flush = self._loop.call_later(wait, self._send_notice)

    def _send_notice(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, []
        if not pending or self._socket is None:
            return
        self._last_notice = time.monotonic()
        text = self.notice_text(pending)
        self.log.warning("kernel %s: %s", self.name, text)
        parent = pending[-1].parent or self._last_parent()
        try:
            self._send("stream", {"name": "stderr", "text": f"{text}\n"}, parent)
        except zmq.ZMQError as exc:
            self.log.warning("kernel %s: could not publish a drop notice: %s", self.name, exc)

    def notice_text(self, dropped: list[Dropped]) -> str:
        """What the notebook shows for ``dropped`` (one or more discarded messages)."""
        if len(dropped) == 1:
            what = "an output of {} was dropped"
        else:
            total = human_size(sum(d.size for d in dropped))
            what = f"{len(dropped)} outputs of up to {{}} ({total} in all) were dropped"
        if all(d.reason == "frames" for d in dropped):
            size = f"{max(d.frames for d in dropped)} parts"
            limit = f"limit {self.limits.max_frames} parts per message"
        else:
            size = human_size(max(d.size for d in dropped))
            limit = f"limit {human_size(self.limits.max_message)}, {TRAIT}.iopub_max_message"
        return f"kernel-sandbox: {what.format(size)} ({limit})"


def link_socket(socket_path: str, path: str) -> None:
    """Make ``path`` a hard link to ``socket_path``, replacing whatever is there atomically.

    Raises:
        OSError: the link could not be made.
    """
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    unlink_socket(staging)
    os.link(socket_path, staging, follow_symlinks=False)
    try:
        os.rename(staging, path)
    except BaseException:
        unlink_socket(staging)
        raise


def unlink_socket(path: str) -> None:
    """Remove a socket (or link) left at ``path``; anything else there is an error for bind."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(info.st_mode) or stat.S_ISLNK(info.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

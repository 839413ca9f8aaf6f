"""The service process: the socket, one thread per connection, one event loop for the kernels.

Connections are served by threads (reading a request with its descriptors is blocking socket
work, bounded by a timeout), and every operation on kernels runs on one asyncio loop in its
own thread, as the provisioner expects (it is the code a Jupyter Server runs on its loop). A
request that is malformed, too big, too slow or that fails in any way gets an error reply and
changes nothing; nothing a caller sends can stop the service.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import PolicyError, SandboxError
from kernel_sandbox.service.callers import Caller, peer_caller
from kernel_sandbox.service.client import DEFAULT_SOCKET
from kernel_sandbox.service.kernels import KernelRegistry
from kernel_sandbox.service.protocol import (
    REQUEST_TIMEOUT,
    BadRequest,
    error_reply,
    read_request,
    send_reply,
)
from kernel_sandbox.service.terminals import TerminalRegistry
from kernel_sandbox.service.views import CallerViews

__all__ = ["DEFAULT_SOCKET", "SandboxService"]

log = logging.getLogger("kernel_sandbox.service")

OPERATION_TIMEOUT = 300.0  # seconds one operation may take on the loop (a slow image start)
SWEEP_INTERVAL = 5.0
MAX_CONNECTIONS_PER_USER = 32
FDS_KEY = "_fds"  # in a reply dict: descriptors to send with it


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 128


class SandboxService:
    """``kernel-sandbox serve``: listen on ``socket_path`` and run kernels for its callers.

    Args:
        socket_path: the unix socket to listen on (its directory is created, mode 0755).
        registry: the kernels (and the operator's rules).
        group: the group that may connect (None: everyone, mode ``mode``).
        mode: the socket's mode (default 0666: every local user; 0660 with ``group``).
    """

    def __init__(
        self,
        socket_path: str,
        registry: KernelRegistry,
        group: str | None = None,
        mode: int | None = None,
    ):
        self.socket_path = socket_path
        self.registry = registry
        self.terminals = TerminalRegistry(registry)
        self.views = CallerViews(registry, self.terminals)
        self.group = group
        self.mode = mode if mode is not None else (0o660 if group else 0o666)
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._run_loop, name="kernel-sandbox-service-loop", daemon=True
        )
        self._server: _Server | None = None
        self._stopping = threading.Event()
        self._connections: dict[int, int] = {}  # uid -> requests open
        self._connections_lock = threading.Lock()

    # -- the event loop the kernels live on --------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run_on_loop(
        self, coro: Coroutine[Any, Any, Any], timeout: float = OPERATION_TIMEOUT
    ) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.registry.sweep()
                await self.terminals.sweep()
            except Exception as exc:  # the sweep must never end
                log.warning("service: sweep failed: %s", exc)

    # -- the socket -------------------------------------------------------------------------

    def _bind(self) -> _Server:
        path = Path(self.socket_path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(path))
                except OSError:
                    path.unlink()  # a stale socket of a killed service
                else:
                    raise PolicyError(
                        f"another sandbox service already listens on {path}; stop it first"
                    )
                finally:
                    probe.close()
            else:
                raise PolicyError(f"{path} exists and is not a socket; remove it or use --socket")
        except FileNotFoundError:
            pass
        staging = path.parent / f".{path.name}.{os.getpid()}"
        staging.unlink(missing_ok=True)
        server = _Server(str(staging), self._handler_class(), bind_and_activate=False)
        old = os.umask(0o177)
        try:
            server.server_bind()
        finally:
            os.umask(old)
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                server.server_close()
                staging.unlink(missing_ok=True)
                raise PolicyError(f"--group {self.group}: no such group") from None
            os.chown(staging, -1, gid)
        os.chmod(staging, self.mode)
        os.rename(staging, path)  # in place, with its final owner and mode, at once
        server.server_activate()
        return server

    def _handler_class(self) -> type[socketserver.BaseRequestHandler]:
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                service.handle_connection(self.request)

        return Handler

    def handle_connection(self, sock: socket.socket) -> None:
        """Answer one request (at most MAX_CONNECTIONS_PER_USER at once per uid, so that one
        user cannot hold every thread); never raise (a peer gone is just closed)."""
        try:
            caller = peer_caller(sock)
        except OSError:
            return
        with self._connections_lock:
            held = self._connections.get(caller.uid, 0)
            if held >= MAX_CONNECTIONS_PER_USER and caller.uid != 0:
                busy = BadRequest(
                    f"{caller.describe()} already has {held} requests open; wait for them"
                )
                send_reply(sock, error_reply(busy))
                return
            self._connections[caller.uid] = held + 1
        try:
            self._answer(sock, caller)
        finally:
            with self._connections_lock:
                self._connections[caller.uid] -= 1

    def _answer(self, sock: socket.socket, caller: Caller) -> None:
        fds: list[int] = []
        try:
            sock.settimeout(REQUEST_TIMEOUT)
            request, fds = read_request(sock)
        except (BadRequest, SandboxError) as exc:
            send_reply(sock, error_reply(exc))
            return
        except Exception:  # timed out, reset: nothing to answer
            return
        try:
            reply = self.dispatch(caller, request, fds)
            sent: list[int] = reply.pop(FDS_KEY, [])
            try:
                if not send_reply(sock, {"ok": True, **reply}, sent):
                    self._undelivered(caller, request, reply)
            finally:
                for fd in sent:
                    os.close(fd)
        except SandboxError as exc:
            send_reply(sock, error_reply(exc))
        except Exception as exc:
            log.exception("service: %s from %s failed", request.get("op"), caller.describe())
            send_reply(sock, error_reply(SandboxError(f"{request.get('op')} failed: {exc}")))
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _undelivered(self, caller: Caller, request: dict[str, Any], reply: dict[str, Any]) -> None:
        """A terminal whose pty could not be handed over (its caller hung up) is closed."""
        if request.get("op") == "terminal_start" and reply.get("terminal_id"):
            self.run_on_loop(self.terminals.close(caller, {"terminal_id": reply["terminal_id"]}))

    async def _terminal_start(
        self, caller: Caller, request: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        reply, sent = await self.terminals.start(caller, request, fds)
        return {**reply, FDS_KEY: sent}

    def dispatch(self, caller: Caller, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Answer ``request``; a reply's descriptors to send are under FDS_KEY (then closed)."""
        op = request["op"]
        registry, views = self.registry, self.views
        if op not in ("start", "terminal_start") and fds:
            raise BadRequest(f"{op} takes no descriptors")
        on_loop: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
            "start": lambda: registry.start(caller, request, fds),
            "poll": lambda: registry.poll(caller, request),
            "signal": lambda: registry.signal(caller, request),
            "cleanup": lambda: registry.cleanup(caller, request),
            "adopt": lambda: registry.adopt(caller, request),
            "stop": lambda: views.stop(caller, request),
            "list": lambda: views.ps(caller, request),
            "terminal_start": lambda: self._terminal_start(caller, request, fds),
            "terminal_close": lambda: self.terminals.close(caller, request),
        }
        if op in on_loop:
            reply: dict[str, Any] = self.run_on_loop(on_loop[op]())
            return reply
        off_loop = {  # SQLite and the proxies' sockets: in this connection's thread
            "tokens": views.tokens,
            "revoke": views.revoke,
            "audit": views.audit,
            "egress_pending": views.egress_pending,
            "egress_decide": views.egress_decide,
        }
        if op in off_loop:
            return off_loop[op](caller, request)
        if op == "hello":
            return self.run_on_loop(_call(self.hello, caller))  # type: ignore[no-any-return]
        raise BadRequest(f"{op} is not served yet by this service")

    def hello(self, caller: Caller) -> dict[str, Any]:
        """Who the service takes the caller for, and the rules that apply to them."""
        rules = self.registry.rules.current().for_caller(caller)
        return {
            "caller": {
                "uid": caller.uid,
                "gid": caller.gid,
                "name": caller.name,
                "groups": sorted(caller.groups),
            },
            "rules": rules.describe(),
            "pid": os.getpid(),
            "terminals": True,  # terminal_start is served
        }

    # -- life of the service ----------------------------------------------------------------

    def start(self) -> None:
        """Adopt what a previous run left running, then listen."""
        self._loop_thread.start()
        adopted = self.run_on_loop(self.registry.restore())
        if adopted:
            log.info("service: adopted %d running kernel(s)", adopted)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._sweeper()))
        self._server = self._bind()
        log.info("service: listening on %s (mode %04o)", self.socket_path, self.mode)

    def serve_forever(self) -> None:
        assert self._server is not None
        self._server.serve_forever(poll_interval=0.5)

    def shutdown(self, stop_kernels: bool = False) -> None:
        """Stop listening; the kernels keep running (a restarted service adopts them) unless
        ``stop_kernels``."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            try:
                Path(self.socket_path).unlink()
            except OSError:
                pass
        self.run_on_loop(self.terminals.close_all())  # terminals never outlive the service
        if stop_kernels:
            self.run_on_loop(self.registry.close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)

    def install_signal_handlers(self, stop_kernels: bool = False) -> None:
        def stop(signum: int, frame: Any) -> None:
            log.info(
                "service: signal %d, stopping (kernels %s)",
                signum,
                "stopped" if stop_kernels else "keep running",
            )
            threading.Thread(target=self.shutdown, args=(stop_kernels,), daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


async def _call(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)

"""The host-side egress proxy of one kernel: the only way out of its sandbox.

Runs on the host as its own process (``python -m kernel_sandbox.egress.proxy CONFIG``), started
by the provisioner, and ends when the provisioner's process does (its stdin closes). It serves:

- ``listen``: a unix socket in the kernel's runtime directory, reached from inside through the
  loopback bridge. It speaks HTTP/1.1 as a forward proxy: absolute ``http://`` URLs are
  forwarded request by request, ``CONNECT host:port`` is tunnelled byte for byte (TLS is never
  intercepted). HTTP is parsed with h11; every request is decided on its own target, which is
  the target that is resolved (on the host) and connected to.
- ``notices``: a unix socket the kernel's extension reads, so a denial shows in the cell.
- ``control``: a unix socket in the host-only part of the runtime directory, for
  ``kernel-sandbox egress pending|approve|deny`` (see :mod:`kernel_sandbox.egress.control`).

Every decision is appended to ``log`` as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import h11

from kernel_sandbox.egress.rules import (
    BAD_TARGET,
    NOT_LISTED,
    Decision,
    Rule,
    Target,
    TargetError,
    address_is_public,
    decide,
    parse_authority,
    parse_rule,
)
from kernel_sandbox.inside.egress_bridge import pump  # the byte pump the in-sandbox bridge uses

__all__ = ["EgressProxy", "ProxyConfig", "main"]

Reader, Writer = asyncio.StreamReader, asyncio.StreamWriter

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 128
MAX_NOTICE_READERS = 4
_REQUEST_START = re.compile(rb"(?:\r?\n)*[A-Z]{0,16}(?: |\Z)")
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authorization",
    b"proxy-authenticate",
    b"te",
    b"trailer",
    b"upgrade",
    b"transfer-encoding",
    b"expect",
}


@dataclass(frozen=True)
class ProxyConfig:
    """What one kernel's proxy enforces and where it listens (written by the provisioner)."""

    kernel_id: str
    listen: str
    notices: str
    control: str
    log: str
    rules: tuple[str, ...] = ()
    hosts: dict[str, str] = field(default_factory=dict)
    mode: str = "deny"
    ask_timeout: float = 60.0

    @classmethod
    def load(cls, path: str) -> ProxyConfig:
        with open(path) as handle:
            values = json.load(handle)
        values["rules"] = tuple(values.get("rules", ()))
        return cls(**values)


class Refused(Exception):
    """A request the proxy will not carry: HTTP status, log rule, target and message."""

    def __init__(self, status: int, rule: str, target: Target | None, message: str):
        super().__init__(message)
        self.status, self.rule, self.target, self.message = status, rule, target, message


def _message(target: Target | None, reason: str) -> str:
    where = f"egress to {target}" if target is not None else "egress"
    return f"{where} denied: {reason}"


def _raw_response(status: int, body: str) -> bytes:
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        431: "Request Header Fields Too Large",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }
    data = (body + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "X-Kernel-Sandbox-Egress: denied\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def _forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and those the Connection header names); h11 re-frames bodies."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


class Pending:
    """Requests to one unlisted target waiting for a person (ask mode)."""

    def __init__(self, target: Target, timeout: float):
        self.target = target
        self.since = time.time()
        self.expires = self.since + timeout
        self.waiting = 0
        self.future: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()


class EgressProxy:
    """One kernel's proxy: decisions, forwarding, notices, approvals and the decision log."""

    def __init__(self, config: ProxyConfig):
        self.config = config
        self.rules: tuple[Rule, ...] = tuple(parse_rule(r) for r in config.rules)
        self.hosts = dict(config.hosts)
        self.always_allow: set[Target] = set()
        self.always_deny: set[Target] = set()
        self.pending: dict[Target, Pending] = {}
        self._notice_writers: list[asyncio.StreamWriter] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._connections = 0
        fd = os.open(config.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._log = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    # -- serving ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the three sockets.

        Each is bound and chmod-ed in the host-only directory (next to the control socket)
        and then renamed into place: the shared directory belongs to the kernel's uid, and a
        path there may be a symbolic link planted by the kernel, which chmod would follow.
        """
        private = os.path.dirname(self.config.control)
        for path, handler, mode in (
            (self.config.listen, self._serve_client, 0o666),
            (self.config.notices, self._serve_notices, 0o666),
            (self.config.control, self._serve_control, 0o600),
        ):
            staging = os.path.join(private, f".{os.path.basename(path)}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            server = await asyncio.start_unix_server(
                handler, staging, limit=MAX_HEAD, backlog=2 * MAX_CONNECTIONS
            )
            # the kernel's uid reaches the first two; the directories are the real guard
            os.chmod(staging, mode)
            os.rename(staging, path)  # replaces a stale socket (or anything planted there)
            self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for path in (self.config.listen, self.config.notices, self.config.control):
            with contextlib.suppress(OSError):
                os.unlink(path)
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_result(("proxy shutting down", False))
        self._log.close()

    # -- the log and the notices ------------------------------------------------------------

    def record(self, target: Target | None, decision: str, rule: str, **extra: Any) -> None:
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "kernel_id": self.config.kernel_id,
            "host": target.host if target else None,
            "port": target.port if target else None,
            "decision": decision,
            "rule": rule,
            **extra,
        }
        self._log.write(json.dumps(entry) + "\n")

    def notify(self, message: str, **extra: Any) -> None:
        line = (json.dumps({"message": message, **extra}) + "\n").encode()
        for writer in list(self._notice_writers):
            if writer.transport.get_write_buffer_size() > 64 * 1024 or writer.is_closing():
                self._notice_writers.remove(writer)
                writer.close()
                continue
            writer.write(line)

    async def _serve_notices(self, reader: Reader, writer: Writer) -> None:
        self._notice_writers.append(writer)
        while len(self._notice_writers) > MAX_NOTICE_READERS:
            self._notice_writers.pop(0).close()
        with contextlib.suppress(OSError):
            while await reader.read(1024):
                pass
        if writer in self._notice_writers:
            self._notice_writers.remove(writer)
        writer.close()

    def refuse(self, refusal: Refused, method: str | None) -> bytes:
        outcome = "error" if refusal.status == 502 else "deny"
        self.record(refusal.target, outcome, refusal.rule, method=method)
        self.notify(
            refusal.message,
            decision="deny",
            rule=refusal.rule,
            target=str(refusal.target) if refusal.target else None,
        )
        return _raw_response(refusal.status, refusal.message)

    # -- deciding ---------------------------------------------------------------------------

    def _target_of(self, request: h11.Request) -> tuple[Target, bytes]:
        """The target of a proxy request and the request-target to send upstream."""
        raw = request.target.decode("ascii", "replace")
        hosts = [v.decode("ascii", "replace") for n, v in request.headers if n == b"host"]
        if len(hosts) > 1:
            raise Refused(400, BAD_TARGET, None, _message(None, "more than one Host header"))
        if request.method == b"CONNECT":
            try:
                target = parse_authority(raw)
            except TargetError as exc:
                reason = f"bad CONNECT target: {exc}"
                raise Refused(400, BAD_TARGET, None, _message(None, reason)) from None
            path = b""
            default_port = target.port
        else:
            scheme, sep, rest = raw.partition("://")
            if not sep or raw.startswith("/"):
                raise Refused(
                    400,
                    "not-proxy-form",
                    None,
                    _message(
                        None,
                        "this port is the kernel's HTTP proxy; send absolute http:// URLs "
                        "or CONNECT (HTTP_PROXY and HTTPS_PROXY are set for that)",
                    ),
                )
            if scheme.lower() != "http":
                raise Refused(
                    400,
                    "scheme",
                    None,
                    _message(None, f"{scheme}:// cannot be forwarded; https goes through CONNECT"),
                )
            end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
            try:
                target = parse_authority(rest[:end], default_port=80)
            except TargetError as exc:
                reason = f"bad URL host: {exc}"
                raise Refused(400, BAD_TARGET, None, _message(None, reason)) from None
            tail = rest[end:].partition("#")[0]
            path = (tail if tail.startswith("/") else "/" + tail).encode()
            default_port = 80
        if hosts:
            try:
                claimed = parse_authority(hosts[0], default_port=default_port)
            except TargetError:
                claimed = None
            if claimed != target:
                raise Refused(
                    403,
                    "host-mismatch",
                    target,
                    _message(target, f"the Host header ({hosts[0]}) names another target"),
                )
        return target, path

    async def decide(self, target: Target, method: str) -> tuple[str, list[str]]:
        """The allowing rule and the addresses to connect to; Refused when not allowed."""
        if target in self.always_allow:
            decision = Decision(True, "approved always")
        elif target in self.always_deny:
            decision = Decision(False, "denied always", "denied for this kernel")
        else:
            decision = decide(target, self.rules)
        if not decision.allowed and decision.rule == NOT_LISTED and self.config.mode == "ask":
            decision = await self._ask(target, method)
        if not decision.allowed:
            raise Refused(403, decision.rule, target, _message(target, decision.reason))
        return decision.rule, await self._resolve(target)

    async def _ask(self, target: Target, method: str) -> Decision:
        pending = self.pending.get(target)
        if pending is None:
            pending = self.pending[target] = Pending(target, self.config.ask_timeout)
            self.record(target, "ask", "ask", method=method)
            self.notify(
                f"egress to {target} is waiting for approval (up to "
                f"{self.config.ask_timeout:.0f}s): kernel-sandbox egress approve "
                f"{self.config.kernel_id} {target}   (or: ... egress deny ...)",
                decision="ask",
                target=str(target),
            )
        pending.waiting += 1
        try:
            verdict, always = await asyncio.wait_for(
                asyncio.shield(pending.future), timeout=max(0.0, pending.expires - time.time())
            )
        except asyncio.TimeoutError:
            if self.pending.get(target) is pending:
                del self.pending[target]
            return Decision(
                False, "ask-timeout", f"no approval within {self.config.ask_timeout:.0f}s"
            )
        finally:
            pending.waiting -= 1
        if verdict == "approve":
            return Decision(True, "approved always" if always else "approved once")
        if verdict == "deny":
            return Decision(False, "ask-denied", "denied by a person")
        return Decision(False, "ask-denied", verdict)

    async def _resolve(self, target: Target) -> list[str]:
        """Resolve on the host: egress_hosts first; names from DNS must be public addresses."""
        if target.is_ip:
            return [target.host]
        if target.host in self.hosts:
            return [self.hosts[target.host]]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            reason = f"egress to {target} failed: cannot resolve {target.host} ({exc.strerror})"
            raise Refused(502, "unresolvable", target, reason) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        private = [a for a in addresses if not address_is_public(a)]
        if private:
            raise Refused(
                403,
                "non-public-address",
                target,
                _message(
                    target,
                    f"{target.host} resolves to a non-public address ({private[0]}); "
                    "map it in egress_hosts if that is intended",
                ),
            )
        return addresses

    async def _connect(self, target: Target, addresses: list[str]) -> tuple[Reader, Writer]:
        error: Exception | None = None
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(address, target.port, limit=CHUNK), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as exc:
                error = exc
        raise Refused(
            502,
            "upstream-error",
            target,
            f"egress to {target} failed: cannot connect ({error or 'no address'})",
        )

    # -- one client connection --------------------------------------------------------------

    async def _serve_client(self, reader: Reader, writer: Writer) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.write(_raw_response(503, "egress: too many connections from this kernel"))
            await _close(writer)
            return
        self._connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        upstream: _Upstream | None = None
        method: str | None = None
        try:
            while True:
                try:
                    head = _next_event(conn, reader, sniff=True)
                    event = await asyncio.wait_for(head, HEAD_TIMEOUT)
                except h11.RemoteProtocolError:
                    raise Refused(
                        400,
                        "not-http",
                        None,
                        _message(
                            None,
                            "not an HTTP proxy request (only HTTP, and HTTPS through CONNECT, "
                            "can go out)",
                        ),
                    ) from None
                if not isinstance(event, h11.Request):
                    break  # ConnectionClosed, or nothing more
                method = event.method.decode("ascii", "replace")
                if any(n == b"content-length" for n, _ in event.headers) and any(
                    n == b"transfer-encoding" for n, _ in event.headers
                ):
                    raise Refused(
                        400,
                        "bad-framing",
                        None,
                        _message(
                            None, "both Content-Length and Transfer-Encoding (ambiguous framing)"
                        ),
                    )
                target, path = self._target_of(event)
                rule, addresses = await self.decide(target, method)
                if upstream is None or upstream.target != target:
                    if upstream is not None:
                        await upstream.close()
                        upstream = None
                    up_reader, up_writer = await self._connect(target, addresses)
                    upstream = _Upstream(target, up_reader, up_writer)
                self.record(
                    target,
                    "allow",
                    rule,
                    method=method,
                    address=upstream.writer.get_extra_info("peername")[0],
                )
                if event.method == b"CONNECT":
                    await self._tunnel(conn, reader, writer, upstream)
                    upstream = None
                    return
                if not await self._forward(event, path, conn, reader, writer, upstream):
                    await upstream.close()
                    upstream = None
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except Refused as refusal:
            with contextlib.suppress(OSError):
                writer.write(self.refuse(refusal, method))
        except (OSError, asyncio.TimeoutError, h11.LocalProtocolError, h11.RemoteProtocolError):
            pass  # a peer went away or broke HTTP mid-message: just close both sides
        finally:
            self._connections -= 1
            if upstream is not None:
                await upstream.close()
            await _close(writer)

    async def _forward(
        self,
        request: h11.Request,
        path: bytes,
        conn: h11.Connection,
        reader: Reader,
        writer: Writer,
        upstream: _Upstream,
    ) -> bool:
        """Carry one request and its response; True when the upstream connection can be reused."""
        headers = _forwarded_headers(list(request.headers))
        headers = [(n, v) for n, v in headers if n != b"host"]
        headers.insert(0, (b"host", _host_header(upstream.target)))
        if any(n == b"transfer-encoding" for n, _ in request.headers):
            headers.append((b"transfer-encoding", b"chunked"))
        up = upstream.conn
        await upstream.send(
            up.send(
                h11.Request(method=request.method, target=path, headers=headers, http_version="1.1")
            )
        )
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:  # the request body
            event = await _next_event(conn, reader)
            if isinstance(event, h11.Data):
                await upstream.send(up.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await upstream.send(up.send(h11.EndOfMessage()))
                break
            else:
                raise OSError("client closed during the request body")
        while True:  # the response
            event = await _next_event(up, upstream.reader)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code != 100:  # 100 was answered already
                    writer.write(conn.send(event))
                continue
            if isinstance(event, h11.Response):
                headers = _forwarded_headers(list(event.headers))
                if any(n == b"transfer-encoding" for n, _ in event.headers):
                    headers.append((b"transfer-encoding", b"chunked"))
                writer.write(
                    conn.send(
                        h11.Response(
                            status_code=event.status_code, headers=headers, reason=event.reason
                        )
                    )
                )
            elif isinstance(event, h11.Data):
                writer.write(conn.send(event))
                await writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                break
            else:
                raise OSError("upstream closed before the response ended")
        if up.our_state is h11.DONE and up.their_state is h11.DONE:
            up.start_next_cycle()
            return True
        return False

    async def _tunnel(
        self,
        conn: h11.Connection,
        reader: Reader,
        writer: Writer,
        upstream: _Upstream,
    ) -> None:
        """Answer 200 and relay bytes both ways until both sides are done (no interception)."""
        early, _ = conn.trailing_data
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if early:
            upstream.writer.write(early)
        try:
            await asyncio.gather(pump(reader, upstream.writer), pump(upstream.reader, writer))
        finally:
            await upstream.close()

    # -- the control socket (host only) -----------------------------------------------------

    async def _serve_control(self, reader: Reader, writer: Writer) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            request = json.loads(line)
            reply = self.control(request)
        except (ValueError, asyncio.TimeoutError, OSError) as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}"}
        with contextlib.suppress(OSError):
            writer.write((json.dumps(reply) + "\n").encode())
            await writer.drain()
        await _close(writer)

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request: status, pending, approve or deny."""
        op = request.get("op")
        status = {"ok": True, "kernel_id": self.config.kernel_id, "mode": self.config.mode}
        if op == "status":
            return {
                **status,
                "rules": [str(r) for r in self.rules],
                "always_allow": sorted(map(str, self.always_allow)),
                "always_deny": sorted(map(str, self.always_deny)),
            }
        if op == "pending":
            return {
                **status,
                "pending": [
                    {
                        "target": str(p.target),
                        "since": p.since,
                        "expires": p.expires,
                        "waiting": p.waiting,
                    }
                    for p in self.pending.values()
                    if not p.future.done()
                ],
            }
        if op in ("approve", "deny"):
            try:
                target = parse_authority(str(request.get("target", "")))
            except TargetError as exc:
                return {
                    "ok": False,
                    "error": f"TARGET must be host:port as listed by `egress pending` ({exc})",
                }
            always = bool(request.get("always"))
            if always:
                (self.always_allow if op == "approve" else self.always_deny).add(target)
                (self.always_deny if op == "approve" else self.always_allow).discard(target)
            pending = self.pending.pop(target, None)
            decided = 0
            if pending is not None and not pending.future.done():
                pending.future.set_result((op, always))
                decided = pending.waiting
            if not always and pending is None:
                return {
                    "ok": False,
                    "error": f"no request to {target} is waiting in kernel {self.config.kernel_id}",
                }
            self.record(target, op, f"{op} by a person" + (" (always)" if always else ""))
            return {**status, "target": str(target), "decided": decided, "always": always}
        return {"ok": False, "error": f"unknown control operation {op!r}"}


class _Upstream:
    def __init__(self, target: Target, reader: Reader, writer: Writer):
        self.target, self.reader, self.writer = target, reader, writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def send(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def close(self) -> None:
        await _close(self.writer)


def _host_header(target: Target) -> bytes:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return (host if target.port == 80 else f"{host}:{target.port}").encode()


async def _next_event(conn: h11.Connection, reader: Reader, sniff: bool = False) -> Any:
    """The next h11 event; with ``sniff``, refuse early what cannot be an HTTP request head
    (a TLS hello or an SSH banner would otherwise wait for a blank line that never comes)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await reader.read(MAX_HEAD if sniff else CHUNK)
        conn.receive_data(data)  # b"" marks the end
        if not sniff:
            continue
        buffered = conn.trailing_data[0]
        if not _REQUEST_START.match(buffered[:20]):
            raise h11.RemoteProtocolError("not an HTTP request line", 400)
        if len(buffered) >= MAX_HEAD:
            raise Refused(
                431,
                "head-too-large",
                None,
                _message(None, f"request head over {MAX_HEAD // 1024} KiB"),
            )


async def _close(writer: Writer) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def serve(config: ProxyConfig, lifeline: bool = True) -> None:
    """Serve until SIGTERM or, with ``lifeline``, until stdin closes (the owner is gone)."""
    proxy = EgressProxy(config)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    if lifeline:

        def watch_stdin() -> None:
            with contextlib.suppress(OSError):
                while os.read(0, 1024):  # unbuffered: no lock held at interpreter exit
                    pass
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))

        # a daemon thread: a blocked read must not hold up the exit after SIGTERM
        threading.Thread(target=watch_stdin, name="lifeline", daemon=True).start()
    print("ready", flush=True)
    try:
        await stop
    finally:
        await proxy.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kernel_sandbox.egress.proxy CONFIG.json", file=sys.stderr)
        return 2
    asyncio.run(serve(ProxyConfig.load(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

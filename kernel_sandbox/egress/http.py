"""The HTTP/1.1 mechanics of the egress proxy (parsed with h11): the target a request
names, refusals as responses, hop-by-hop headers, one request forwarded with its response,
and CONNECT tunnels.

Nothing here decides what may go out; :mod:`.proxy` decides on :func:`proxy_target`'s
answer, then calls :func:`forward` or :func:`tunnel` with an :class:`Upstream` it connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from asyncio import StreamReader, StreamWriter

import h11

from kernel_sandbox.egress.rules import BAD_TARGET, Target, TargetError, parse_authority
from kernel_sandbox.inside.egress_bridge import pump  # the byte pump the in-sandbox bridge uses

__all__ = [
    "CHUNK",
    "MAX_HEAD",
    "Refused",
    "Rewrite",
    "Upstream",
    "close_writer",
    "forward",
    "next_event",
    "proxy_target",
    "raw_response",
    "refusal_message",
    "tunnel",
]

CHUNK = 256 * 1024
MAX_HEAD = 64 * 1024
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


class Refused(Exception):
    """A request the proxy will not carry: HTTP status, log rule, target and message."""

    def __init__(self, status: int, rule: str, target: Target | None, message: str):
        super().__init__(message)
        self.status, self.rule, self.target, self.message = status, rule, target, message


def refusal_message(target: Target | None, reason: str) -> str:
    where = f"egress to {target}" if target is not None else "egress"
    return f"{where} denied: {reason}"


def raw_response(status: int, body: str) -> bytes:
    reasons = {
        400: "Bad Request",
        403: "Forbidden",
        407: "Proxy Authentication Required",
        431: "Request Header Fields Too Large",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }
    data = (body + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "X-Kernel-Sandbox-Egress: denied\r\n"
        + ('Proxy-Authenticate: Basic realm="kernel-sandbox egress"\r\n' if status == 407 else "")
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and those the Connection header names); h11 re-frames bodies."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def proxy_target(request: h11.Request) -> tuple[Target, bytes]:
    """The target of a proxy request and the request-target to send upstream."""
    raw = request.target.decode("ascii", "replace")
    hosts = [v.decode("ascii", "replace") for n, v in request.headers if n == b"host"]
    if len(hosts) > 1:
        raise Refused(400, BAD_TARGET, None, refusal_message(None, "more than one Host header"))
    if request.method == b"CONNECT":
        try:
            target = parse_authority(raw)
        except TargetError as exc:
            reason = f"bad CONNECT target: {exc}"
            raise Refused(400, BAD_TARGET, None, refusal_message(None, reason)) from None
        path = b""
        default_port = target.port
    else:
        scheme, sep, rest = raw.partition("://")
        if not sep or raw.startswith("/"):
            raise Refused(
                400,
                "not-proxy-form",
                None,
                refusal_message(
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
                refusal_message(
                    None, f"{scheme}:// cannot be forwarded; https goes through CONNECT"
                ),
            )
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        try:
            target = parse_authority(rest[:end], default_port=80)
        except TargetError as exc:
            reason = f"bad URL host: {exc}"
            raise Refused(400, BAD_TARGET, None, refusal_message(None, reason)) from None
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
                refusal_message(target, f"the Host header ({hosts[0]}) names another target"),
            )
    return target, path


class Upstream:
    """The connection to one target, and h11's client side of it."""

    def __init__(self, target: Target, reader: StreamReader, writer: StreamWriter):
        self.target, self.reader, self.writer = target, reader, writer
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def send(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def close(self) -> None:
        await close_writer(self.writer)


def host_header(target: Target, default_port: int = 80) -> bytes:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return (host if target.port == default_port else f"{host}:{target.port}").encode()


class Rewrite:
    """What :func:`forward` lets a caller change (the secrets' interception, :mod:`.intercept`):
    the request's headers and path, the response's headers and body. These do nothing."""

    default_port = 80  # the port the Host header leaves out

    def request(
        self, headers: list[tuple[bytes, bytes]], path: bytes
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        return headers, path

    def response(
        self, status: int, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        return headers

    def body(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        return b""


async def next_event(
    conn: h11.Connection, reader: StreamReader, sniff: bool = False
) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event; with ``sniff``, refuse early what cannot be an HTTP request head
    (a TLS hello or an SSH banner would otherwise wait for a blank line that never comes)."""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Event):
            return event
        if event is h11.PAUSED:
            return h11.PAUSED
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
                refusal_message(None, f"request head over {MAX_HEAD // 1024} KiB"),
            )


async def close_writer(writer: StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def forward(
    request: h11.Request,
    path: bytes,
    conn: h11.Connection,
    reader: StreamReader,
    writer: StreamWriter,
    upstream: Upstream,
    rewrite: Rewrite | None = None,
) -> bool:
    """Carry one request and its response; True when the upstream connection can be reused.
    ``rewrite`` changes what goes up and what comes back (by default nothing)."""
    rewrite = rewrite or Rewrite()
    headers = forwarded_headers(list(request.headers))
    headers = [(n, v) for n, v in headers if n != b"host"]
    headers.insert(0, (b"host", host_header(upstream.target, rewrite.default_port)))
    headers, path = rewrite.request(headers, path)
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
        event = await next_event(conn, reader)
        if isinstance(event, h11.Data):
            await upstream.send(up.send(h11.Data(data=event.data)))
        elif isinstance(event, h11.EndOfMessage):
            await upstream.send(up.send(h11.EndOfMessage()))
            break
        else:
            raise OSError("client closed during the request body")
    while True:  # the response
        event = await next_event(up, upstream.reader)
        if isinstance(event, h11.InformationalResponse):
            if event.status_code != 100:  # 100 was answered already
                writer.write(conn.send(event))
            continue
        if isinstance(event, h11.Response):
            headers = rewrite.response(event.status_code, forwarded_headers(list(event.headers)))
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
            data = rewrite.body(event.data)
            if data:
                writer.write(conn.send(h11.Data(data=data)))
                await writer.drain()
        elif isinstance(event, h11.EndOfMessage):
            tail = rewrite.end()
            if tail:
                writer.write(conn.send(h11.Data(data=tail)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            break
        else:
            raise OSError("upstream closed before the response ended")
    if up.our_state is h11.DONE and up.their_state is h11.DONE:
        up.start_next_cycle()
        return True
    return False


async def tunnel(
    conn: h11.Connection,
    reader: StreamReader,
    writer: StreamWriter,
    upstream: Upstream,
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

"""The host-side egress proxy of one kernel: the only way out of its sandbox.

Runs on the host as its own process (``python -m kernel_sandbox.egress.proxy CONFIG``), started
by the provisioner, and ends when the provisioner's process does (its stdin closes). It serves:

- ``listen``: a unix socket in the kernel's runtime directory, reached from inside through the
  loopback bridge. It speaks HTTP/1.1 as a forward proxy: absolute ``http://`` URLs are
  forwarded request by request, ``CONNECT host:port`` is tunnelled byte for byte (TLS is
  terminated only for the hosts of ``egress_secrets``: :mod:`.intercept`). HTTP is parsed
  with h11; every request is decided on its own target, which is the target that is resolved
  (on the host) and connected to.
- ``notices``: a unix socket the kernel's extension reads, so a denial shows in the cell.
- ``control``: a unix socket in the host-only part of the runtime directory, for
  ``kernel-sandbox egress pending|approve|deny`` (see :mod:`kernel_sandbox.egress.control`).

Every decision is appended to ``log`` as one JSON line, through the kernel's budget of records
per interval (the rest are counted and summarized in one ``"decision": "suppressed"`` line) and
with size-based rotation (:mod:`kernel_sandbox.host.logfile`); what the process itself logs
goes to its stderr (the owner's log) clipped and budgeted too. The HTTP mechanics (forwarding,
tunnels, refusals as responses) are :mod:`.http`; ask mode's waiting requests are
:mod:`.approvals`; the configuration is :class:`~kernel_sandbox.egress.config.ProxyConfig`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
from asyncio import StreamReader, StreamWriter
from datetime import datetime, timezone
from typing import Any

import h11

from kernel_sandbox.audit.chain import ChainedAppender
from kernel_sandbox.egress.approvals import Approvals
from kernel_sandbox.egress.ca import (
    KernelCA,
    pinned_context,
    pinned_server_context,
    upstream_context,
)
from kernel_sandbox.egress.config import ProxyConfig
from kernel_sandbox.egress.http import (
    CHUNK,
    MAX_HEAD,
    Refused,
    Rewrite,
    Upstream,
    close_writer,
    forward,
    next_event,
    proxy_target,
    raw_response,
    refusal_message,
    tunnel,
)
from kernel_sandbox.egress.intercept import Injection, SecretStore, serve_intercepted
from kernel_sandbox.egress.rules import (
    NOT_LISTED,
    Rule,
    Target,
    TargetError,
    address_is_public,
    decide,
    parse_authority,
    parse_rule,
)
from kernel_sandbox.errors import CredentialsError
from kernel_sandbox.host.logtext import LineBudget, Suppressed, budgeted_handler, clip

__all__ = ["EgressProxy", "ProxyConfig", "Refused", "main"]

HEAD_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 128
MAX_NOTICE_READERS = 4

_log = logging.getLogger("kernel_sandbox.egress")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class EgressProxy:
    """One kernel's proxy: decisions, forwarding, notices, approvals and the decision log."""

    def __init__(self, config: ProxyConfig):
        self.config = config
        self.rules: tuple[Rule, ...] = tuple(parse_rule(r) for r in config.rules)
        self.hosts = dict(config.hosts)
        self.approvals = Approvals(config.kernel_id, config.ask_timeout, self.record, self.notify)
        self._notice_writers: list[asyncio.StreamWriter] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._connections = 0
        # hash-chained, checked by `kernel-sandbox audit verify` (kernel_sandbox.audit)
        self._log = ChainedAppender(config.log, config.log_max_bytes, config.log_backups)
        self._budget = LineBudget(config.log_records, config.log_interval)
        self._summaries: asyncio.Task[None] | None = None
        self.secrets = SecretStore(config.secrets)
        self.ca: KernelCA | None = None
        self.upstream_tls = upstream_context(config.upstream_ca) if self.secrets else None

    # -- serving ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the three sockets.

        Each is bound and chmod-ed in the host-only directory (next to the control socket)
        and then renamed into place: the shared directory belongs to the kernel's uid, and a
        path there may be a symbolic link planted by the kernel, which chmod would follow.
        With ``egress_secrets``, the values are read and the kernel's CA made first.

        Raises:
            CredentialsError: a secret's source is unset, unreadable or unsafe.
        """
        private = os.path.dirname(self.config.control)
        if self.config.tcp:
            await self._listen_tcp()
        if self.secrets:
            self.secrets.load()
            self.ca = KernelCA(self.config.kernel_id, self.secrets.domains())
            if self.config.ca_bundle:
                self.ca.write_bundle(self.config.ca_bundle, self.config.trust_base, private)
        for path, handler, mode in (
            (self.config.listen, self._serve_client, 0o666),
            (self.config.notices, self._serve_notices, 0o666),
            (self.config.control, self._serve_control, 0o600),
        ):
            if not path:  # a pod kernel's proxy serves its clients on TCP only
                continue
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
        self._summaries = asyncio.create_task(self._summarize())

    async def _listen_tcp(self) -> None:
        """A pod kernel's proxy: the proxy and the notices on TCP at ``tcp``, over TLS with a
        certificate made now (the pod pins it), their ports and the certificate's SHA-256
        written to ``ports_file`` before the control socket appears."""
        if self.config.tls_pem:
            tls, fingerprint = pinned_context(self.config.tls_pem.encode())
        else:
            tls, fingerprint = pinned_server_context(self.config.tcp, "egress proxy")
        ports: dict[str, Any] = {}
        for name, handler in (("proxy", self._serve_client), ("notices", self._serve_tcp_notices)):
            server = await asyncio.start_server(
                handler,
                self.config.tcp,
                self.config.tcp_ports.get(name, 0),
                limit=MAX_HEAD,
                backlog=2 * MAX_CONNECTIONS,
                ssl=tls,
            )
            self._servers.append(server)
            ports[name] = server.sockets[0].getsockname()[1]
        fd = os.open(self.config.ports_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({**ports, "sha256": fingerprint}, handle)

    def authenticated(self, event: h11.Request) -> bool:
        """Whether a request carries this kernel's ``Proxy-Authorization`` (always, without a
        token: a unix socket only the kernel's sandbox can reach)."""
        if not self.config.token:
            return True
        expected = "Basic " + base64.b64encode(f"kernel:{self.config.token}".encode()).decode()
        given = [v for n, v in event.headers if n == b"proxy-authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], expected.encode())

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for path in (self.config.listen, self.config.notices, self.config.control):
            if not path:
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self.ca is not None and self.config.ca_bundle:
            with contextlib.suppress(OSError):
                os.unlink(self.config.ca_bundle)
        self.approvals.close()
        if self._summaries is not None:
            self._summaries.cancel()
        for ended in self._budget.due(flush=True):
            self._suppressed(ended)
        self._log.close()

    # -- the log and the notices ------------------------------------------------------------

    def record(self, target: Target | None, decision: str, rule: str, **extra: Any) -> None:
        """Append one decision, unless the kernel is over its budget (then it is counted)."""
        allowed, ended = self._budget.admit(self.config.kernel_id, decision)
        if ended is not None:
            self._suppressed(ended)
        if not allowed:
            return
        entry = {
            "time": _now(),
            "kernel_id": self.config.kernel_id,
            "host": clip(target.host) if target else None,
            "port": target.port if target else None,
            "decision": decision,
            "rule": clip(rule),
            **{k: clip(v) if isinstance(v, str) else v for k, v in extra.items()},
        }
        self._write(entry)

    def _suppressed(self, ended: Suppressed) -> None:
        self._write(
            {
                "time": _now(),
                "kernel_id": ended.key,
                "decision": "suppressed",
                "suppressed": ended.count,
                "seconds": round(ended.seconds, 3),
                "decisions": ended.kinds,
                "rule": ended.message("decisions"),
            }
        )

    def _write(self, entry: dict[str, Any]) -> None:
        try:
            self._log.write(json.dumps(entry).encode())
        except OSError as exc:  # a full disk must not stop the decisions, only their log
            _log.error("egress proxy: cannot write the decision log %s: %s", self.config.log, exc)

    async def _summarize(self) -> None:
        """Write what the budget held back, once an interval is over."""
        while True:
            await asyncio.sleep(max(self.config.log_interval, 0.5))
            for ended in self._budget.due():
                self._suppressed(ended)

    def notify(self, message: str, **extra: Any) -> None:
        line = (json.dumps({"message": message, **extra}) + "\n").encode()
        for writer in list(self._notice_writers):
            if writer.transport.get_write_buffer_size() > 64 * 1024 or writer.is_closing():
                self._notice_writers.remove(writer)
                writer.close()
                continue
            writer.write(line)

    async def _serve_notices(self, reader: StreamReader, writer: StreamWriter) -> None:
        self._notice_writers.append(writer)
        while len(self._notice_writers) > MAX_NOTICE_READERS:
            self._notice_writers.pop(0).close()
        with contextlib.suppress(OSError):
            while await reader.read(1024):
                pass
        if writer in self._notice_writers:
            self._notice_writers.remove(writer)
        writer.close()

    async def _serve_tcp_notices(self, reader: StreamReader, writer: StreamWriter) -> None:
        """Notices on TCP: the first line must be the kernel's token (else closed at once)."""
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except (OSError, ValueError, asyncio.TimeoutError):
            line = b""
        if not self.config.token or not hmac.compare_digest(
            line.strip(), self.config.token.encode()
        ):
            await close_writer(writer)
            return
        await self._serve_notices(reader, writer)

    def refuse(self, refusal: Refused, method: str | None) -> bytes:
        outcome = "error" if refusal.status == 502 else "deny"
        self.record(refusal.target, outcome, refusal.rule, method=method)
        self.notify(
            refusal.message,
            decision="deny",
            rule=refusal.rule,
            target=str(refusal.target) if refusal.target else None,
        )
        return raw_response(refusal.status, refusal.message)

    # -- deciding ---------------------------------------------------------------------------

    async def decide(self, target: Target, method: str) -> tuple[str, list[str]]:
        """The allowing rule and the addresses to connect to; Refused when not allowed."""
        decision = self.approvals.standing(target) or decide(target, self.rules)
        if not decision.allowed and decision.rule == NOT_LISTED and self.config.mode == "ask":
            decision = await self.approvals.ask(target, method)
        if not decision.allowed:
            raise Refused(403, decision.rule, target, refusal_message(target, decision.reason))
        return decision.rule, await self._resolve(target)

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
                refusal_message(
                    target,
                    f"{target.host} resolves to a non-public address ({private[0]}); "
                    "map it in egress_hosts if that is intended",
                ),
            )
        return addresses

    async def _connect(
        self, target: Target, addresses: list[str]
    ) -> tuple[StreamReader, StreamWriter]:
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

    async def _serve_client(self, reader: StreamReader, writer: StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.write(raw_response(503, "egress: too many connections from this kernel"))
            await close_writer(writer)
            return
        self._connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        upstream: Upstream | None = None
        method: str | None = None
        intercepted = False
        try:
            while True:
                try:
                    head = next_event(conn, reader, sniff=True)
                    event = await asyncio.wait_for(head, HEAD_TIMEOUT)
                except h11.RemoteProtocolError:
                    raise Refused(
                        400,
                        "not-http",
                        None,
                        refusal_message(
                            None,
                            "not an HTTP proxy request (only HTTP, and HTTPS through CONNECT, "
                            "can go out)",
                        ),
                    ) from None
                if not isinstance(event, h11.Request):
                    break  # ConnectionClosed, or nothing more
                method = event.method.decode("ascii", "replace")
                if not self.authenticated(event):
                    # not this kernel (another pod reaching the address): logged, no notice
                    self.record(None, "deny", "proxy-auth", method=method)
                    writer.write(raw_response(407, "egress: proxy authentication required"))
                    break
                if any(n == b"content-length" for n, _ in event.headers) and any(
                    n == b"transfer-encoding" for n, _ in event.headers
                ):
                    raise Refused(
                        400,
                        "bad-framing",
                        None,
                        refusal_message(
                            None, "both Content-Length and Transfer-Encoding (ambiguous framing)"
                        ),
                    )
                target, path = proxy_target(event)
                rule, addresses = await self.decide(target, method)
                spec = self.secrets.spec_for(target)
                if spec is not None and event.method == b"CONNECT":
                    assert self.ca is not None and self.upstream_tls is not None
                    self.record(target, "allow", rule, method=method, intercept=True)
                    intercepted = True  # from here TLS owns the connection, and closes it
                    await serve_intercepted(
                        conn,
                        reader,
                        writer,
                        target,
                        addresses,
                        spec,
                        self.secrets,
                        self.ca,
                        self.upstream_tls,
                        self.record,
                        self.refuse,
                    )
                    return
                rewrite: Rewrite | None = None
                if spec is not None:  # in clear: never the credential; the kernel's are dropped
                    rewrite = Injection(spec.apply, None, default_port=80)
                    self.notify(
                        f"egress to {target}: its credential is added over HTTPS only",
                        decision="allow",
                        rule=rule,
                        target=str(target),
                    )
                if upstream is None or upstream.target != target:
                    if upstream is not None:
                        await upstream.close()
                        upstream = None
                    up_reader, up_writer = await self._connect(target, addresses)
                    upstream = Upstream(target, up_reader, up_writer)
                self.record(
                    target,
                    "allow",
                    rule,
                    method=method,
                    address=upstream.writer.get_extra_info("peername")[0],
                )
                if event.method == b"CONNECT":
                    await tunnel(conn, reader, writer, upstream)
                    upstream = None
                    return
                if not await forward(event, path, conn, reader, writer, upstream, rewrite):
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
            if intercepted:
                writer.transport.close()
            else:
                await close_writer(writer)

    # -- the control socket (host only) -----------------------------------------------------

    async def _serve_control(self, reader: StreamReader, writer: StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            request = json.loads(line)
            reply = self.control(request)
        except (ValueError, asyncio.TimeoutError, OSError) as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}"}
        with contextlib.suppress(OSError):
            writer.write((json.dumps(reply) + "\n").encode())
            await writer.drain()
        await close_writer(writer)

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request: status, pending, approve or deny."""
        op = request.get("op")
        status = {"ok": True, "kernel_id": self.config.kernel_id, "mode": self.config.mode}
        if op == "status":
            return {
                **status,
                "rules": [str(r) for r in self.rules],
                "always_allow": sorted(map(str, self.approvals.always_allow)),
                "always_deny": sorted(map(str, self.approvals.always_deny)),
            }
        if op == "pending":
            return {**status, "pending": self.approvals.waiting()}
        if op == "secrets":
            return {**status, "secrets": self.secrets.status()}
        if op in ("revoke", "rotate"):
            reply = self.secrets.change(op, str(request.get("host") or ""), self.config.kernel_id)
            if not reply["ok"]:
                return reply
            self.record(None, op, f"secret {', '.join(reply['changed'])} {op}d by the owner")
            return {**status, **reply}
        if op in ("request", "outcome"):  # an agent's question ahead; what was decided
            try:
                asked = parse_authority(str(request.get("target", "")))
            except TargetError as exc:
                return {"ok": False, "error": f"TARGET must be host:port ({exc})"}
            if op == "outcome":
                return {**status, "target": str(asked), "outcome": self.approvals.outcome(asked)}
            if self.config.mode != "ask":
                return {"ok": False, "error": "this kernel's egress_mode is not 'ask'"}
            return {**status, **self.approvals.request(asked, str(request.get("reason") or ""))}
        if op in ("approve", "deny"):
            target = str(request.get("target", ""))
            outcome = self.approvals.settle(op, target, bool(request.get("always")))
            return outcome if "error" in outcome else {**status, **outcome}
        return {"ok": False, "error": f"unknown control operation {op!r}"}


async def serve(config: ProxyConfig, lifeline: bool = True) -> None:
    """Serve until SIGTERM or, with ``lifeline``, until stdin closes (the owner is gone)."""
    proxy = EgressProxy(config)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, finish)
    if lifeline:

        def watch_stdin() -> None:
            with contextlib.suppress(OSError):
                while os.read(0, 1024):  # unbuffered: no lock held at interpreter exit
                    pass
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(finish)

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
    config = ProxyConfig.load(argv[0])
    # stderr is the owner's log: what this process logs (asyncio's errors too) is clipped and
    # held to the kernel's budget
    logging.basicConfig(
        level=logging.WARNING,
        handlers=[budgeted_handler(config.kernel_id, config.log_lines, config.log_interval)],
    )
    try:
        asyncio.run(serve(config))
    except CredentialsError as exc:
        print(f"kernel {config.kernel_id}: egress proxy not started: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

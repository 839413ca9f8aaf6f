"""The proxy's side of ``egress_secrets``: TLS terminated for the hosts that have a secret, the
real credential added to each request there, and kept out of everything the kernel reads.

For a ``CONNECT`` to such a host the proxy answers 200, completes the TLS handshake itself with
a certificate from the kernel's own CA (:mod:`.ca`), and reads the HTTP requests inside with
h11. Each request: its ``Host`` must name the CONNECT target; every credential-shaped header
the kernel sent is dropped; the real credential is added (:class:`~.secrets.Application`);
the request goes to the real server over a new TLS connection verified against the host's
trust store (or ``upstream_ca``); the response comes back with every form of the credential
masked (a server that echoes the request cannot hand the key to the kernel), and the request
is written to the decision log as ``"decision": "inject"`` (host, method, path, status; never
the value). Other hosts keep the plain CONNECT tunnel (:func:`.http.tunnel`).
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import StreamReader, StreamWriter
from collections.abc import Callable
from typing import Any

import h11

from kernel_sandbox.egress.ca import KernelCA
from kernel_sandbox.egress.http import (
    CHUNK,
    MAX_HEAD,
    Refused,
    Rewrite,
    Upstream,
    close_writer,
    forward,
    next_event,
    refusal_message,
)
from kernel_sandbox.egress.rules import (
    BAD_TARGET,
    Target,
    TargetError,
    parse_authority,
    parse_target,
)
from kernel_sandbox.egress.secrets import (
    Application,
    Masker,
    SecretSpec,
    parse_secret,
    strip_credentials,
)
from kernel_sandbox.errors import CredentialsError

__all__ = ["Injection", "SecretStore", "serve_intercepted"]

HANDSHAKE_TIMEOUT = 30.0
HEAD_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
REVOKED = "secret-revoked"


class SecretStore:
    """The kernel's secrets: their specs, the values read on the host, and revocations."""

    def __init__(self, entries: dict[str, str]):
        self.specs = [parse_secret(pattern, value) for pattern, value in entries.items()]
        self._values: dict[SecretSpec, str | None] = {}
        self.injected: dict[SecretSpec, int] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def domains(self) -> list[str]:
        """What the kernel's CA may vouch for (``*.corp.test`` -> ``corp.test``)."""
        return [s.rule.host.removeprefix("*.") for s in self.specs]

    def load(self) -> None:
        """Read every value now, so a missing or unsafe source stops the kernel's start.

        Raises:
            CredentialsError: a source is unset, unreadable or unsafe.
        """
        for spec in self.specs:
            self._values[spec] = spec.source.read()

    def spec_for(self, target: Target) -> SecretSpec | None:
        return next((s for s in self.specs if s.matches(target)), None)

    def value(self, spec: SecretSpec) -> str | None:
        """The value to inject; None once revoked."""
        return self._values.get(spec)

    def find(self, host: str) -> list[SecretSpec]:
        """The entries ``host`` names: a pattern as in the policy, a host it matches, or a
        URL to such a host."""
        exact = [s for s in self.specs if str(s.rule) == host or s.rule.host == host]
        if exact:
            return exact
        try:  # a URL as pasted from the notebook, or host[:port] (443 by default)
            target = parse_target(host) if "://" in host else parse_authority(host, 443)
        except TargetError:
            return []
        return [s for s in self.specs if s.matches(target)]

    def revoke(self, host: str) -> list[str]:
        specs = self.find(host)
        for spec in specs:
            self._values[spec] = None
        return [str(s.rule) for s in specs]

    def rotate(self, host: str) -> list[str]:
        """Read the values again from their sources (a rotated file, keyring entry, ...).

        Raises:
            CredentialsError: a source cannot be read; the old value is kept withdrawn.
        """
        specs = self.find(host)
        for spec in specs:
            self._values[spec] = None
            self._values[spec] = spec.source.read()
        return [str(s.rule) for s in specs]

    def change(self, op: str, host: str, kernel_id: str) -> dict[str, Any]:
        """A control request: ``revoke`` or ``rotate`` the secret(s) ``host`` names."""
        try:
            changed = self.revoke(host) if op == "revoke" else self.rotate(host)
        except CredentialsError as exc:
            return {"ok": False, "error": str(exc)}
        if not changed:
            known = ", ".join(s["host"] for s in self.status()) or "none"
            return {
                "ok": False,
                "error": f"kernel {kernel_id} has no egress secret for {host!r} (its secrets: "
                f"{known})",
            }
        return {"ok": True, "changed": changed, "secrets": self.status()}

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "host": str(s.rule),
                "source": str(s.source),
                "apply": str(s.apply),
                "state": "active" if self._values.get(s) is not None else "revoked",
                "injected": self.injected.get(s, 0),
            }
            for s in self.specs
        ]


class Injection(Rewrite):
    """One request to a host with a secret: strip, add, and mask what comes back."""

    def __init__(self, apply: Application, value: str | None, default_port: int = 443):
        self.apply, self.value, self.default_port = apply, value, default_port
        self.masker = Masker(apply.forms(value) if value else [])
        self.stripped: list[str] = []
        self.status: int | None = None

    def request(
        self, headers: list[tuple[bytes, bytes]], path: bytes
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        headers, self.stripped = strip_credentials(headers, self.apply)
        if self.value is None:
            return headers, self.apply.path(path, None)
        # the response is read back for the value: it must come uncompressed
        headers = [(n, v) for n, v in headers if n != b"accept-encoding"]
        headers += [*self.apply.headers(self.value), (b"accept-encoding", b"identity")]
        return headers, self.apply.path(path, self.value)

    def response(
        self, status: int, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        self.status = status
        encoding = [v.strip().lower() for n, v in headers if n == b"content-encoding"]
        if self.value is not None and any(e not in (b"", b"identity") for e in encoding):
            raise Refused(
                502,
                "encoded-response",
                None,
                "egress: the server sent a compressed response, which cannot be checked for "
                "the credential; it was not passed on",
            )
        return [(n, self.masker.mask(v)) for n, v in headers]

    def body(self, data: bytes) -> bytes:
        return self.masker.feed(data)

    def end(self) -> bytes:
        return self.masker.flush()


def _path_only(path: bytes) -> str:
    return path.partition(b"?")[0].decode("ascii", "replace")


async def _connect_tls(
    target: Target, addresses: list[str], context: ssl.SSLContext
) -> tuple[StreamReader, StreamWriter]:
    """A verified TLS connection to the real server (SNI and name check: the target's name)."""
    error: Exception | None = None
    for address in addresses:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    address,
                    target.port,
                    ssl=context,
                    server_hostname=target.host,
                    limit=CHUNK,
                    ssl_handshake_timeout=CONNECT_TIMEOUT,
                ),
                CONNECT_TIMEOUT * 2,
            )
        except ssl.SSLCertVerificationError as exc:
            reason = f"its certificate does not verify ({exc.verify_message}); nothing was sent"
            raise Refused(
                502, "upstream-certificate", target, f"egress to {target} failed: {reason}"
            ) from None
        except (OSError, asyncio.TimeoutError) as exc:
            error = exc
    raise Refused(
        502, "upstream-error", target, f"egress to {target} failed: cannot connect ({error})"
    )


async def _accept_tls(
    writer: StreamWriter, context: ssl.SSLContext
) -> tuple[StreamReader, StreamWriter]:
    """The server side of a TLS handshake on the kernel's connection, as new streams
    (``loop.start_tls``; ``StreamWriter.start_tls`` is Python 3.11+)."""
    await writer.drain()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = await loop.start_tls(
        writer.transport,
        protocol,
        context,
        server_side=True,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    if transport is None:
        raise OSError("the TLS handshake did not complete")
    protocol.connection_made(transport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _check_origin(request: h11.Request, target: Target) -> None:
    """Inside the tunnel a request names its host in ``Host`` only; it must be the target."""
    hosts = [v.decode("ascii", "replace") for n, v in request.headers if n == b"host"]
    if not request.target.startswith(b"/") or len(hosts) != 1:
        reason = "inside the TLS tunnel send origin-form requests with one Host header"
        raise Refused(400, BAD_TARGET, target, refusal_message(target, reason))
    try:
        claimed = parse_authority(hosts[0], default_port=443)
    except TargetError:
        claimed = None
    if claimed != target:
        raise Refused(
            403,
            "host-mismatch",
            target,
            refusal_message(target, f"the Host header ({hosts[0]}) names another target"),
        )


async def serve_intercepted(
    conn: h11.Connection,
    reader: StreamReader,
    writer: StreamWriter,
    target: Target,
    addresses: list[str],
    spec: SecretSpec,
    store: SecretStore,
    ca: KernelCA,
    upstream_tls: ssl.SSLContext,
    record: Callable[..., None],
    refuse: Callable[[Refused, str | None], bytes],
) -> None:
    """Terminate the kernel's TLS for ``target`` and carry its requests with the credential.

    Raises:
        Refused: before the tunnel is up (data sent ahead of the 200).
    """
    if conn.trailing_data[0]:
        reason = "data sent before the CONNECT was answered"
        raise Refused(400, BAD_TARGET, target, refusal_message(target, reason))
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    try:
        reader, writer = await _accept_tls(writer, ca.server_context(target.host))
    except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
        record(target, "error", "client-tls", method="CONNECT", error=str(exc))
        return
    inner = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    upstream: Upstream | None = None
    method: str | None = None
    try:
        while True:
            event = await asyncio.wait_for(next_event(inner, reader, sniff=True), HEAD_TIMEOUT)
            if not isinstance(event, h11.Request):
                break
            method = event.method.decode("ascii", "replace")
            names = {n for n, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                reason = "both Content-Length and Transfer-Encoding (ambiguous framing)"
                raise Refused(400, "bad-framing", target, refusal_message(target, reason))
            _check_origin(event, target)
            value = store.value(spec)
            if value is None:
                reason = f"the credential for {spec.rule} was revoked for this kernel"
                raise Refused(403, REVOKED, target, refusal_message(target, reason))
            if upstream is None:
                up_reader, up_writer = await _connect_tls(target, addresses, upstream_tls)
                upstream = Upstream(target, up_reader, up_writer)
            injection = Injection(spec.apply, value)
            reusable = False
            try:
                reusable = await forward(
                    event, event.target, inner, reader, writer, upstream, injection
                )
            finally:
                store.injected[spec] = store.injected.get(spec, 0) + 1
                record(
                    target,
                    "inject",
                    f"secret {spec.rule}",
                    method=method,
                    path=_path_only(event.target),
                    status=injection.status,
                    stripped=injection.stripped,
                    masked=injection.masker.hits,
                )
            if not reusable:
                await upstream.close()
                upstream = None
            if inner.our_state is not h11.DONE or inner.their_state is not h11.DONE:
                break
            inner.start_next_cycle()
    except Refused as refusal:
        if refusal.target is None:
            refusal.target = target
        if inner.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            writer.write(refuse(refusal, method))
    except (OSError, asyncio.TimeoutError, h11.LocalProtocolError, h11.RemoteProtocolError):
        pass  # a peer went away or broke HTTP: close both sides
    finally:
        if upstream is not None:
            await upstream.close()
        await close_writer(writer)

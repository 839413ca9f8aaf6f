"""The sandbox service's wire format: one JSON request, one JSON reply, per connection.

A client connects to the service's unix socket, sends one request (a JSON object on one line,
``{"op": ..., ...}``) with, where the operation needs them, open directory descriptors
alongside (``SCM_RIGHTS``: the folders to mount, opened by the caller itself), and reads one
reply line: ``{"ok": true, ...}`` or ``{"ok": false, "error": {"type": ..., "message": ...}}``.
A reply may carry descriptors too (``terminal_start``: the master side of the terminal's pty).
One request per connection keeps the service stateless towards its clients: a client whose
service restarted just connects again.

Everything read here is hostile input: a request is bounded in size, in descriptors and in
time, must be a JSON object with a known ``op``, and anything else gets an error reply (or, if
the peer is gone, nothing); nothing in a request says who sent it (see :mod:`.callers`).
"""

from __future__ import annotations

import array
import json
import os
import socket
import time
from typing import Any

from kernel_sandbox import errors
from kernel_sandbox.errors import BadRequest, SandboxError, ServiceUnavailable

__all__ = [
    "MAX_FDS",
    "MAX_REQUEST",
    "OPS",
    "BadRequest",
    "call",
    "error_reply",
    "exchange",
    "raise_for_reply",
    "read_request",
    "send_reply",
]

MAX_REQUEST = 256 * 1024  # bytes of one request line
MAX_REPLY = 4 * 1024 * 1024  # bytes of one reply line (a long ps listing)
MAX_FDS = 16  # directory descriptors one request may carry
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its whole request

# Every operation the service answers.
OPS = frozenset(
    {
        "hello",  # who the service thinks you are, and what you may do
        "start",  # start (or restart) a kernel: connection info back
        "poll",
        "signal",
        "cleanup",
        "adopt",  # a restarted client takes its running kernel back
        "list",  # ps
        "stop",
        "tokens",
        "revoke",
        "audit",  # the audit of the caller's kernels (an operator's: everyone's)
        "egress_pending",
        "egress_decide",
        "terminal_start",  # a terminal's sandbox: the pty's master descriptor back
        "terminal_close",
    }
)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read one request line and the descriptors sent with it.

    The caller owns the returned descriptors (close them). On a malformed request every
    descriptor received is closed before BadRequest is raised.

    Raises:
        BadRequest: too long, not one JSON object, no known ``op``, too many descriptors.
        OSError: the peer went away or took over REQUEST_TIMEOUT in all (a peer that trickles
            a byte at a time is cut off too, not only one that stalls).
    """
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = bytearray()
    fds: list[int] = []
    fd_size = array.array("i").itemsize
    try:
        while b"\n" not in data:
            if len(data) > MAX_REQUEST:
                raise BadRequest(f"request over {MAX_REQUEST} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete request within {REQUEST_TIMEOUT:.0f} s")
            sock.settimeout(left)
            chunk, ancillary, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fd_size))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % fd_size])
                    fds.extend(received)
            if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
                raise BadRequest(f"more than {MAX_FDS} descriptors")
            if not chunk:
                raise BadRequest("connection closed before the end of the request")
            data += chunk
        line = bytes(data.split(b"\n", 1)[0])
        if len(line) > MAX_REQUEST:
            raise BadRequest(f"request over {MAX_REQUEST} bytes")
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"not JSON: {str(exc)[:120]}") from None
        if not isinstance(request, dict):
            raise BadRequest("a request is a JSON object")
        op = request.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise BadRequest(f"unknown op {str(op)[:40]!r}; known: {', '.join(sorted(OPS))}")
        sock.settimeout(REQUEST_TIMEOUT)  # for the reply: a full timeout again
        return request, fds
    except BaseException:
        _close_fds(fds)
        raise


def send_reply(sock: socket.socket, reply: dict[str, Any], fds: list[int] | None = None) -> bool:
    """Send one reply line, with ``fds`` alongside (a peer that is gone is not an error of
    ours). Returns whether it was sent (the caller still owns and closes ``fds``)."""
    line = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
    try:
        if fds:
            sent = sock.sendmsg(
                [line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
            if sent < len(line):
                sock.sendall(line[sent:])
        else:
            sock.sendall(line)
    except OSError:
        return False
    return True


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The reply for an error: its class name (when it is one of ours) and its message."""
    kind = type(exc).__name__ if isinstance(exc, SandboxError) else "SandboxError"
    return {"ok": False, "error": {"type": kind, "message": str(exc)[:4000]}}


def raise_for_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Return a successful reply; raise the error an error reply carries, as its own class
    from :mod:`kernel_sandbox.errors` (the base class for a name we do not know)."""
    if reply.get("ok") is True:
        return reply
    error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    assert isinstance(error, dict)
    kind = getattr(errors, str(error.get("type", "")), None)
    if not (isinstance(kind, type) and issubclass(kind, SandboxError)):
        kind = SandboxError
    raise kind(str(error.get("message", "the sandbox service refused the request")))


def call(
    path: str,
    request: dict[str, Any],
    fds: list[int] | tuple[int, ...] = (),
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Send ``request`` (and ``fds``) to the service at ``path``; return its successful reply
    (descriptors it sent back, if any, are closed).

    Raises:
        ServiceUnavailable: nothing answers at ``path`` (or it hung up without a reply).
        SandboxError: the service refused; its own error class where it names one.
    """
    reply, received = exchange(path, request, fds, timeout)
    _close_fds(received)
    return reply


def exchange(
    path: str,
    request: dict[str, Any],
    fds: list[int] | tuple[int, ...] = (),
    timeout: float = 120.0,
) -> tuple[dict[str, Any], list[int]]:
    """:func:`call`, also returning the descriptors the reply carried (close-on-exec; the
    caller owns them).

    Raises:
        ServiceUnavailable: nothing answers at ``path`` (or it hung up without a reply).
        SandboxError: the service refused; its own error class where it names one.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    received: list[int] = []
    fd_size = array.array("i").itemsize
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ServiceUnavailable(
                f"the sandbox service does not answer at {path}: {exc.strerror or exc}; start "
                "it (`kernel-sandbox serve`, or `systemctl start kernel-sandbox`), or unset "
                "KERNEL_SANDBOX_SERVICE to start sandboxes directly"
            ) from None
        line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        try:
            if fds:
                sock.sendmsg(
                    [line],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
                )
            else:
                sock.sendall(line)
            reply = bytearray()
            while not reply.endswith(b"\n"):
                chunk, ancillary, _flags, _ = sock.recvmsg(
                    65536, socket.CMSG_SPACE(MAX_FDS * fd_size), socket.MSG_CMSG_CLOEXEC
                )
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(payload[: len(payload) - len(payload) % fd_size])
                        received.extend(got)
                if not chunk:
                    break
                reply += chunk
                if len(reply) > MAX_REPLY:
                    raise ServiceUnavailable(f"the sandbox service at {path} sent a reply too long")
        except OSError as exc:
            raise ServiceUnavailable(
                f"the sandbox service at {path} did not answer: {exc.strerror or exc}"
            ) from None
        if not reply:
            raise ServiceUnavailable(f"the sandbox service at {path} hung up without a reply")
        try:
            decoded = json.loads(reply)
        except ValueError:
            raise ServiceUnavailable(
                f"the sandbox service at {path} sent a malformed reply"
            ) from None
        if not isinstance(decoded, dict):
            raise ServiceUnavailable(f"the sandbox service at {path} sent a malformed reply")
        return raise_for_reply(decoded), received
    except BaseException:
        _close_fds(received)
        raise
    finally:
        sock.close()

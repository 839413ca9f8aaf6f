"""Approve-once, from the host: list waiting egress requests, approve or deny them.

The same calls back ``kernel-sandbox egress pending|approve|deny`` and any front end (a
JupyterLab prompt, a chat bot)::

    from kernel_sandbox.egress import EgressControl
    control = EgressControl()                    # the default runtime root of this user
    for request in control.pending():
        print(request.kernel_id, request.target, request.seconds_left)
    control.approve(kernel_id, "pypi.corp.test:443")              # this request only
    control.approve(kernel_id, "pypi.corp.test:443", always=True) # for this kernel's life
    control.deny(kernel_id, "x.test:443")
    control.secrets(kernel_id)                   # egress_secrets: host, source, state, count
    control.revoke_secret(kernel_id, "api.corp.test")   # withdrawn from the next request on
    control.rotate_secret(kernel_id, "api.corp.test")   # read again from its source

Each kernel's proxy answers on a control socket in the host-only part of its runtime
directory (mode 0700, the host user's), so code inside a sandbox can never approve anything.
An approval holds for that one kernel only; silence denies when the request's time is up.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import EgressControlError  # defined there, kept here
from kernel_sandbox.host.rundir import default_root
from kernel_sandbox.inside.contract import EGRESS_CONTROL_SOCKET

__all__ = ["EgressControl", "EgressControlError", "PendingRequest"]


@dataclass(frozen=True)
class PendingRequest:
    """A request to an unlisted target, waiting for a person."""

    kernel_id: str
    target: str
    since: float
    expires: float
    waiting: int
    reason: str | None = None  # an agent's request_egress, registered ahead

    @property
    def seconds_left(self) -> float:
        return max(0.0, self.expires - time.time())


def _ask(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return dict(json.loads(data))


class EgressControl:
    """Talk to the egress proxies of this user's kernels under one runtime root."""

    def __init__(self, runtime_root: str | None = None):
        self.runtime_root = Path(runtime_root or default_root())

    def _endpoints(self) -> Iterator[tuple[str, Path]]:
        """(kernel id, control socket) of every kernel whose proxy answers."""
        if not self.runtime_root.is_dir():
            return
        for path in sorted(self.runtime_root.glob(f"*/{EGRESS_CONTROL_SOCKET}")):
            try:
                status = _ask(path, {"op": "status"})
            except (OSError, ValueError):
                continue  # a proxy that is gone: nothing can be waiting there
            if status.get("ok"):
                yield str(status["kernel_id"]), path

    def kernels(self) -> list[str]:
        """Ids of the kernels that have an egress proxy running."""
        return [kernel_id for kernel_id, _ in self._endpoints()]

    def _endpoint(self, kernel_id: str) -> Path:
        matches = [(k, p) for k, p in self._endpoints() if k == kernel_id]
        if not matches:
            matches = [(k, p) for k, p in self._endpoints() if k.startswith(kernel_id)]
        if len(matches) != 1:
            known = ", ".join(self.kernels()) or "none"
            what = "no" if not matches else "more than one"
            raise EgressControlError(
                f"{what} kernel with an egress proxy matches {kernel_id!r} under "
                f"{self.runtime_root} (kernels: {known}); see `kernel-sandbox egress pending`"
            )
        return matches[0][1]

    def pending(self, kernel_id: str | None = None) -> list[PendingRequest]:
        """Requests waiting for a decision, oldest first (of one kernel, or of all)."""
        paths = [self._endpoint(kernel_id)] if kernel_id else [p for _, p in self._endpoints()]
        found: list[PendingRequest] = []
        for path in paths:
            try:
                reply = _ask(path, {"op": "pending"})
            except (OSError, ValueError):
                continue
            found += [PendingRequest(reply["kernel_id"], **p) for p in reply.get("pending", [])]
        return sorted(found, key=lambda p: p.since)

    def approve(self, kernel_id: str, target: str, always: bool = False) -> int:
        """Let the waiting requests to ``target`` (host:port) through; with ``always``, also
        later ones of this kernel. Returns how many waiting requests were let through.

        Raises:
            EgressControlError: no such kernel, or nothing waiting (and not ``always``).
        """
        return self._decide("approve", kernel_id, target, always)

    def deny(self, kernel_id: str, target: str, always: bool = False) -> int:
        """Refuse the waiting requests to ``target``; with ``always``, also later ones."""
        return self._decide("deny", kernel_id, target, always)

    def request(self, kernel_id: str, target: str, reason: str) -> dict[str, Any]:
        """Register a question about ``target`` before anything connects (ask mode; an
        agent's ``request_egress``). Returns ``target``, ``since`` and ``expires``."""
        return self._op(kernel_id, {"op": "request", "target": target, "reason": reason})

    def outcome(self, kernel_id: str, target: str) -> dict[str, Any] | None:
        """The last verdict for ``target`` in that kernel: ``verdict`` (approve, deny,
        expired), ``always``, ``at``; None while undecided."""
        reply = self._op(kernel_id, {"op": "outcome", "target": target})
        return dict(reply["outcome"]) if reply.get("outcome") else None

    def _op(self, kernel_id: str, request: dict[str, Any]) -> dict[str, Any]:
        path = self._endpoint(kernel_id)
        try:
            reply = _ask(path, request)
        except (OSError, ValueError) as exc:
            raise EgressControlError(
                f"the egress proxy of kernel {kernel_id} did not answer: {exc}"
            ) from exc
        if not reply.get("ok"):
            raise EgressControlError(str(reply.get("error")))
        return reply

    def secrets(self, kernel_id: str) -> list[dict[str, Any]]:
        """The kernel's egress secrets: host, source, apply, state, injected (never a value).

        Raises:
            EgressControlError: no such kernel, or its proxy did not answer.
        """
        return list(self._secret_op("secrets", kernel_id, None)["secrets"])

    def all_secrets(self) -> dict[str, list[dict[str, Any]]]:
        """Every running kernel's egress secrets, by kernel id (kernels without any left out)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for kernel_id, path in self._endpoints():
            try:
                reply = _ask(path, {"op": "secrets"})
            except (OSError, ValueError):
                continue
            if reply.get("secrets"):
                found[kernel_id] = list(reply["secrets"])
        return found

    def revoke_secret(self, kernel_id: str, host: str) -> list[str]:
        """Withdraw the secret for ``host`` (a pattern of the policy, or a host it matches)
        from that kernel: its next request there is refused. Returns the patterns changed.

        Raises:
            EgressControlError: no such kernel, or no secret for ``host``.
        """
        return list(self._secret_op("revoke", kernel_id, host)["changed"])

    def rotate_secret(self, kernel_id: str, host: str) -> list[str]:
        """Read the secret for ``host`` again from its source (a rewritten file, keyring
        entry, ...); the next request carries the new value. Returns the patterns changed.

        Raises:
            EgressControlError: no such kernel, no secret for ``host``, or the source cannot
                be read (the secret is then withdrawn).
        """
        return list(self._secret_op("rotate", kernel_id, host)["changed"])

    def _secret_op(self, op: str, kernel_id: str, host: str | None) -> dict[str, Any]:
        return self._op(kernel_id, {"op": op, "host": host})

    def _decide(self, op: str, kernel_id: str, target: str, always: bool) -> int:
        reply = self._op(kernel_id, {"op": op, "target": target, "always": always})
        return int(reply.get("decided", 0))

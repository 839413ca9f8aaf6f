"""One view of the egress requests waiting for a person, for every front end.

The requests live in each kernel's egress proxy (:mod:`kernel_sandbox.egress.approvals`), on
the host. :class:`PendingStore` lists and decides them for a set of kernels, whichever way
those kernels were started: directly (the proxies' control sockets under a runtime root,
:class:`~kernel_sandbox.egress.control.EgressControl`) or through the sandbox service (which
runs the proxies and lets a caller decide for their own kernels only). The Jupyter Server
extension (:mod:`.extension`), the plain page (:mod:`.page`), ``kernel-sandbox mcp``
(:mod:`.mcp`) and, through the same control sockets, the CLI all decide through it.

Choices are ``once`` (the waiting requests), ``kernel`` (also later ones, for that kernel's
life) and ``deny``. Blocking calls: async callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kernel_sandbox.egress.control import EgressControl
from kernel_sandbox.egress.rules import TargetError, parse_authority
from kernel_sandbox.errors import EgressControlError, SandboxError

__all__ = ["CHOICES", "ApprovalError", "Request", "PendingStore", "Source", "UnknownRequest"]

CHOICES = ("once", "kernel", "deny")


class ApprovalError(EgressControlError):
    """A decision that cannot be made (bad choice, a kernel not in this view)."""


class UnknownRequest(ApprovalError, LookupError):
    """No such request is waiting (decided meanwhile, timed out, or never there)."""


@dataclass(frozen=True)
class Source:
    """Where a kernel's proxy answers: a runtime root (direct) or a service socket."""

    runtime_root: str | None = None
    service: str | None = None


@dataclass(frozen=True)
class Request:
    """One target a kernel waits to reach, as every front end shows it."""

    kernel_id: str
    target: str
    host: str
    port: int
    since: float
    expires: float
    waiting: int
    reason: str | None = None  # an agent's request_egress
    notebook: str | None = None  # the server's session path, when there is one
    kernel_name: str | None = None

    @property
    def id(self) -> str:
        """Stable while it waits; a new question about the same target gets a new one."""
        raw = f"{self.kernel_id}\0{self.target}\0{self.since:.6f}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    @property
    def seconds_left(self) -> float:
        return max(0.0, self.expires - time.time())

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id, "seconds_left": round(self.seconds_left, 1)}


class PendingStore:
    """The waiting requests of the kernels ``kernels()`` names (id -> :class:`Source`).

    ``describe(kernel_id)`` may add ``notebook`` and ``kernel_name`` for display.
    """

    def __init__(
        self,
        kernels: Callable[[], dict[str, Source]],
        describe: Callable[[str], dict[str, str | None]] | None = None,
    ):
        self.kernels = kernels
        self.describe = describe or (lambda _: {})
        self.decided: dict[tuple[str, str], tuple[str, float]] = {}  # by this store

    def pending(self) -> list[Request]:
        """Every waiting request of these kernels, oldest first."""
        kernels = self.kernels()
        by_source: dict[Source, set[str]] = {}
        for kernel_id, source in kernels.items():
            by_source.setdefault(source, set()).add(kernel_id)
        found: list[Request] = []
        for source, ids in by_source.items():
            for row in self._rows(source, ids):
                if row["kernel_id"] in ids:
                    found.append(self._request(row))
        return sorted(found, key=lambda r: r.since)

    def find(self, kernel_id: str, target: str) -> Request:
        """The waiting request of ``kernel_id`` to ``target`` (host:port).

        Raises:
            UnknownRequest: nothing waits there.
        """
        wanted = _target(target)
        for request in self.pending():
            if request.kernel_id == kernel_id and request.target == wanted:
                return request
        raise UnknownRequest(f"no request to {wanted} is waiting in kernel {kernel_id}")

    def decide(self, kernel_id: str, target: str, choice: str) -> int:
        """Approve ``once``, approve for the ``kernel``'s life, or ``deny`` the requests of
        ``kernel_id`` to ``target``. Returns how many waiting connections were decided.

        Raises:
            ApprovalError: a bad choice or target, or a kernel this view does not hold.
            UnknownRequest: nothing waits there (and the choice is ``once``/``deny``).
            EgressControlError: the proxy (or the service) refused or did not answer.
        """
        if choice not in CHOICES:
            raise ApprovalError(f"decision must be one of {', '.join(CHOICES)}, not {choice!r}")
        wanted = _target(target)
        source = self.kernels().get(kernel_id)
        if source is None:
            raise ApprovalError(f"kernel {kernel_id} is not one of this server's kernels")
        self.find(kernel_id, wanted)  # decided meanwhile or timed out: say so
        op = "deny" if choice == "deny" else "approve"
        always = choice == "kernel"
        if source.service:
            from kernel_sandbox.service.client import ServiceClient

            try:
                reply = ServiceClient(source.service, timeout=30).ask(
                    "egress_decide", decision=op, kernel_id=kernel_id, target=wanted, always=always
                )
            except SandboxError as exc:  # refused by the operator's rules, or unreachable
                raise EgressControlError(f"the sandbox service: {exc}") from exc
            count = int(reply.get("decided", 0))
        else:
            control = EgressControl(source.runtime_root)
            count = (control.approve if op == "approve" else control.deny)(
                kernel_id, wanted, always=always
            )
        self.decided[(kernel_id, wanted)] = (choice, time.time())
        return count

    def _rows(self, source: Source, ids: set[str]) -> list[dict[str, Any]]:
        if source.service:
            from kernel_sandbox.service.client import ServiceClient

            try:
                reply = ServiceClient(source.service, timeout=10).ask("egress_pending")
            except (OSError, ValueError, SandboxError):
                return []
            return list(reply.get("pending") or [])
        # every proxy under the root answers once; the caller keeps its own kernels' rows
        return [asdict(p) for p in EgressControl(source.runtime_root).pending()]

    def _request(self, row: dict[str, Any]) -> Request:
        target = parse_authority(str(row["target"]))
        extra = self.describe(str(row["kernel_id"]))
        return Request(
            kernel_id=str(row["kernel_id"]),
            target=str(target),
            host=target.host,
            port=target.port,
            since=float(row["since"]),
            expires=float(row["expires"]),
            waiting=int(row.get("waiting", 0)),
            reason=row.get("reason"),
            notebook=extra.get("notebook"),
            kernel_name=extra.get("kernel_name"),
        )


def _target(text: str) -> str:
    try:
        return str(parse_authority(text))
    except TargetError as exc:
        raise ApprovalError(f"target must be host:port ({exc})") from None

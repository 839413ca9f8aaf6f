"""Ask mode: requests to unlisted targets wait for a person, who approves or denies them.

A request to a target no rule allows, in a kernel whose ``egress_mode`` is ``ask``, waits
(up to ``egress_ask_timeout``) until someone runs ``kernel-sandbox egress approve|deny``
(:mod:`.control`, through the proxy's host-only control socket); silence denies. Requests to
the same target wait together and are decided together. ``always`` makes the verdict stand
for the kernel's life.

A request can also be registered before anything connects (``request``: the agent's
``request_egress``, with its reason); approving it once lets the kernel's next connection to
that target through within the ask timeout. ``outcome`` says what was last decided for a
target, for front ends that wait on a decision (:mod:`kernel_sandbox.approvals`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from kernel_sandbox.egress.rules import Decision, Target, TargetError, parse_authority

__all__ = ["Approvals", "Pending"]


class Pending:
    """Requests to one unlisted target waiting for a person (ask mode)."""

    def __init__(self, target: Target, timeout: float, reason: str | None = None):
        self.target = target
        self.since = time.time()
        self.expires = self.since + timeout
        self.waiting = 0
        self.reason = reason  # given by whoever registered it ahead (request_egress)
        self.future: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()


class Approvals:
    """One kernel's waiting requests and standing verdicts.

    ``record(target, decision, rule, **extra)`` appends to the proxy's decision log and
    ``notify(message, **extra)`` tells the kernel (a notice shown in the cell).
    """

    def __init__(
        self,
        kernel_id: str,
        ask_timeout: float,
        record: Callable[..., None],
        notify: Callable[..., None],
    ):
        self.kernel_id, self.ask_timeout = kernel_id, ask_timeout
        self.record, self.notify = record, notify
        self.always_allow: set[Target] = set()
        self.always_deny: set[Target] = set()
        self.pending: dict[Target, Pending] = {}
        self.once_allow: dict[Target, float] = {}  # approved ahead: the next request, until
        self.outcomes: dict[Target, dict[str, Any]] = {}  # the last verdict per target

    def standing(self, target: Target) -> Decision | None:
        """The verdict a person gave for the kernel's life (``always``), if any."""
        if target in self.always_allow:
            return Decision(True, "approved always")
        if target in self.always_deny:
            return Decision(False, "denied always", "denied for this kernel")
        if self.once_allow.pop(target, 0.0) > time.time():
            return Decision(True, "approved once")
        return None

    def request(self, target: Target, reason: str) -> dict[str, Any]:
        """Register a question about ``target`` before anything connects (an agent's
        ``request_egress``); requests that connect meanwhile wait on the same question."""
        pending = self.pending.get(target)
        if pending is None or pending.future.done() or pending.expires <= time.time():
            pending = self.pending[target] = Pending(target, self.ask_timeout, reason[:500])
            self.outcomes.pop(target, None)
            self.record(target, "ask", "ask", method="request")
        return {"target": str(target), "since": pending.since, "expires": pending.expires}

    def outcome(self, target: Target) -> dict[str, Any] | None:
        """What was last decided for ``target`` (verdict, always, at), or None yet."""
        pending = self.pending.get(target)
        if pending is not None and not pending.future.done():
            if pending.expires > time.time():
                return None
            del self.pending[target]
            self.outcomes[target] = {"verdict": "expired", "always": False, "at": time.time()}
        return self.outcomes.get(target)

    async def ask(self, target: Target, method: str) -> Decision:
        """Wait for a person's verdict on ``target``; no verdict in time denies."""
        pending = self.pending.get(target)
        if pending is None or pending.future.done() or pending.expires <= time.time():
            pending = self.pending[target] = Pending(target, self.ask_timeout)
            self.outcomes.pop(target, None)
            self.record(target, "ask", "ask", method=method)
            self.notify(
                f"egress to {target} is waiting for approval (up to "
                f"{self.ask_timeout:.0f}s): kernel-sandbox egress approve "
                f"{self.kernel_id} {target}   (or: ... egress deny ...)",
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
                self.outcomes[target] = {"verdict": "expired", "always": False, "at": time.time()}
            return Decision(False, "ask-timeout", f"no approval within {self.ask_timeout:.0f}s")
        finally:
            pending.waiting -= 1
        if verdict == "approve":
            return Decision(True, "approved always" if always else "approved once")
        if verdict == "deny":
            return Decision(False, "ask-denied", "denied by a person")
        return Decision(False, "ask-denied", verdict)

    def waiting(self) -> list[dict[str, Any]]:
        """The targets with requests still waiting, for ``egress pending``."""
        now = time.time()
        return [
            {"target": str(p.target), "since": p.since, "expires": p.expires, "waiting": p.waiting}
            | ({"reason": p.reason} if p.reason is not None else {})
            for p in self.pending.values()
            if not p.future.done() and p.expires > now
        ]

    def settle(self, op: str, target_text: str, always: bool) -> dict[str, Any]:
        """Approve or deny (``op``) the requests waiting for ``target_text``; with ``always``,
        later ones too. Returns the control reply's fields, or ``ok: False`` and an error."""
        try:
            target = parse_authority(target_text)
        except TargetError as exc:
            return {
                "ok": False,
                "error": f"TARGET must be host:port as listed by `egress pending` ({exc})",
            }
        if always:
            (self.always_allow if op == "approve" else self.always_deny).add(target)
            (self.always_deny if op == "approve" else self.always_allow).discard(target)
        pending = self.pending.pop(target, None)
        if pending is not None and (pending.future.done() or pending.expires <= time.time()):
            pending = None  # an agent's question nobody answered in time
        decided = 0
        if pending is not None:
            pending.future.set_result((op, always))
            decided = pending.waiting
            if op == "approve" and not always and pending.waiting == 0:
                self.once_allow[target] = time.time() + self.ask_timeout
        if pending is not None or always:
            self.outcomes[target] = {"verdict": op, "always": always, "at": time.time()}
        if not always and pending is None:
            return {
                "ok": False,
                "error": f"no request to {target} is waiting in kernel {self.kernel_id}",
            }
        self.record(target, op, f"{op} by a person" + (" (always)" if always else ""))
        return {"target": str(target), "decided": decided, "always": always}

    def close(self) -> None:
        """Release every waiting request: the proxy is shutting down."""
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_result(("proxy shutting down", False))

"""Per-caller views: ``ps``, ``stop``, ``tokens``, ``egress pending|approve|deny`` through
the service.

On a shared machine the users hold neither the engine, nor the token database, nor the egress
proxies' control sockets: the service does, and answers these operations for each caller on
its own kernels only. Another user's kernel is treated as if it did not exist (the same "no
kernel" error as a wrong id), so ids cannot be probed. An operator (``operator = true`` in the
policy file, :class:`~kernel_sandbox.service.rules.CallerRules`) sees and acts on all.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

from kernel_sandbox.broker.tokens import TokenRecord, TokenStore
from kernel_sandbox.egress.control import EgressControl
from kernel_sandbox.errors import BadRequest, NoSuchKernel, TokenNotFound
from kernel_sandbox.service.callers import Caller
from kernel_sandbox.service.kernels import KernelRegistry, ServedKernel, _user_name

__all__ = ["CallerViews", "visible_kernels"]

MAX_IDENT = 200  # characters of a kernel id, prefix, container name or token id


def visible_kernels(
    kernels: list[ServedKernel], caller: Caller, operator: bool
) -> dict[str, ServedKernel]:
    """The kernels ``caller`` may see and act on: its own, or all for an operator."""
    return {k.kernel_id: k for k in kernels if operator or k.uid == caller.uid}


def _pod(kernel: ServedKernel) -> str | None:
    """A pod kernel's ``pod/NAME`` (as ``ps`` shows it), else None."""
    kube = getattr(kernel.provisioner, "_kube", None)
    return f"pod/{kube.pod_name}" if kube is not None and kube.pod_name else None


def resolve(kernels: dict[str, ServedKernel], ident: str, caller: Caller) -> ServedKernel:
    """The one kernel ``ident`` names among ``kernels``: its id, its container's name or id,
    or a unique prefix of its id (as ``kernel-sandbox stop`` takes them in direct mode).

    Raises:
        NoSuchKernel: nothing visible matches, or the prefix matches several.
    """
    exact = [
        k
        for k in kernels.values()
        if ident
        in (
            k.kernel_id,
            k.provisioner.container_name,
            k.provisioner.container_id,
            _pod(k),
        )
    ]
    matches = exact or [k for k in kernels.values() if k.kernel_id.startswith(ident)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NoSuchKernel(f"no kernel {ident!r} of {caller.describe()} (see kernel-sandbox ps)")
    ids = ", ".join(sorted(k.kernel_id for k in matches))
    raise NoSuchKernel(f"{ident!r} matches kernels {ids}; give more of the id")


def _text(request: dict[str, Any], key: str, default: str | None = None) -> str:
    value = request.get(key, default)
    if not isinstance(value, str) or not value or len(value) > MAX_IDENT:
        raise BadRequest(f"{key} must be a non-empty string of at most {MAX_IDENT} characters")
    return value


class CallerViews:
    """The per-caller operations over one :class:`KernelRegistry`."""

    def __init__(self, registry: KernelRegistry, terminals: Any = None):
        self.registry = registry
        self.terminals = terminals  # a TerminalRegistry (service/terminals.py), or None

    @property
    def token_db(self) -> str | None:
        value = self.registry.provisioner_config.get("token_db")
        return str(value) if value else None

    @property
    def runtime_root(self) -> str | None:
        value = self.registry.provisioner_config.get("runtime_root")
        return str(value) if value else None

    def _visible(self, caller: Caller) -> tuple[dict[str, ServedKernel], bool]:
        operator = bool(self.registry.rules.current().for_caller(caller).operator)
        # a snapshot: the loop thread may add or drop kernels meanwhile
        return visible_kernels(list(self.registry.kernels.values()), caller, operator), operator

    # -- ps and stop (on the service's loop) --------------------------------------------------

    async def ps(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """The caller's kernels as ``kernel-sandbox ps`` shows them, memory in use included:
        running ones, or with ``all`` also those that ended and are not cleaned up yet."""
        kernels, operator = self._visible(caller)
        listed = sorted(kernels.values(), key=lambda k: k.started)
        states = await asyncio.gather(*(self._state(k) for k in listed))
        now = time.time()
        rows = await self._terminal_rows(caller, operator, now)
        for kernel, (state, usage) in zip(listed, states, strict=True):
            if state != "running" and request.get("all") is not True:
                continue
            summary = kernel.summary()
            memory, limit = usage if usage is not None else (None, kernel.memory or None)
            rows.append(
                {
                    **summary,
                    "state": state,
                    "created": kernel.started,
                    "owner": summary["user"],
                    "runtime_dir": "",  # the service's, of no use to the caller
                    "memory": memory,
                    "memory_limit": limit,
                    "uptime": round(max(0.0, now - kernel.started), 1),
                }
            )
        rows.sort(key=lambda row: row["created"])
        return {"kernels": rows, "all": operator}

    def _visible_terminals(self, caller: Caller, operator: bool) -> list[Any]:
        if self.terminals is None:
            return []
        listed = list(self.terminals.terminals.values())
        return [t for t in listed if operator or t.uid == caller.uid]

    async def _terminal_rows(self, caller: Caller, operator: bool, now: float) -> list[dict]:
        """The caller's terminals as ``ps`` rows (kind ``terminal``; they end when closed)."""
        rows = []
        for terminal in self._visible_terminals(caller, operator):
            summary = terminal.summary()
            usage = None
            try:
                usage = await terminal.resources.backend.memory_usage(
                    terminal.resources.container_id
                )
            except Exception:  # an engine hiccup (or a container just removed)
                pass
            memory, limit = usage if usage is not None else (None, terminal.memory or None)
            rows.append(
                {
                    **summary,
                    "state": "running",
                    "created": terminal.started,
                    "owner": summary["user"],
                    "runtime_dir": "",
                    "memory": memory,
                    "memory_limit": limit,
                    "uptime": round(max(0.0, now - terminal.started), 1),
                }
            )
        return rows

    async def _state(self, kernel: ServedKernel) -> tuple[str, tuple[int, int] | None]:
        """The container's state and (memory used, limit) while it runs."""
        prov = kernel.provisioner
        if prov._kube is not None:  # a pod: its state from the API server (no usage figure)
            if not prov._kube.pod_name:
                return "starting", None
            try:
                return ("running" if await prov.poll() is None else "exited"), None
            except Exception:
                return "unknown", None
        if not prov.container_id:
            return "starting", None
        try:
            if not (await prov.engine.state(prov.container_id)).running:
                return "exited", None
            usage: tuple[int, int] | None = await prov.engine.memory_usage(prov.container_id)
        except Exception:  # an engine hiccup must not fail the whole listing
            return "unknown", None
        return "running", usage

    async def stop(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """End one of the caller's kernels (its clients are told why), waiting up to
        ``timeout`` seconds for its container to end; ``force``: SIGKILL at once."""
        kernels, operator = self._visible(caller)
        ident = _text(request, "kernel_id")
        terminals = {t.terminal_id: t for t in self._visible_terminals(caller, operator)}
        named = [t for i, t in terminals.items() if i == ident or i.startswith(ident)]
        if (
            self.terminals is not None
            and len(named) == 1
            and not any(k.startswith(ident) for k in kernels)
        ):
            return dict(await self.terminals.stop(caller, named[0]))
        kernel = resolve(kernels, ident, caller)
        timeout = request.get("timeout", 10.0)
        if not isinstance(timeout, (int, float)) or not 0 <= timeout <= 300:
            raise BadRequest("timeout must be a number of seconds, 0-300")
        await self.registry.stop(caller, {"kernel_id": kernel.kernel_id})
        prov = kernel.provisioner
        if request.get("force") is True:
            await prov.send_signal(9)
        deadline = time.monotonic() + float(timeout)
        ended = False
        while prov._kube is not None and prov._kube.pod_name:  # a pod: deleted, then gone
            ended = await prov.poll() is not None
            if ended or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        while prov.container_id:
            ended = not (await prov.engine.state(prov.container_id)).running
            if ended or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        return {
            "stopped": kernel.kernel_id,
            "user": _user_name(kernel.uid),
            "kernelspec": kernel.summary()["kernelspec"],
            "container": kernel.summary()["container"],
            "ended": ended,
        }

    # -- data tokens (in the handler's thread: SQLite, no kernel state changes) --------------

    def _store(self) -> TokenStore | None:
        db = self.token_db
        if db is None:
            return None
        from pathlib import Path

        return TokenStore(db) if Path(db).exists() else None

    def _token_rows(
        self, records: list[TokenRecord], kernels: dict[str, ServedKernel], operator: bool
    ) -> list[dict[str, Any]]:
        now = time.time()
        rows = []
        for record in records:
            kernel = kernels.get(record.kernel_id)
            if kernel is None and not operator:
                continue
            user = _user_name(kernel.uid) if kernel is not None else ""
            rows.append({**record.to_dict(now), "user": user})
        return rows

    def tokens(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """The data tokens of the caller's kernels: ids, scope, expiry, state (never a
        secret: the store has only their hashes). ``all``: expired and revoked ones too."""
        kernels, operator = self._visible(caller)
        store = self._store()
        if store is None:
            return {"tokens": [], "all": operator}
        try:
            records = store.records(include_dead=request.get("all") is True)
        finally:
            store.close()
        return {"tokens": self._token_rows(records, kernels, operator), "all": operator}

    def revoke(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """Revoke one token, or every live token of a kernel, of the caller's."""
        ident = _text(request, "ident")
        reason = request.get("reason") or "revoked by user"
        if not isinstance(reason, str) or len(reason) > 500:
            raise BadRequest("reason must be a string of at most 500 characters")
        kernels, operator = self._visible(caller)
        store = self._store()
        try:
            records = store.records(include_dead=True) if store is not None else []
            mine = [
                r
                for r in records
                if ident in (r.token_id, r.kernel_id) and (operator or r.kernel_id in kernels)
            ]
            if not mine or store is None:
                raise TokenNotFound(
                    f"no token or kernel {ident!r} of {caller.describe()}; "
                    "`kernel-sandbox tokens list --all` shows them"
                )
            why = f"{reason} ({caller.name}, through the sandbox service)"
            revoked = []
            for record in mine:
                if record.revoked is None:
                    revoked += store.revoke(record.token_id, reason=why)
        finally:
            if store is not None:
                store.close()
        return {"revoked": [{"token_id": r.token_id, "kernel_id": r.kernel_id} for r in revoked]}

    # -- egress approvals (the service runs the proxies, so it reaches their control sockets)

    def _control(self) -> EgressControl:
        return EgressControl(self.runtime_root)

    def audit(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """The audit records of the caller's kernels (an operator's: everyone's)."""
        from kernel_sandbox.service.audit_view import audit_reply

        config = self.registry.provisioner_config
        chains = [str(config[key]) for key in ("audit_log", "egress_log") if config.get(key)]
        operator = bool(self.registry.rules.current().for_caller(caller).operator)
        return audit_reply(chains, caller.uid, operator, request)

    def egress_pending(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """The caller's kernels' egress requests waiting for a decision."""
        kernels, operator = self._visible(caller)
        control = self._control()
        if request.get("kernel") is not None:
            kernel = resolve(kernels, _text(request, "kernel"), caller)
            waiting = control.pending(kernel.kernel_id)
        else:
            waiting = control.pending()
        rows = []
        for pending in waiting:
            owner = kernels.get(pending.kernel_id)
            if owner is None:
                continue  # another user's (or a proxy no kernel of ours owns)
            row = {**asdict(pending), "seconds_left": round(pending.seconds_left, 1)}
            rows.append({**row, "user": _user_name(owner.uid)})
        return {"pending": rows, "all": operator}

    def egress_decide(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """Approve or deny (once, or ``always`` for the kernel's life) the waiting requests to
        ``target`` of one of the caller's kernels."""
        decision = request.get("decision")
        if decision not in ("approve", "deny"):
            raise BadRequest("decision must be 'approve' or 'deny'")
        target = _text(request, "target")
        always = request.get("always", False)
        if not isinstance(always, bool):
            raise BadRequest("always must be true or false")
        kernels, operator = self._visible(caller)
        kernel = resolve(kernels, _text(request, "kernel_id"), caller)
        if decision == "approve" and not operator:
            # A user approves only within the operator's allowlist for them (egress_mode ask
            # asks about every host; the operator's rules say which ones a user may open).
            self.registry.rules.current().for_caller(caller).check_egress([target])
        control = self._control()
        decide = control.approve if decision == "approve" else control.deny
        count = decide(kernel.kernel_id, target, always=always)
        return {"decided": count, "kernel_id": kernel.kernel_id}

"""Kernel pods whose owner is gone: found by their labels, deleted with their Secrets and
NetworkPolicies.

The owner record is the pod's annotations (host, pid and the pid's start time, written by
:func:`kernel_sandbox.kube.kernel.owner_record`); only pods of this host's owners are judged
(another host's owner cannot be checked from here: in the cluster, ``kube_owner_pod`` makes
the owner's pod their owner, and the garbage collector deletes them with it). A Secret or
NetworkPolicy whose pod never came (a start interrupted while the API server was away) is
deleted once its owner is gone too.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.errors import EngineError, EngineUnavailable
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.kube.api import NETWORK_POLICIES, PODS, SECRETS, SERVICES, KubeApi
from kernel_sandbox.kube.podspec import KUBE_PREFIX, label_value

__all__ = [
    "KubeSweep",
    "defer_deletion",
    "is_orphan",
    "pending",
    "retry_deletions",
    "start_sweep",
    "sweep",
]


@dataclass
class KubeSweep:
    """What one sweep deleted (or, dry, would delete): object names by kind."""

    pods: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # "secrets/NAME", "networkpolicies/NAME"

    def __bool__(self) -> bool:
        return bool(self.pods or self.others)


def is_orphan(obj: dict[str, Any]) -> bool:
    """Whether the owner process named in ``obj``'s annotations is dead (on this host)."""
    notes = obj.get("metadata", {}).get("annotations") or {}
    try:
        pid = int(notes.get(KUBE_PREFIX + "owner-pid", "0"))
    except ValueError:
        return False
    owner = Owner(
        notes.get(KUBE_PREFIX + "owner-host", ""),
        pid,
        notes.get(KUBE_PREFIX + "owner-start") or None,
    )
    return owner.is_alive() is False


def selector(service: bool = False) -> str:
    """This host's kernels' objects: those of direct-mode owners, or (``service``) those the
    sandbox service runs for its callers, which only the service judges (a restarted service
    adopts them although the owner record names its previous process)."""
    host = label_value(socket.gethostname())
    which = f"{KUBE_PREFIX}service=true" if service else f"!{KUBE_PREFIX}service"
    return f"{KUBE_PREFIX}managed=true,{KUBE_PREFIX}owner-host={host},{which}"


async def sweep(
    api: KubeApi, dry_run: bool = False, service: bool = False, keep: frozenset[str] = frozenset()
) -> KubeSweep:
    """Delete the objects of this host's kernels whose owner process is dead (``service``: of
    the service's kernels, but for the pods in ``keep`` and their objects)."""
    report = KubeSweep()
    for pod in await api.list(PODS, selector(service)):
        if pod["metadata"]["name"] in keep:
            continue
        if is_orphan(pod):
            name = pod["metadata"]["name"]
            report.pods.append(name)
            if not dry_run:
                await api.delete(PODS, name, 0)
    kept = {n.rsplit("-", 1)[0] for n in keep}  # ks-KEY-RANDOM: the kernel's Service ks-KEY
    for kind in (SECRETS, NETWORK_POLICIES, SERVICES):
        for obj in await api.list(kind, selector(service)):
            if obj["metadata"]["name"] in keep or obj["metadata"]["name"] in kept:
                continue
            if is_orphan(obj):
                name = obj["metadata"]["name"]
                report.others.append(f"{kind}/{name}")
                if not dry_run:
                    await api.delete(kind, name)
    return report


_swept: set[tuple[str, str]] = set()
_lock = threading.Lock()
# Objects this process failed to delete (the API server was away): retried on its next calls.
_pending: dict[tuple[str, str], set[tuple[str, str]]] = {}


def _key(api: KubeApi) -> tuple[str, str]:
    return (f"{api.config_file}|{api.context}", api.namespace)


def defer_deletion(api: KubeApi, kind: str, name: str) -> None:
    """Remember ``kind``/``name`` for :func:`retry_deletions` (its deletion failed)."""
    with _lock:
        _pending.setdefault(_key(api), set()).add((kind, name))


def pending(api: KubeApi) -> list[str]:
    with _lock:
        return sorted(f"{kind}/{name}" for kind, name in _pending.get(_key(api), ()))


async def retry_deletions(api: KubeApi) -> list[str]:
    """Delete what earlier deletions left (kept for later while the server is still away);
    returns what was deleted now."""
    with _lock:
        todo = sorted(_pending.get(_key(api), ()))
    done = []
    for kind, name in todo:
        try:
            await api.delete(kind, name, 0 if kind == PODS else None)
        except (EngineUnavailable, EngineError):
            break
        done.append(f"{kind}/{name}")
        with _lock:
            _pending.get(_key(api), set()).discard((kind, name))
    return done


def start_sweep(api: KubeApi, log: Any) -> bool:
    """Sweep ``api``'s namespace once per process, in a daemon thread (never delays or breaks a
    start); True when this call started it."""
    key = _key(api)
    with _lock:
        if key in _swept:
            return False
        _swept.add(key)
    own = KubeApi(api.namespace, api.config_file, api.context, api.in_cluster, api.timeout)

    def run() -> None:
        try:
            report = asyncio.run(sweep(own))
        except Exception as exc:  # a failed sweep must never break a kernel start
            log.warning(
                "kernel-sandbox: orphan sweep of namespace %s failed: %s", api.namespace, exc
            )
            return
        finally:
            own.close()
        if report:
            log.info(
                "kernel-sandbox: reaped %d orphaned kernel pod(s) in namespace %s",
                len(report.pods),
                api.namespace,
            )

    threading.Thread(target=run, name="kernel-sandbox-kube-sweep", daemon=True).start()
    return True

"""Kernel pods for ``kernel-sandbox ps``, ``stop`` and ``gc``, next to the Docker sandboxes.

Which clusters to look at comes from the kernelspecs whose policy says ``backend:
kubernetes`` (:func:`kernel_sandbox.cli.doctor_kube.kube_targets`): nothing is asked of any
cluster when none does. A pod is shown as a :class:`~kernel_sandbox.host.sandboxes.Sandbox`
whose container is ``pod/NAME``.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from kernel_sandbox.host.sandboxes import Sandbox
from kernel_sandbox.kube.api import NETWORK_POLICIES, PODS, SECRETS, SERVICES, KubeApi
from kernel_sandbox.kube.podspec import KUBE_PREFIX
from kernel_sandbox.kube.status import read_status

__all__ = ["list_pods", "pod_sandbox", "stop_pod"]


def _created(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def pod_sandbox(pod: dict[str, Any]) -> Sandbox:
    meta = pod.get("metadata", {})
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    state = read_status(pod)
    limits = ((pod.get("spec", {}).get("containers") or [{}])[0].get("resources") or {}).get(
        "limits"
    ) or {}
    memory = limits.get("memory", "")
    return Sandbox(
        kernel_id=notes.get(KUBE_PREFIX + "kernel-id", ""),
        kernelspec=labels.get(KUBE_PREFIX + "kernelspec", ""),
        profile=labels.get(KUBE_PREFIX + "profile", ""),
        container_id=meta.get("uid", ""),
        container=f"pod/{meta.get('name', '')}",
        state=("deleting" if state.deleting else state.phase.lower()),
        created=_created(meta.get("creationTimestamp", "")),
        owner=notes.get(KUBE_PREFIX + "owner", ""),
        owner_pid=int(notes.get(KUBE_PREFIX + "owner-pid", "0") or 0),
        runtime_dir="",
        memory_limit=int(memory) if str(memory).isdigit() else None,
    )


async def list_pods(api: KubeApi, all_states: bool = False) -> list[Sandbox]:
    pods = await api.list(PODS, f"{KUBE_PREFIX}managed=true")
    sandboxes = [pod_sandbox(p) for p in pods]
    if not all_states:
        sandboxes = [s for s in sandboxes if s.state in ("running", "pending")]
    return sorted(sandboxes, key=lambda s: s.created)


async def stop_pod(api: KubeApi, sandbox: Sandbox, grace: int = 2) -> str:
    """Delete the pod and its Secret and NetworkPolicy; its owner sees the kernel dead."""
    name = sandbox.container.removeprefix("pod/")
    await api.delete(PODS, name, grace)
    for kind in (SECRETS, NETWORK_POLICIES):
        await api.delete(kind, name)
    key = name.rsplit("-", 1)[0]  # ks-KEY-RANDOM: the kernel's Service is ks-KEY
    await api.delete(SERVICES, key)
    return f"pod {name} deleted (namespace {api.namespace})"

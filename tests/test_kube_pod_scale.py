"""Thirty kernel pods at once on the test cluster, started five at a time as bench/kube.py
starts them (its own code): each runs a cell, all thirty are then alive together and each
answers, through a new client, with its own kernel id (no kernel reached through another's
Service or address); all are shut down and nothing of theirs is left in the namespace (pods,
Secrets, Services, NetworkPolicies). No timing assertions: bench/kube.py measures."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from typing import Any

import pytest
from support import REPO
from test_kube import kube_spec

from kernel_sandbox.kube.api import NETWORK_POLICIES, PODS, SECRETS, SERVICES, KubeApi
from kernel_sandbox.kube.podspec import KUBE_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

KERNELS = 30
CONCURRENCY = 5


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_kube", REPO / "bench" / "kube.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _output(kc: Any, code: str) -> str:
    """Run ``code`` through the async client ``kc``; its stdout (the cell must succeed)."""
    chunks: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            chunks.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, timeout=60, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(chunks)


async def _remember_own_id(km: Any, kc: Any) -> None:
    out = await _output(kc, f"me = {km.kernel_id!r}\nprint(me)")
    assert out == f"{km.kernel_id}\n"


async def _ask_own_id(km: Any) -> str:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        return (await _output(kc, "print(me)")).strip()
    finally:
        kc.stop_channels()


def _left(api: KubeApi, kernel_ids: set[str]) -> list[str]:
    found = []
    for kind in (PODS, SECRETS, SERVICES, NETWORK_POLICIES):
        for obj in asyncio.run(api.list(kind, f"{KUBE_PREFIX}managed=true")):
            labels = obj["metadata"].get("labels") or {}
            if labels.get(f"{KUBE_PREFIX}kernel-id") in kernel_ids:
                found.append(f"{kind}/{obj['metadata']['name']}")
    return found


def test_thirty_kernel_pods(kube_cluster):
    bench = _bench()
    # requests as small as the API allows: thirty pods' requests must fit a 2-core node
    spec = kube_spec(kube_cluster, kube_request_ratio=0.02)

    services: set[str] = set()

    async def scenario() -> tuple[list[Any], list[BaseException], dict[str, str]]:
        managers, _latencies, errors = await bench.start_kernels(
            spec, KERNELS, CONCURRENCY, each=_remember_own_id
        )
        services.update(str(km.provisioner.kube.service) for km in managers)
        answers: dict[str, str] = {}
        try:
            if not errors:
                gate = asyncio.Semaphore(CONCURRENCY)

                async def ask(km: Any) -> None:
                    async with gate:
                        answers[km.kernel_id] = await _ask_own_id(km)

                await asyncio.gather(*(ask(km) for km in managers))
        finally:
            await asyncio.gather(
                *(km.shutdown_kernel(now=True) for km in managers), return_exceptions=True
            )
        return managers, errors, answers

    managers, errors, answers = asyncio.run(scenario())
    assert not errors, [repr(e) for e in errors]
    kernel_ids = {km.kernel_id for km in managers}
    assert len(kernel_ids) == KERNELS
    assert answers == {kid: kid for kid in kernel_ids}
    assert len(services) == KERNELS  # thirty Services, thirty addresses
    api = KubeApi(kube_cluster.namespace, str(kube_cluster.kubeconfig))
    try:
        deadline = time.monotonic() + 60
        while (left := _left(api, kernel_ids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left behind: {left}"
    finally:
        api.close()

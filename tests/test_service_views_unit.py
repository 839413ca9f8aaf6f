"""Who sees what in the service's per-caller views (kernel_sandbox.service.views), without an
engine: the kernels are plain records, the token database a real SQLite file."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kernel_sandbox.broker.tokens import Grant, TokenStore
from kernel_sandbox.errors import BadRequest, NoSuchKernel, TokenNotFound
from kernel_sandbox.service.callers import Caller
from kernel_sandbox.service.kernels import _user_name
from kernel_sandbox.service.views import CallerViews, resolve, visible_kernels

ALICE = Caller(5001, 5001, 1, "alice", "/home/alice")
BOB = Caller(5002, 5002, 2, "bob", "/home/bob")
ROOT = Caller(0, 0, 3, "root", "/root")


def kernel(kernel_id: str, uid: int, container: str):
    prov = SimpleNamespace(container_name=container, container_id=container * 4)
    return SimpleNamespace(kernel_id=kernel_id, uid=uid, provisioner=prov, started=time.time())


KERNELS = [
    kernel("aaaa1111-a", ALICE.uid, "ks-alice1"),
    kernel("aaaa2222-a", ALICE.uid, "ks-alice2"),
    kernel("bbbb1111-b", BOB.uid, "ks-bob1"),
]


class Rules:
    def __init__(self, operator_uids: set[int]):
        self.operator_uids = operator_uids

    def current(self):
        return self

    def for_caller(self, caller):
        return SimpleNamespace(operator=caller.uid in self.operator_uids)


def views(tmp_path: Path) -> CallerViews:
    registry = SimpleNamespace(
        kernels={k.kernel_id: k for k in KERNELS},
        rules=Rules({0}),
        provisioner_config={"token_db": str(tmp_path / "tokens.sqlite")},
    )
    return CallerViews(registry)  # type: ignore[arg-type]


def test_each_caller_sees_its_own_kernels_an_operator_all():
    assert set(visible_kernels(KERNELS, ALICE, False)) == {"aaaa1111-a", "aaaa2222-a"}
    assert set(visible_kernels(KERNELS, BOB, False)) == {"bbbb1111-b"}
    assert len(visible_kernels(KERNELS, ROOT, True)) == 3
    assert visible_kernels(KERNELS, ROOT, False) == {}


def test_resolve_by_id_prefix_or_container_among_visible_only():
    mine = visible_kernels(KERNELS, ALICE, False)
    assert resolve(mine, "aaaa1111-a", ALICE).kernel_id == "aaaa1111-a"
    assert resolve(mine, "aaaa2", ALICE).kernel_id == "aaaa2222-a"
    assert resolve(mine, "ks-alice1", ALICE).kernel_id == "aaaa1111-a"
    with pytest.raises(NoSuchKernel, match="matches kernels aaaa1111-a, aaaa2222-a"):
        resolve(mine, "aaaa", ALICE)
    # Bob's kernel, by id, prefix or container: as if it did not exist
    for ident in ("bbbb1111-b", "bbbb", "ks-bob1"):
        with pytest.raises(NoSuchKernel, match=f"no kernel '{ident}' of alice"):
            resolve(mine, ident, ALICE)


def test_tokens_and_revoke_per_caller(tmp_path):
    service = views(tmp_path)
    assert service.tokens(ALICE, {})["tokens"] == []  # no database yet: nothing, none made
    assert not (tmp_path / "tokens.sqlite").exists()
    store = TokenStore(tmp_path / "tokens.sqlite")
    grant = {"d": Grant("/srv/d", "read")}
    _, alice = store.mint("aaaa1111-a", grant, 3600)
    _, bob = store.mint("bbbb1111-b", grant, 3600)
    _, gone = store.mint("cccc-ended", grant, 3600)  # a kernel the service no longer runs

    listed = service.tokens(ALICE, {})
    assert [t["token_id"] for t in listed["tokens"]] == [alice.token_id]
    assert listed["tokens"][0]["user"] == _user_name(ALICE.uid)
    assert listed["all"] is False
    everyone = service.tokens(ROOT, {"all": True})
    every_id = {t["token_id"] for t in everyone["tokens"]}
    assert every_id == {alice.token_id, bob.token_id, gone.token_id}

    for ident in (bob.token_id, "bbbb1111-b", gone.token_id, "cccc-ended"):
        with pytest.raises(TokenNotFound, match="of alice"):
            service.revoke(ALICE, {"ident": ident})
    assert {r.token_id for r in store.records()} == {alice.token_id, bob.token_id, gone.token_id}

    reply = service.revoke(ALICE, {"ident": alice.token_id, "reason": "done"})
    assert reply["revoked"] == [{"token_id": alice.token_id, "kernel_id": "aaaa1111-a"}]
    assert service.revoke(ALICE, {"ident": "aaaa1111-a"})["revoked"] == []  # already
    (record,) = [r for r in store.records(True) if r.token_id == alice.token_id]
    assert record.reason == "done (alice, through the sandbox service)"
    assert service.revoke(ROOT, {"ident": "bbbb1111-b"})["revoked"][0]["token_id"] == bob.token_id

    for bad in ({}, {"ident": ""}, {"ident": 5}, {"ident": "x" * 201}):
        with pytest.raises(BadRequest):
            service.revoke(ALICE, bad)


def test_egress_decide_refuses_other_callers_kernels_before_any_proxy(tmp_path):
    service = views(tmp_path)
    request = {"decision": "approve", "kernel_id": "bbbb", "target": "a.test:443"}
    with pytest.raises(NoSuchKernel, match="of alice"):
        service.egress_decide(ALICE, request)
    for bad in ({"decision": "maybe"}, {**request, "always": "yes"}, {**request, "target": ""}):
        with pytest.raises(BadRequest):
            service.egress_decide(ALICE, {**request, **bad})

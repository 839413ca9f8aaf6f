"""Host-only checks of the approvals: the proxy's questions asked ahead and their outcome,
the store's refusals, the page's escaping, the events' schema. No engine, no kernel: the
egress proxy process runs on the host against listeners on 127.0.0.1."""

from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from jupyter_events import EventLogger
from test_egress_proxy import Proxy, get, targets  # noqa: F401 - targets is a fixture

from kernel_sandbox.approvals.events import SCHEMA, SCHEMA_ID, event
from kernel_sandbox.approvals.page import render
from kernel_sandbox.approvals.store import (
    ApprovalError,
    PendingStore,
    Request,
    Source,
    UnknownRequest,
)
from kernel_sandbox.egress import EgressControl, EgressControlError


def test_a_question_asked_ahead_and_approved_once_lets_one_connection_through(
    tmp_path,
    targets,  # noqa: F811
):
    running = Proxy(tmp_path, targets, egress_mode="ask", egress_ask_timeout=20)
    control = EgressControl(str(tmp_path))
    target = f"ask.test:{targets.http_port}"
    store = PendingStore(lambda: {"kernel-one": Source(runtime_root=str(tmp_path))})
    try:
        asked = control.request("kernel-one", target, "the sales table")
        assert asked["target"] == target and asked["expires"] > time.time() + 15
        [request] = store.pending()
        assert (request.host, request.port, request.waiting) == ("ask.test", targets.http_port, 0)
        assert request.reason == "the sales table" and control.outcome("kernel-one", target) is None
        assert store.decide("kernel-one", target, "once") == 0  # nothing connected yet
        assert control.outcome("kernel-one", target)["verdict"] == "approve"
        assert store.pending() == []
        assert b"hello from ask.test" in running.exchange(get(f"http://{target}/hello"))
        # once is once: the next connection waits for a person again, and is denied
        with ThreadPoolExecutor(1) as pool:
            later = pool.submit(running.exchange, get(f"http://{target}/hello"))
            deadline = time.monotonic() + 10
            while not store.pending():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert store.decide("kernel-one", target, "deny") == 1
            assert later.result().startswith(b"HTTP/1.1 403 ")
        assert control.outcome("kernel-one", target)["verdict"] == "deny"
        # a connection joins a question asked ahead, and "kernel" holds for later ones
        control.request("kernel-one", target, "again")
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(running.exchange, get(f"http://{target}/hello"))
            deadline = time.monotonic() + 10
            while not store.pending() or store.pending()[0].waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert store.decide("kernel-one", target, "kernel") == 1
            assert b"hello from ask.test" in joined.result()
        assert b"hello from ask.test" in running.exchange(get(f"http://{target}/hello"))
        # refusals: nothing waits, a bad choice, a kernel outside the view, a bad target
        with pytest.raises(UnknownRequest, match="no request to"):
            store.decide("kernel-one", target, "once")
        with pytest.raises(ApprovalError, match="decision must be one of"):
            store.decide("kernel-one", target, "always")
        with pytest.raises(ApprovalError, match="not one of this server's kernels"):
            store.decide("kernel-two", target, "deny")
        with pytest.raises(ApprovalError, match="host:port"):
            store.decide("kernel-one", "a b", "deny")
        with pytest.raises(EgressControlError, match="host:port"):
            control.request("kernel-one", "not a target", "")
    finally:
        running.close()
    rules = [e["rule"] for e in running.decisions()]
    assert "approved once" in rules and "approved always" in rules and "ask-denied" in rules


def test_a_question_nobody_answers_expires(tmp_path, targets):  # noqa: F811
    running = Proxy(tmp_path, targets, egress_mode="ask", egress_ask_timeout=1)
    control = EgressControl(str(tmp_path))
    target = f"ask.test:{targets.http_port}"
    try:
        control.request("kernel-one", target, "")
        time.sleep(1.3)
        assert control.pending() == []
        assert control.outcome("kernel-one", target)["verdict"] == "expired"
        with pytest.raises(EgressControlError, match="no request to"):
            control.approve("kernel-one", target)
    finally:
        running.close()


def test_questions_ahead_need_ask_mode(tmp_path, targets):  # noqa: F811
    running = Proxy(tmp_path, targets)
    try:
        with pytest.raises(EgressControlError, match="not 'ask'"):
            EgressControl(str(tmp_path)).request("kernel-one", "x.test:443", "")
    finally:
        running.close()


def sample(**fields) -> Request:
    now = time.time()
    values = dict(
        kernel_id="k-1",
        target="files.test:443",
        host="files.test",
        port=443,
        since=now,
        expires=now + 60,
        waiting=1,
        reason=None,
        notebook="a/b.ipynb",
        kernel_name="python3-sandbox",
    )
    return Request(**{**values, **fields})


def test_the_page_escapes_what_a_kernel_or_agent_chose():
    html = render(
        [sample(reason="<script>alert(1)</script>", notebook='"><img src=x>')],
        "/approve",
        {"_xsrf": "t<ok>"},
    )
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert '"><img' not in html and "&quot;&gt;&lt;img" in html
    assert 'value="t&lt;ok&gt;"' in html and 'action="/approve"' in html
    for label in ("Approve once", "Approve for this kernel", "Deny"):
        assert label in html
    assert "No egress request is waiting" in render([], "/")


def test_events_follow_the_registered_schema():
    sink = io.StringIO()
    logger = EventLogger(handlers=[logging.StreamHandler(sink)])
    logger.register_event_schema(SCHEMA)
    request = sample()
    for data in (event("waiting", request), event("decided", request, "kernel")):
        logger.emit(schema_id=SCHEMA_ID, data=data)  # validated against SCHEMA
    with pytest.raises(Exception, match="outcome|enum"):
        logger.emit(schema_id=SCHEMA_ID, data=event("decided", request, "maybe"))
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [(e["action"], e["outcome"]) for e in lines] == [
        ("waiting", None),
        ("decided", "kernel"),
    ]
    assert lines[0]["__schema__"] == SCHEMA_ID and lines[0]["notebook"] == "a/b.ipynb"
    assert request.id == sample(since=request.since).id != sample(since=1.0).id

"""``kernel-sandbox mcp``'s request_egress: URL elicitation sends the person to the approval
page, the tool answers with their decision, and the agent cannot decide for itself.

The server runs as the operator would start it (stdio, spawned by the SDK's client), with an
ask-mode kernelspec whose egress_hosts maps a ``.test`` name to a listener this test starts on
127.0.0.1. The client plays both parts: as the agent it calls tools (all of them, and code in
the kernel that tries the approval page, the control sockets and the CLI) while the request
waits, and none of that decides it; as the person it opens the login link the server printed
and clicks on the page, which does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from support.approvals import FETCH, NAME, ask_kernelspec, fetch_code, listener
from test_mcp_server import COMMAND, TIMEOUT, call, ok, text_of

from kernel_sandbox.egress import EgressControl

pytestmark = pytest.mark.integration

LOGIN = re.compile(r"log in once with (http://127\.0\.0\.1:\d+/login\?key=\S+)")

ATTACK = """
import json, os, subprocess, sys, urllib.parse, urllib.request
found = {{}}
form = urllib.parse.urlencode({{'kernel_id': {kid!r}, 'target': {target!r},
                               'decision': 'kernel', 'form_token': 'guess'}}).encode()
for how, opener in (('through the proxy', urllib.request.build_opener()),
                    ('direct', urllib.request.build_opener(urllib.request.ProxyHandler({{}})))):
    for url in ({page!r}, {base!r} + '/'):
        try:
            found[how + ' ' + url] = opener.open(url, data=form, timeout=10).status
        except Exception as e:
            found[how + ' ' + url] = type(e).__name__ + ': ' + str(e)[:120]
found['control sockets'] = []
for d in ('/run/kernel-sandbox', '/run/kernel-sandbox-host'):
    try:
        found['control sockets'] += [n for n in os.listdir(d) if 'control' in n]
    except OSError:
        pass
cli = subprocess.run([sys.executable, '-m', 'kernel_sandbox.cli', 'egress', 'approve',
                      {kid!r}, {target!r}, '--always'], capture_output=True, text=True)
found['cli'] = [cli.returncode, cli.stderr[-200:]]
print(json.dumps(found))
"""


def login_link(log: Path) -> str:
    found = LOGIN.search(log.read_text())
    assert found, f"no login link on the server's stderr: {log.read_text()[-2000:]}"
    return found.group(1)


def person_decides(login: str, url: str, target: str, decision: str) -> str:
    """What a person does in a browser: log in once, open the page, click."""
    browser = requests.Session()
    assert browser.get(login, timeout=30).status_code == 200  # redirected to the page
    page = browser.get(url, timeout=30)
    assert page.status_code == 200 and target in page.text, page.text
    token = re.search(r'name="form_token" value="([0-9a-f]+)"', page.text).group(1)
    kernel_id = re.search(r'name="kernel_id" value="([^"]+)"', page.text).group(1)
    base = url.split("/?")[0]
    form = {"form_token": token, "kernel_id": kernel_id, "target": target, "decision": decision}
    posted = browser.post(base + "/", data=form, timeout=30)
    assert posted.status_code == 200, posted.text
    return posted.text


async def waiting(kernel_id: str, target: str) -> Any:
    found = [p for p in EgressControl().pending(kernel_id) if p.target == target]
    assert len(found) == 1, EgressControl().pending()
    return found[0]


def test_request_egress_elicits_and_only_the_person_decides(
    tmp_path: Path, jupyter_path: Path, kernel_image: str, leak_check: Any
) -> None:
    name = ask_kernelspec(f"approvals-mcp-{uuid.uuid4().hex[:6]}", kernel_image, timeout=150)
    leak_check.spec(name)
    log = tmp_path / "mcp.log"

    async def go(port: int) -> None:
        target = f"{NAME}:{port}"
        elicited: asyncio.Queue[Any] = asyncio.Queue()

        async def on_elicit(context: Any, params: Any) -> types.ElicitResult:
            await elicited.put(params)
            return types.ElicitResult(action="accept")  # "open the page": the person consents

        server = StdioServerParameters(
            command=COMMAND[0], args=[*COMMAND[1:], "--kernelspec", name], env=dict(os.environ)
        )
        with open(log, "a") as errlog:
            async with stdio_client(server, errlog=errlog) as (read, write):
                async with ClientSession(read, write, elicitation_callback=on_elicit) as session:
                    await asyncio.wait_for(session.initialize(), TIMEOUT)
                    await ok(session, "run_code", code=FETCH)
                    policy = json.loads(await ok(session, "get_policy"))
                    kernel_id = policy["kernel"]["id"]

                    # the agent asks; the person is sent to the page by URL elicitation
                    ask = asyncio.ensure_future(
                        call(session, "request_egress", host=NAME, port=port, reason="sales")
                    )
                    params = await asyncio.wait_for(elicited.get(), TIMEOUT)
                    assert params.mode == "url" and params.url.startswith("http://127.0.0.1:")
                    assert target in params.message and "sales" in params.message
                    pending = await waiting(kernel_id, target)
                    assert pending.reason == "sales" and pending.waiting == 0

                    # the agent tries to decide: with the page's address but no approver
                    # cookie, from the kernel, and with every tool it has
                    base = params.url.split("/?")[0]
                    refused = requests.post(
                        base + "/",
                        data={"kernel_id": kernel_id, "target": target, "decision": "once"},
                        timeout=30,
                    )
                    assert refused.status_code == 401 and "Not logged in" in refused.text
                    attack = ATTACK.format(kid=kernel_id, target=target, page=params.url, base=base)
                    tried = json.loads(
                        (await ok(session, "run_code", code=attack)).splitlines()[-1]
                    )
                    for what, result in tried.items():
                        if what.startswith(("through the proxy", "direct")):
                            assert not isinstance(result, int), (what, result)
                    assert tried["control sockets"] == [] and tried["cli"][0] != 0, tried
                    for tool in (await session.list_tools()).tools:
                        arguments = {
                            "run_code": {"code": "print('approve')"},
                            "read_file": {"path": "egress-control"},
                            "write_file": {"path": "approve", "content": target},
                            "list_files": {"path": "/run/kernel-sandbox-host"},
                        }.get(tool.name)
                        if tool.name != "request_egress" and arguments is not None:
                            await call(session, tool.name, **arguments)
                        elif tool.name not in ("request_egress",):
                            await call(session, tool.name)
                    still = await waiting(kernel_id, target)
                    assert still.since == pending.since and not ask.done()

                    # the person approves once: the tool says so, and the next fetch passes
                    page = await asyncio.to_thread(
                        person_decides, login_link(log), params.url, target, "once"
                    )
                    assert f"{target}: approved once" in page
                    answer = json.loads(text_of(await asyncio.wait_for(ask, TIMEOUT)))
                    assert answer["status"] == "approved once", answer
                    assert answer["asked_by"] == "URL elicitation"
                    # (restart_kernel above gave a fresh kernel: the proxy, and its verdict,
                    # stayed)
                    out = await ok(session, "run_code", code=FETCH + fetch_code(port))
                    assert "(200, 'the data behind /table.csv')" in out, out

                    # asked again and denied: the tool says denied
                    ask = asyncio.ensure_future(
                        call(session, "request_egress", host=NAME, port=port, reason="again")
                    )
                    params = await asyncio.wait_for(elicited.get(), TIMEOUT)
                    await asyncio.to_thread(
                        person_decides, login_link(log), params.url, target, "deny"
                    )
                    answer = json.loads(text_of(await asyncio.wait_for(ask, TIMEOUT)))
                    assert answer["status"] == "denied", answer

    with listener() as port:
        asyncio.run(go(port))

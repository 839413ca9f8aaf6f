"""The approvals' Jupyter Server extension, against a real server and a real ask-mode kernel.

A notebook session on a sandboxed kernel whose policy asks a person about unlisted targets
(``egress_mode: ask``) fetches from a listener this test starts on 127.0.0.1 (under a
``.test`` name that egress_hosts maps there). The request shows in the REST list with its
host, port, kernel and notebook; an event announces it on the server's event stream; the
decision (once, for the kernel, deny: through the REST API and through the plain page) lets
the cell go on or fails it, and an event says so. Without the server's token nothing is
shown or decided.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import websocket
from support.approvals import FETCH, NAME, OTHER, ask_kernelspec, fetch_code, listener
from support.servers import Server, execute, jupyter_server

from kernel_sandbox.approvals.events import SCHEMA_ID

pytestmark = pytest.mark.integration

API = "/kernel-sandbox/approvals/api/requests"
PAGE = "/kernel-sandbox/approvals"
EXTENSION = "--ServerApp.jpserver_extensions={'kernel_sandbox.approvals': True}"


ATTACK = """
import json, os, subprocess, sys, urllib.request
found = {{}}
body = json.dumps({{'kernel_id': {kid!r}, 'target': {target!r}, 'decision': 'kernel'}}).encode()
for how, opener in (('through the proxy', urllib.request.build_opener()),
                    ('direct', urllib.request.build_opener(urllib.request.ProxyHandler({{}})))):
    for host in ('127.0.0.1', 'localhost'):
        url = f'http://{{host}}:{port}{api}'
        json_type = {{'Content-Type': 'application/json'}}
        request = urllib.request.Request(url, data=body, headers=json_type)
        try:
            found[how + ' ' + url] = opener.open(request, timeout=10).status
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


def wait_for_request(server: Server, target: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in server.api("GET", API).json()["requests"] if r["target"] == target]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no request to {target} appeared")


def next_event(events: websocket.WebSocket, action: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.settimeout(max(0.1, deadline - time.monotonic()))
        message = json.loads(events.recv())
        if message.get("schema_id") == SCHEMA_ID and message.get("action") == action:
            return message
    raise AssertionError(f"no {action!r} event within {timeout}s")


def test_rest_page_and_events(tmp_path, jupyter_path, kernel_image, leak_check):
    name = ask_kernelspec(f"approvals-{uuid.uuid4().hex[:6]}", kernel_image)
    leak_check.spec(name)
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    with (
        listener() as port,
        jupyter_server(root, tmp_path / "server.log", EXTENSION) as server,
        ThreadPoolExecutor(1) as pool,
    ):
        leak_check.pids.add(server.process.pid)
        target = f"{NAME}:{port}"
        session = server.api(
            "POST",
            "/api/sessions",
            json={"path": "work/analysis.ipynb", "type": "notebook", "kernel": {"name": name}},
        ).json()
        kernel_id = session["kernel"]["id"]
        ws = server.channels(kernel_id)
        events = websocket.create_connection(
            server.url.replace("http://", "ws://") + "/api/events/subscribe",
            header=[f"Authorization: token {server.token}"],
            timeout=30,
        )
        try:
            assert execute(ws, FETCH)["reply"]["status"] == "ok"
            assert server.api("GET", API).json() == {"requests": []}

            # approve once, through the REST API
            cell = pool.submit(execute, ws, fetch_code(port))
            request = wait_for_request(server, target)
            assert request["host"] == NAME and request["port"] == port
            assert request["kernel_id"] == kernel_id and request["kernel_name"] == name
            assert request["notebook"] == "work/analysis.ipynb" and request["waiting"] == 1
            assert 0 < request["seconds_left"] <= 90
            announced = next_event(events, "waiting")
            assert announced["id"] == request["id"] and announced["target"] == target
            assert announced["notebook"] == "work/analysis.ipynb"

            # without the server's token: nothing to see, nothing to decide
            assert requests.get(server.url + API, timeout=30).status_code == 403
            decision = {"kernel_id": kernel_id, "target": target, "decision": "once"}
            assert requests.post(server.url + API, json=decision, timeout=30).status_code in (
                401,
                403,
            )
            assert requests.get(
                server.url + PAGE, timeout=30, allow_redirects=False
            ).status_code in (
                302,
                403,
            )
            bad = server.api("POST", API, json={**decision, "decision": "always"})
            assert bad.status_code == 400 and "decision must be one of" in bad.json()["message"]

            answer = server.api("POST", API, json=decision)
            assert answer.status_code == 200 and answer.json()["decided"] == 1
            out = cell.result(timeout=60)
            assert out["stdout"].startswith("(200, 'the data behind /table.csv')"), out
            decided = next_event(events, "decided")
            assert decided["id"] == request["id"] and decided["outcome"] == "once"
            again = server.api("POST", API, json=decision)
            assert again.status_code == 409 and "no request to" in again.json()["message"]

            # deny, through the plain page (a form post, as a browser without JS sends it)
            cell = pool.submit(execute, ws, fetch_code(port))
            request = wait_for_request(server, target)
            page = server.api("GET", PAGE)
            assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
            assert target in page.text and kernel_id in page.text
            assert "work/analysis.ipynb" in page.text and "Approve for this kernel" in page.text
            form = {"kernel_id": kernel_id, "target": target, "decision": "deny"}
            posted = server.api("POST", PAGE, data=form)
            assert posted.status_code == 200 and f"{target}: denied" in posted.text
            out = cell.result(timeout=60)
            assert out["stdout"].startswith("(403,"), out
            assert next_event(events, "decided")["outcome"] == "deny"

            # approve for this kernel: later requests go through without asking
            cell = pool.submit(execute, ws, fetch_code(port))
            wait_for_request(server, target)
            posted = server.api("POST", API, json={**decision, "decision": "kernel"})
            assert posted.status_code == 200
            assert cell.result(timeout=60)["stdout"].startswith("(200,")
            out = execute(ws, fetch_code(port, "/second"))
            assert out["stdout"].startswith("(200, 'the data behind /second')"), out
            assert server.api("GET", API).json() == {"requests": []}

            # code in the kernel cannot decide its own request (a fetch waits in a thread)
            other = f"{OTHER}:{port}"
            waiting = (
                "import threading\ngot = []\nthreading.Thread(target=lambda: got.append("
                f"fetch('http://{other}/bg'))).start()"
            )
            assert execute(ws, waiting)["reply"]["status"] == "ok"
            request = wait_for_request(server, other)
            attack = ATTACK.format(
                port=server.url.rsplit(":", 1)[1], kid=kernel_id, target=other, api=API
            )
            tried = json.loads(execute(ws, attack)["stdout"].strip().splitlines()[-1])
            for what, result in tried.items():
                if what.startswith(("through the proxy", "direct")):
                    assert not isinstance(result, int), (what, result)
            assert tried["control sockets"] == [] and tried["cli"][0] != 0, tried
            environment = execute(ws, "import os, json; print(json.dumps(dict(os.environ)))")
            assert server.token not in environment["stdout"]
            assert wait_for_request(server, other)["since"] == request["since"]  # still waits
            denied = server.api("POST", API, json={**decision, "target": other, "decision": "deny"})
            assert denied.status_code == 200
            out = execute(
                ws,
                "t = [x for x in threading.enumerate() if x.name != 'MainThread']\n"
                "import time\nwhile not got: time.sleep(0.1)\nprint(got)",
            )
            assert out["stdout"].startswith("[(403,"), out
        finally:
            events.close()
            ws.close()
            server.api("DELETE", f"/api/sessions/{session['id']}")

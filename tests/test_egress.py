"""Egress by allowlist, against real sandboxed kernels under runc and runsc.

Every target is a server this module starts on 127.0.0.1, reached under a ``.test`` name that
the policy's egress_hosts maps to loopback (evil.test too: a refusal is the proxy's decision,
never a failed lookup). No test names any other address or host.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from pathlib import Path

import pytest
from support import unavailable
from support.egress_servers import PROBE_VALUE, LocalTargets, tool_bundle
from support.kernels import make_kernelspec, run_cell, sandbox_kernel

from kernel_sandbox.cli.app import main as cli_main
from kernel_sandbox.egress import EgressControl

RUNTIMES = ["runc", "runsc"]
BRIDGE = 3128
TOOLS = "/opt/egress-tools"

SETUP = r"""
import json, os, socket, ssl, subprocess, sys, time, urllib.error, urllib.request
open('/tmp/ca.pem', 'w').write(CA)
CTX = ssl.create_default_context(cafile='/tmp/ca.pem')

def fetch(url, timeout=30):
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=CTX) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:
        return 'URLError', str(e.reason)

def raw(data, timeout=10):
    s = socket.create_connection(('127.0.0.1', BRIDGE), timeout=timeout)
    s.sendall(data)
    out = b''
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError as e:
        out += f'<{e.__class__.__name__}>'.encode()
    s.close()
    return out.decode('latin-1')
"""


class Sandbox:
    """A running allowlist kernel, its targets and its part of the decision log."""

    def __init__(self, km, kc, runtime: str, targets: LocalTargets, log: Path):
        self.km, self.kc, self.runtime, self.targets, self.log = km, kc, runtime, targets, log

    def run(self, code: str, timeout: float = 60) -> dict:
        return run_cell(self.kc, code, timeout=timeout)

    def value(self, expression: str, timeout: float = 60) -> object:
        out = self.run(f"print(json.dumps({expression}))", timeout=timeout)
        assert out["status"] == "ok", out
        return json.loads(out["stdout"].strip().splitlines()[-1])

    def decisions(self) -> list[dict]:
        return read_log(self.log, self.km.kernel_id)


def read_log(log: Path, kernel_id: str) -> list[dict]:
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["kernel_id"] == kernel_id]


def allowlist_config(targets: LocalTargets, runtime: str, image: str, **extra) -> dict:
    return {
        "image": image,
        "runtime": runtime,
        "network": "allowlist",
        "egress": [
            f"api.test:{targets.http_port}",
            f"pypi.test:{targets.https_port}",
            f"echo.test:{targets.echo.port}",
            f"*.corp.test:{targets.http_port}",
        ],
        "egress_hosts": targets.hosts(),
        **extra,
    }


def setup_code(targets: LocalTargets) -> str:
    return f"CA = {targets.ca_pem!r}\nBRIDGE = {BRIDGE}\n" + SETUP


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> LocalTargets:
    servers = LocalTargets(tmp_path_factory.mktemp("egress-targets"))
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def egress_log(tmp_path_factory) -> Path:
    """Decisions of this module's kernels go to a log of their own."""
    state = tmp_path_factory.mktemp("egress-state")
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state)
    yield state / "kernel-sandbox" / "egress.jsonl"
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("egress-tools")
    return folder, tool_bundle(folder)


@pytest.fixture(scope="module", params=RUNTIMES)
def sandbox(request, jupyter_path, kernel_image, targets, egress_log, tools) -> Sandbox:
    runtime = request.param
    config = allowlist_config(targets, runtime, kernel_image, mounts=[f"{tools[0]}:{TOOLS}:ro"])
    name = make_kernelspec(f"egress-{runtime}", config)
    with sandbox_kernel(name) as (km, kc):
        out = run_cell(kc, setup_code(targets))
        assert out["status"] == "ok", out
        yield Sandbox(km, kc, runtime, targets, egress_log)


def last(entries: list[dict], **match) -> dict:
    found = [e for e in entries if all(e.get(k) == v for k, v in match.items())]
    assert found, f"no decision {match} in {entries[-5:]}"
    return found[-1]


# -- the way out that is allowed ------------------------------------------------------------


def test_still_only_loopback(sandbox):
    assert sandbox.value("sorted(os.listdir('/sys/class/net'))") == ["lo"]
    env = sandbox.value("{k: v for k, v in os.environ.items() if 'proxy' in k.lower()}")
    assert env["HTTP_PROXY"] == env["https_proxy"] == f"http://127.0.0.1:{BRIDGE}"
    assert "localhost" in env["NO_PROXY"]


def test_urllib_http_and_https(sandbox):
    t = sandbox.targets
    status, body = sandbox.value(f"fetch('http://api.test:{t.http_port}/hello')")
    assert status == 200 and body == f"hello from api.test:{t.http_port} at /hello\n"
    # HTTPS through CONNECT, verified end to end against the test's own CA: no interception
    status, body = sandbox.value(f"fetch('https://pypi.test:{t.https_port}/hello')")
    assert status == 200 and body.startswith("hello from pypi.test")
    # a wildcard rule
    status, _ = sandbox.value(f"fetch('http://a.corp.test:{t.http_port}/hello')")
    assert status == 200
    log = sandbox.decisions()
    entry = last(log, host="pypi.test", port=t.https_port, decision="allow")
    assert entry["method"] == "CONNECT" and entry["rule"] == f"allow pypi.test:{t.https_port}"
    assert entry["address"] == "127.0.0.1" and entry["time"]
    assert last(log, host="a.corp.test")["rule"] == f"allow *.corp.test:{t.http_port}"


def test_proxy_drops_its_own_headers(sandbox):
    t = sandbox.targets
    status, body = sandbox.value(f"fetch('http://api.test:{t.http_port}/headers')")
    headers = {k.lower() for k in json.loads(body)}
    assert status == 200 and "proxy-connection" not in headers and "x-forwarded-for" not in headers


def test_connect_tunnel_carries_any_bytes(sandbox):
    port = sandbox.targets.echo.port
    out = sandbox.run(
        f"s = socket.create_connection(('127.0.0.1', BRIDGE), timeout=10)\n"
        f"s.sendall(b'CONNECT echo.test:{port} HTTP/1.1\\r\\nHost: echo.test:{port}\\r\\n\\r\\n')\n"
        "head = b''\n"
        "while not head.endswith(b'\\r\\n\\r\\n'): head += s.recv(1)\n"
        "s.sendall(b'\\x00\\x01 not http at all')\n"
        "print(head.split(b'\\r\\n')[0].decode(), s.recv(100))\n"
    )
    assert (
        out["stdout"].strip() == "HTTP/1.1 200 Connection established b'\\x00\\x01 not http at all'"
    )


def test_requests(sandbox, tools):
    if not tools[1]["requests"]:
        unavailable("requests is not installed on the host to lend to the kernel")
    t = sandbox.targets
    out = sandbox.run(
        f"sys.path.insert(0, '{TOOLS}/site')\n"
        "import requests\n"
        f"print(requests.get('http://api.test:{t.http_port}/hello', timeout=20).text, end='')\n"
        f"print(requests.get('https://pypi.test:{t.https_port}/hello', verify='/tmp/ca.pem', "
        "timeout=20).text, end='')\n"
        "try:\n"
        f"    requests.get('https://evil.test:{t.https_port}/hello', verify='/tmp/ca.pem', "
        "timeout=20)\n"
        "except requests.exceptions.ProxyError as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    assert out["status"] == "ok", out
    lines = out["stdout"].splitlines()
    assert lines[0].startswith("hello from api.test") and lines[1].startswith(
        "hello from pypi.test"
    )
    assert lines[2] == "refused ProxyError"
    assert (
        f"egress to evil.test:{t.https_port} denied: not in this kernel's allowlist"
        in out["stderr"]
    )


def test_curl(sandbox, tools):
    if not tools[1]["curl"]:
        unavailable("curl is not installed on the host to lend to the kernel")
    t = sandbox.targets
    out = sandbox.run(
        f"env = {{**os.environ, 'LD_LIBRARY_PATH': '{TOOLS}/lib'}}\n"
        f"curl = ['{TOOLS}/bin/curl', '-sS', '--max-time', '20', '--cacert', '/tmp/ca.pem']\n"
        "for url in ("
        + repr(f"http://api.test:{t.http_port}/hello")
        + ", "
        + repr(f"https://pypi.test:{t.https_port}/hello")
        + ", "
        + repr(f"https://evil.test:{t.https_port}/hello")
        + "):\n"
        "    p = subprocess.run(curl + [url], env=env, capture_output=True, text=True)\n"
        "    print(p.returncode, p.stdout.strip() or p.stderr.strip())\n"
    )
    assert out["status"] == "ok", out
    lines = out["stdout"].splitlines()
    assert lines[0] == f"0 hello from api.test:{t.http_port} at /hello"
    assert lines[1] == f"0 hello from pypi.test:{t.https_port} at /hello"
    assert lines[2].startswith("56 ") and "403" in lines[2]  # CONNECT refused


def test_pip_install_from_a_local_index(sandbox):
    """pip (run from the wheel Debian ships for ensurepip) installs through the proxy, over
    HTTPS, from a package index the test serves; nothing else is contacted."""
    t = sandbox.targets
    before = len(sandbox.decisions())
    out = sandbox.run(
        "import glob\n"
        "pip = sorted(glob.glob('/usr/share/python-wheels/pip-*.whl'))[-1] + '/pip'\n"
        "p = subprocess.run([sys.executable, pip, 'install', '--disable-pip-version-check',\n"
        "    '--no-cache-dir', '--no-input', '--target', '/tmp/pkgs', '--cert', '/tmp/ca.pem',\n"
        f"    '--index-url', 'https://pypi.test:{t.https_port}/simple/', 'ksegress-probe'],\n"
        "    capture_output=True, text=True, timeout=120)\n"
        "print(p.returncode); print(p.stdout[-2000:]); print(p.stderr[-2000:], file=sys.stderr)\n"
        "sys.path.insert(0, '/tmp/pkgs'); import ksegress_probe; print(ksegress_probe.VALUE)\n",
        timeout=180,
    )
    assert out["status"] == "ok", out
    assert out["stdout"].splitlines()[0] == "0", out
    assert PROBE_VALUE in out["stdout"]
    new = sandbox.decisions()[before:]
    assert new and all(e["host"] == "pypi.test" and e["decision"] == "allow" for e in new), new


# -- everything else is refused, logged and shown -------------------------------------------


def test_unlisted_target_refused(sandbox):
    t = sandbox.targets
    out = sandbox.run(
        f"print(fetch('http://evil.test:{t.http_port}/hello'))\n"
        f"print(fetch('https://evil.test:{t.https_port}/hello'))\n"
        f"print(fetch('http://api.test:{t.https_port}/hello'))\n"
    )  # listed name, other port
    lines = out["stdout"].splitlines()
    assert lines[0].startswith("(403,") and f"egress to evil.test:{t.http_port} denied" in lines[0]
    assert lines[1] == "('URLError', 'Tunnel connection failed: 403 Forbidden')"
    assert lines[2].startswith("(403,")
    for port in (t.http_port, t.https_port):
        assert f"egress to evil.test:{port} denied: not in this kernel's allowlist" in out["stderr"]
    log = sandbox.decisions()
    assert last(log, host="evil.test", port=t.https_port)["decision"] == "deny"
    assert last(log, host="evil.test", port=t.https_port)["rule"] == "not-listed"
    assert last(log, host="api.test", port=t.https_port)["decision"] == "deny"


def test_ip_literal_refused(sandbox):
    """Addresses are refused unless listed (NO_PROXY keeps 127.0.0.1 itself inside, so the
    clients are pointed at another loopback address, and the raw request at the real one)."""
    t = sandbox.targets
    out = sandbox.run(
        f"print(fetch('http://127.0.0.2:{t.http_port}/hello')[0])\n"
        f"print(fetch('https://127.0.0.2:{t.https_port}/hello')[0])\n"
        f"print(fetch('http://2130706433:{t.http_port}/hello')[0])\n"
        f"print(raw(b'GET http://127.0.0.1:{t.http_port}/hello HTTP/1.1\\r\\n"
        f"Host: 127.0.0.1:{t.http_port}\\r\\n\\r\\n').splitlines()[0])\n"
    )
    assert out["stdout"].splitlines() == ["403", "URLError", "400", "HTTP/1.1 403 Forbidden"]
    assert (
        f"egress to 127.0.0.2:{t.http_port} denied: IP addresses are refused unless the "
        "allowlist names them"
    ) in out["stderr"]
    assert f"egress to 127.0.0.1:{t.http_port} denied" in out["stderr"]
    assert last(sandbox.decisions(), host="127.0.0.2", port=t.https_port)["rule"] == "ip-literal"
    assert last(sandbox.decisions(), host="127.0.0.1", port=t.http_port)["rule"] == "ip-literal"
    assert last(sandbox.decisions(), rule="bad-target")["decision"] == "deny"


def test_mismatched_connect_and_host_refused(sandbox):
    t = sandbox.targets
    out = sandbox.run(
        f"print(raw(b'CONNECT api.test:{t.http_port} HTTP/1.1\\r\\n"
        f"Host: evil.test:{t.http_port}\\r\\n\\r\\n'))\n"
        f"print(raw(b'GET http://api.test:{t.http_port}/hello HTTP/1.1\\r\\n"
        "Host: evil.test\\r\\n\\r\\n'))\n"
        # an allowed first request must not open the way for a second one to elsewhere
        f"print(raw(b'GET http://api.test:{t.http_port}/hello HTTP/1.1\\r\\n"
        f"Host: api.test:{t.http_port}\\r\\n\\r\\n'\n"
        f"          b'GET http://evil.test:{t.http_port}/hello HTTP/1.1\\r\\n"
        f"Host: evil.test:{t.http_port}\\r\\n\\r\\n'))\n"
    )
    first, second = out["stdout"].split("HTTP/1.1 403 Forbidden")[1:3]
    assert "the Host header (evil.test" in first and "the Host header (evil.test)" in second
    assert "hello from api.test" in out["stdout"] and "hello from evil.test" not in out["stdout"]
    assert f"egress to api.test:{t.http_port} denied: the Host header" in out["stderr"]
    log = sandbox.decisions()
    assert last(log, rule="host-mismatch", method="CONNECT")["host"] == "api.test"
    assert last(log, host="evil.test", port=t.http_port)["decision"] == "deny"


def test_non_http_on_the_bridge_refused(sandbox):
    out = sandbox.run(
        "print(raw(b'SSH-2.0-OpenSSH_9.2\\r\\n').splitlines()[0])\n"
        "print(raw(bytes.fromhex('16030100a5010000a10303')).splitlines()[0])\n"
    )
    assert out["stdout"].splitlines() == ["HTTP/1.1 400 Bad Request"] * 2
    assert "egress denied: not an HTTP proxy request" in out["stderr"]
    assert last(sandbox.decisions(), rule="not-http")["decision"] == "deny"


def test_dns_from_inside_goes_nowhere(sandbox):
    """Names resolve only on the host: inside, even a listed name does not resolve, and no
    resolver answers (the container has no route anywhere)."""
    before = len(sandbox.decisions())
    out = sandbox.run(
        "for name in ('api.test', 'pypi.test', 'evil.test'):\n"
        "    try:\n"
        "        print(socket.getaddrinfo(name, 80))\n"
        "    except socket.gaierror as e:\n"
        "        print('no name', name)\n"
        f"s = socket.socket(); s.settimeout(3)\n"
        f"try:\n    s.connect(('127.0.0.1', {sandbox.targets.http_port})); print('CONNECTED')\n"
        "except OSError as e:\n    print('not reachable', e.errno)\n"
    )
    assert out["stdout"].splitlines()[:3] == [
        "no name api.test",
        "no name pypi.test",
        "no name evil.test",
    ]
    assert "CONNECTED" not in out["stdout"]
    assert len(sandbox.decisions()) == before  # nothing reached the proxy, nothing left


# -- approve-once ---------------------------------------------------------------------------


def finish_cell(kc, msg_id: str, timeout: float = 60) -> dict:
    """Collect the output of a cell sent with ``kc.execute`` (as run_cell returns it): the
    test waits for approvals between sending and collecting, without a second thread."""
    out: dict = {"stdout": "", "stderr": "", "status": None, "ename": None, "evalue": None}
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"cell {msg_id} did not finish within {timeout}s") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind == "error":
            out["ename"], out["evalue"] = content["ename"], content["evalue"]
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            out["status"] = reply["content"]["status"]
            return out


def wait_for_pending(control: EgressControl, kernel_id: str, target: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in control.pending(kernel_id) if p.target == target]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"{target} never waited for approval in kernel {kernel_id}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_approve_once_deny_and_time_out(
    runtime, jupyter_path, kernel_image, targets, egress_log, leak_check, capsys
):
    config = allowlist_config(
        targets, runtime, kernel_image, egress_mode="ask", egress_ask_timeout=4
    )
    name = make_kernelspec(f"egress-ask-{runtime}", config)
    target = f"ask.test:{targets.http_port}"
    fetch = f"print(fetch('http://{target}/hello'))"
    control = EgressControl()
    with sandbox_kernel(name) as (km, kc), sandbox_kernel(name) as (km2, kc2):
        for client in (kc, kc2):
            assert run_cell(client, setup_code(targets))["status"] == "ok"
        kid = km.kernel_id

        # a person approves once: this request goes through
        cell = kc.execute(fetch)
        pending = wait_for_pending(control, kid, target)
        assert pending.kernel_id == kid and pending.waiting == 1 and 0 < pending.seconds_left <= 4
        assert cli_main(["egress", "pending"]) == 0
        assert target in capsys.readouterr().out
        assert control.approve(kid, target) == 1
        out = finish_cell(kc, cell)
        assert out["stdout"].startswith("(200, 'hello from ask.test"), out
        assert f"egress to {target} is waiting for approval" in out["stderr"]
        assert f"kernel-sandbox egress approve {kid} {target}" in out["stderr"]

        # once means once: the next request waits again, and a person denies it
        cell = kc.execute(fetch)
        wait_for_pending(control, kid, target)
        assert cli_main(["egress", "deny", kid[:8], target]) == 0
        out = finish_cell(kc, cell)
        assert out["stdout"].startswith("(403,"), out
        assert f"egress to {target} denied: denied by a person" in out["stderr"]

        # silence denies
        started = time.monotonic()
        out = run_cell(kc, fetch, timeout=60)
        assert 3.5 < time.monotonic() - started < 30
        assert out["stdout"].startswith("(403,"), out
        assert f"egress to {target} denied: no approval within 4s" in out["stderr"]
        assert cli_main(["egress", "approve", kid, target]) == 2  # nothing waits any more

        # --always holds for this kernel's life, and for this kernel only
        assert cli_main(["egress", "approve", kid, target, "--always"]) == 0
        assert run_cell(kc, fetch)["stdout"].startswith("(200,")
        other = kc2.execute(fetch)
        assert wait_for_pending(control, km2.kernel_id, target).kernel_id == km2.kernel_id
        assert control.deny(km2.kernel_id, target) == 1
        assert finish_cell(kc2, other)["stdout"].startswith("(403,")

        # code in the sandbox cannot reach the control socket (host-only part of the dir)
        out = run_cell(
            kc,
            "print([n for d in ('/run/kernel-sandbox', '/run/kernel-sandbox-host') "
            "for n in ('egress', 'egress-control') if os.path.exists(f'{d}/{n}')])",
        )
        assert out["stdout"].strip() == "['egress']", out

    log = read_log(egress_log, kid)
    rules = [(e["decision"], e["rule"]) for e in log if e["host"] == "ask.test"]
    for expected in [
        ("ask", "ask"),
        ("approve", "approve by a person"),
        ("allow", "approved once"),
        ("deny", "ask-denied"),
        ("deny", "ask-timeout"),
        ("approve", "approve by a person (always)"),
        ("allow", "approved always"),
    ]:
        assert expected in rules, (expected, rules)
    assert ("deny", "ask-denied") in [
        (e["decision"], e["rule"]) for e in read_log(egress_log, km2.kernel_id)
    ]


# -- isolation between kernels, and failure without the proxy -------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_one_kernel_cannot_use_another_kernels_proxy(
    runtime, jupyter_path, kernel_image, targets, egress_log, leak_check
):
    t = targets
    wide = allowlist_config(t, runtime, kernel_image)
    narrow = {**wide, "egress": []}
    with (
        sandbox_kernel(make_kernelspec(f"egress-wide-{runtime}", wide)) as (wide_km, _),
        sandbox_kernel(make_kernelspec(f"egress-narrow-{runtime}", narrow)) as (km, kc),
    ):
        assert run_cell(kc, setup_code(t))["status"] == "ok"
        other = wide_km.provisioner.runtime_dir.host_dir / "egress"
        assert other.exists()
        out = run_cell(
            kc,
            (
                "print(sorted(os.listdir('/run/kernel-sandbox')))\n"
                f"for path in ({str(other)!r}, "
                f"'/run/kernel-sandbox-host/../{other.parent.parent.name}/h/egress'):\n"
                "    s = socket.socket(socket.AF_UNIX)\n"
                "    try:\n"
                "        s.connect(path); print('CONNECTED', path)\n"
                "    except OSError as e:\n"
                "        print('unreachable', e.__class__.__name__)\n"
                f"print(fetch('http://api.test:{t.http_port}/hello')[0])\n"
            ),
        )
        lines = out["stdout"].splitlines()
        assert "CONNECTED" not in out["stdout"]
        assert lines[1:3] == ["unreachable FileNotFoundError"] * 2
        assert lines[3] == "403"  # its own proxy, with its own (empty) list, decides
        assert f"egress to api.test:{t.http_port} denied" in out["stderr"]
        assert last(read_log(egress_log, km.kernel_id), host="api.test")["decision"] == "deny"
        assert not any(
            e["host"] == "api.test" and e["decision"] == "deny"
            for e in read_log(egress_log, wide_km.kernel_id)
        )


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_without_the_proxy_nothing_goes_out(
    runtime, jupyter_path, kernel_image, targets, egress_log, leak_check
):
    t = targets
    name = make_kernelspec(f"egress-gone-{runtime}", allowlist_config(t, runtime, kernel_image))
    with sandbox_kernel(name) as (km, kc):
        assert run_cell(kc, setup_code(t))["status"] == "ok"
        assert (
            "(200,"
            in run_cell(kc, f"print(fetch('http://api.test:{t.http_port}/hello'))")["stdout"]
        )
        proxy = km.provisioner.resources.egress.process
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.wait(10)
        out = run_cell(
            kc,
            (
                f"print(fetch('http://api.test:{t.http_port}/hello', timeout=10))\n"
                f"print(fetch('https://pypi.test:{t.https_port}/hello', timeout=10))\n"
                f"s = socket.socket(); s.settimeout(3)\n"
                f"try:\n    s.connect(('127.0.0.1', {t.http_port})); print('CONNECTED')\n"
                "except OSError as e:\n    print('not reachable', e.errno)\n"
            ),
        )
        lines = out["stdout"].splitlines()
        assert lines[0].startswith("(502,") and "egress proxy unavailable" in lines[0], lines
        assert lines[1] == "('URLError', 'Tunnel connection failed: 502 Bad Gateway')"
        assert lines[2].startswith("not reachable")  # nothing listens on the sandbox's own loopback
    assert proxy.poll() is not None


def test_proxy_outlives_restarts_and_ends_with_the_kernel(
    jupyter_path, kernel_image, targets, egress_log, leak_check
):
    name = make_kernelspec("egress-end", allowlist_config(targets, "runc", kernel_image))
    fetch = f"print(fetch('http://api.test:{targets.http_port}/hello')[0])"
    with sandbox_kernel(name) as (km, kc):
        proxy = km.provisioner.resources.egress.process
        control = km.provisioner.resources.egress.control_path
        assert proxy.poll() is None and km.kernel_id in EgressControl().kernels()
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert run_cell(kc, setup_code(targets) + fetch)["stdout"].strip() == "200"
        assert km.provisioner.resources.egress.process is proxy and proxy.poll() is None
    assert proxy.poll() is not None and not control.exists()

"""egress_secrets from real sandboxed kernels, under runc and runsc.

The test process is the Jupyter Server: the secret is in its environment, the proxy it starts
reads it there, and nothing of it may reach the sandbox (its environment, its files, the
memory of its processes) or come back to it in a response. Every target is a server on
127.0.0.1 under a ``.test`` name mapped by egress_hosts; the real server's certificate is
verified against the test's CA (``egress_upstream_ca``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from support import unavailable
from support.egress_servers import PROBE_VALUE, LocalTargets, tool_bundle
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from traitlets.config import Config

RUNTIMES = ["runc", "runsc"]
TOOLS = "/opt/egress-tools"
SECRET = "sk-kernel-7d3e9b1a5c2f8e4d6b0a"
FRAGMENT = SECRET[10:22]  # what the kernel looks for: it must never hold the whole value
ENV = "KS_SECRET_TEST_KEY"

HELPERS = r"""
import json, os, subprocess, sys, urllib.request, urllib.error
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:   # the default trust: no context
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:
        return 'URLError', str(e.reason)
"""


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> LocalTargets:
    servers = LocalTargets(tmp_path_factory.mktemp("egress-secret-kernel-targets"))
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("egress-secret-tools")
    return folder, tool_bundle(folder)


@pytest.fixture(scope="module")
def owner_secret():
    """The secret in the Jupyter Server's (this process's) environment, as a user sets it."""
    os.environ[ENV] = SECRET
    yield SECRET
    os.environ.pop(ENV, None)


class Kernel:
    def __init__(self, km, kc, targets: LocalTargets):
        self.km, self.kc, self.targets = km, kc, targets

    def run(self, code: str, timeout: float = 90) -> dict:
        out = run_cell(self.kc, code, timeout=timeout)
        assert out["status"] == "ok", out
        return out

    def value(self, expression: str) -> object:
        out = self.run(f"print(json.dumps({expression}))")
        return json.loads(out["stdout"].strip().splitlines()[-1])


@pytest.fixture(scope="module", params=RUNTIMES)
def kernel(request, jupyter_path, kernel_image, targets, tools, owner_secret) -> Kernel:
    runtime, port = request.param, targets.https_port
    config = {
        "image": kernel_image,
        "runtime": runtime,
        "network": "allowlist",
        "egress": [f"api.test:{port}", f"pypi.test:{port}", f"echo.test:{targets.echo.port}"],
        "egress_hosts": targets.hosts(),
        "egress_secrets": {f"api.test:{port}": f"env:{ENV}"},
        "mounts": [f"{tools[0]}:{TOOLS}:ro"],
        "workspace": "none",  # this source file, which holds the secret, is not the kernel's
    }
    # an operator setting (Jupyter config): verify the real servers against the test's CA
    operator = Config({"DockerSandboxProvisioner": {"egress_upstream_ca": str(targets.cert)}})
    name = make_kernelspec(f"egress-secret-{runtime}", config)
    with sandbox_kernel(name, config=operator) as (km, kc):
        sandbox = Kernel(km, kc, targets)
        sandbox.run(HELPERS)
        yield sandbox


def last_seen(targets: LocalTargets) -> dict[str, str]:
    return {k.lower(): v for k, v in targets.seen[-1]["headers"].items()}


def test_the_server_gets_the_key_the_kernel_never_does(kernel):
    port = kernel.targets.https_port
    status, body = kernel.value(f"get('https://api.test:{port}/reflect')")
    assert status == 200, body
    assert last_seen(kernel.targets)["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in body and "*" * len(SECRET) in body  # the echo came back masked


def test_the_kernel_cannot_send_or_learn_a_credential(kernel):
    port = kernel.targets.https_port
    status, body = kernel.value(
        f"get(urllib.request.Request('https://api.test:{port}/reflect', "
        "headers={'Authorization': 'Bearer mine', 'X-Api-Key': 'mine', 'Cookie': 'a=b'}))"
    )
    seen = last_seen(kernel.targets)
    assert status == 200 and seen["authorization"] == f"Bearer {SECRET}"
    assert "x-api-key" not in seen and "cookie" not in seen
    assert SECRET not in body


def test_no_trace_in_the_environment_files_or_memory(kernel, docker_client):
    kernel.value(f"get('https://api.test:{kernel.targets.https_port}/reflect')")
    env = kernel.value("dict(os.environ)")
    assert SECRET not in json.dumps(env)
    bundle = "/run/kernel-sandbox-host/egress-ca.pem"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == bundle
    assert env["CURL_CA_BUNDLE"] == env["PIP_CERT"] == bundle
    # every file the kernel can read (the fragment is only in the kernel's memory, never a file)
    found = kernel.value(
        "(lambda needle: [p for d in ('/',) for p in __import__('itertools').chain.from_iterable("
        "[os.path.join(r, f) for f in fs] for r, ds, fs in os.walk(d) "
        "if not r.startswith(('/proc', '/sys', '/dev'))) "
        "if os.path.isfile(p) and not os.path.islink(p) and (lambda q: "
        "(lambda data: needle in data)(open(q, 'rb').read(1 << 24)) "
        "if os.access(q, os.R_OK) else False)(p)])"
        f"({FRAGMENT[::-1]!r}[::-1].encode())"
    )
    assert found == []
    # the memory of every process of the sandbox, read from the host; a marker the kernel
    # holds shows that the scan sees the kernel's memory at all
    kernel.run("MARKER = 'ks-memory-marker-' + str(6 * 7)")
    container = docker_client.containers.get(kernel.km.provisioner.container_id)
    scanned = scan_memory(container.id, [SECRET.encode(), b"ks-memory-marker-42"])
    assert scanned["processes"] >= 1 and scanned["bytes"] > 0
    assert scanned["hits"][1], scanned
    assert scanned["hits"][0] == [], scanned


def resident_runs(pagemap, start: int, end: int, page: int):
    """(offset, length) of the pages of [start, end) that are in memory: reading only those
    never makes the kernel allocate (a read of a shared-memory hole would, under runsc)."""
    run_start = None
    for base in range(start, end, page * 65536):
        count = min(65536, (end - base) // page)
        pagemap.seek(base // page * 8)
        entries = pagemap.read(count * 8)
        for i in range(len(entries) // 8):
            present = entries[i * 8 + 7] & 0x80  # bit 63
            address = base + i * page
            if present and run_start is None:
                run_start = address
            elif not present and run_start is not None:
                yield run_start, address - run_start
                run_start = None
    if run_start is not None:
        yield run_start, end - run_start


def scan_memory(container_id: str, needles: list[bytes]) -> dict:
    """Search the resident memory of the container's processes (host /proc; needs root)."""
    if os.geteuid() != 0:
        unavailable("reading a sandbox's memory from the host needs root")
    page = os.sysconf("SC_PAGE_SIZE")
    result: dict = {"processes": 0, "bytes": 0, "hits": [[] for _ in needles]}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if container_id not in Path(f"/proc/{pid}/cgroup").read_text():
                continue
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
            pagemap = open(f"/proc/{pid}/pagemap", "rb", buffering=0)
        except OSError:
            continue
        result["processes"] += 1
        with mem, pagemap:
            for line in maps:
                fields = line.split()
                if "r" not in fields[1]:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                for offset, length in resident_runs(pagemap, start, end, page):
                    try:
                        mem.seek(offset)
                        chunk = mem.read(length)
                    except (OSError, ValueError, OverflowError):
                        continue
                    result["bytes"] += len(chunk)
                    for i, needle in enumerate(needles):
                        if needle in chunk:
                            result["hits"][i].append(f"pid {pid} {fields[0]} {fields[-1]}")
    return result


def test_requests_httpx_curl_and_pip_trust_the_kernels_ca(kernel, tools):
    found = tools[1]
    if not (found["requests"] and found["curl"]):
        unavailable("requests and curl must be installed on the host to lend to the kernel")
    port = kernel.targets.https_port
    url = f"https://api.test:{port}/reflect"
    out = kernel.run(
        f"sys.path.insert(0, '{TOOLS}/site')\n"
        "import requests\n"
        f"print('requests', requests.get({url!r}, timeout=30).status_code)\n"
        + (
            f"import httpx\nprint('httpx', httpx.get({url!r}, timeout=30).status_code)\n"
            if found["httpx"]
            else ""
        )
        + f"env = {{**os.environ, 'LD_LIBRARY_PATH': '{TOOLS}/lib'}}\n"
        f"p = subprocess.run(['{TOOLS}/bin/curl', '-sS', '--max-time', '30', '-o', '/dev/null',"
        f" '-w', '%{{http_code}}', {url!r}], env=env, capture_output=True, text=True)\n"
        "print('curl', p.stdout or p.stderr)\n"
        "import glob\n"
        "pip = sorted(glob.glob('/usr/share/python-wheels/pip-*.whl'))[-1] + '/pip'\n"
        "p = subprocess.run([sys.executable, pip, 'install', '--disable-pip-version-check',\n"
        "    '--no-cache-dir', '--no-input', '--target', '/tmp/pkgs',\n"
        f"    '--index-url', 'https://api.test:{port}/simple/', 'ksegress-probe'],\n"
        "    capture_output=True, text=True, timeout=120)\n"
        "print('pip', p.returncode, p.stderr[-500:].replace(chr(10), ' '))\n"
        "sys.path.insert(0, '/tmp/pkgs'); import ksegress_probe; print(ksegress_probe.VALUE)\n",
        timeout=240,
    )
    lines = out["stdout"].splitlines()
    assert "requests 200" in lines and "curl 200" in lines, out
    if found["httpx"]:
        assert "httpx 200" in lines, out
    assert any(line.startswith("pip 0") for line in lines), out
    assert PROBE_VALUE in out["stdout"]
    assert SECRET not in out["stdout"] + out["stderr"]


def test_a_host_without_a_secret_is_still_a_plain_tunnel(kernel):
    """pypi.test is the same server: the kernel sees its real certificate (the test CA), which
    its own trust (the host's store and its kernel CA) does not vouch for."""
    port = kernel.targets.https_port
    status, reason = kernel.value(f"get('https://pypi.test:{port}/headers')")
    assert status == "URLError" and "CERTIFICATE_VERIFY_FAILED" in reason
    ca = kernel.targets.ca_pem
    status, body = kernel.value(
        f"(lambda ctx: (lambda r: (r.status, r.read().decode()))(urllib.request.urlopen("
        f"urllib.request.Request('https://pypi.test:{port}/headers', headers={{'Authorization':"
        f" 'Bearer mine'}}), context=ctx, timeout=30)))(__import__('ssl').create_default_context("
        f"cadata={ca!r}))"
    )
    headers = {k.lower(): v for k, v in json.loads(body).items()}
    assert status == 200 and headers["authorization"] == "Bearer mine"


def test_the_ca_bundle_is_read_only_and_the_ca_key_is_not_there(kernel):
    out = kernel.run(
        "b = os.environ['SSL_CERT_FILE']\n"
        "text = open(b).read()\n"
        "print('PRIVATE' in text, text.count('BEGIN CERTIFICATE') > 1)\n"
        "try:\n"
        "    open(b, 'a').write('x')\n"
        "except OSError as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    assert re.match(r"False True\nrefused \w+Error", out["stdout"]), out


def test_revoke_from_the_host_takes_effect_on_the_next_request(kernel):
    from kernel_sandbox.egress import EgressControl

    port = kernel.targets.https_port
    root = str(kernel.km.provisioner.runtime_dir.path.parent)
    control = EgressControl(root)
    control.revoke_secret(kernel.km.kernel_id, f"api.test:{port}")
    try:
        status, body = kernel.value(f"get('https://api.test:{port}/reflect')")
        assert status == 403 and "revoked" in body
    finally:
        control.rotate_secret(kernel.km.kernel_id, f"api.test:{port}")
    status, _ = kernel.value(f"get('https://api.test:{port}/reflect')")
    assert status == 200 and last_seen(kernel.targets)["authorization"] == f"Bearer {SECRET}"

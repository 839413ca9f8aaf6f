"""egress_secrets under attack: a kernel tries to learn the credential its proxy adds.

The server is the test's own HTTPS server on 127.0.0.1, named ``api.test`` through
egress_hosts; the proxy verifies it against the test's CA (``egress_upstream_ca``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.egress_servers import LocalTargets
from support.kernels import make_kernelspec
from traitlets.config import Config

from .conftest import started

SECRET = "sk-battery-5e1b7c9d3a2f4e6b8c0d"
ENV = "KS_BATTERY_EGRESS_KEY"


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTargets]:
    servers = LocalTargets(tmp_path_factory.mktemp("battery-secret-targets"))
    yield servers
    servers.close()


def test_egress_secret_never_reaches_the_kernel(
    jupyter_path, kernel_image, runtime, targets, tmp_path: Path, observe
):
    port = targets.https_port
    policy = {
        "image": kernel_image,
        "runtime": runtime,
        "network": "allowlist",
        "egress": [f"api.test:{port}"],
        "egress_hosts": targets.hosts(),
        "egress_secrets": {f"api.test:{port}": f"env:{ENV}"},
        "workspace": "none",
    }
    spec = make_kernelspec(f"battery-secret-{runtime}", policy)
    config = Config()
    config.DockerSandboxProvisioner.egress_upstream_ca = str(targets.cert)
    # the key is in the server's environment only while the kernel starts
    with started(runtime, tmp_path, env={ENV: SECRET}, kernel_name=spec, config=config) as k:
        got = k.probe(
            f"""
import os, urllib.request
needle = {SECRET[8:24][::-1]!r}[::-1]   # a part of the key: the kernel never holds all of it
def holds(data):
    return needle in data
env = [n for n, v in os.environ.items() if holds(v)]
procs = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    for name in ('environ', 'cmdline'):
        try:
            if holds(open(f'/proc/{{pid}}/{{name}}', 'rb').read().decode('latin-1')):
                procs.append(f'{{pid}}/{{name}}')
        except OSError:
            pass
files = []
for root, dirs, names in os.walk('/'):
    if root.startswith(('/proc', '/sys', '/dev')):
        dirs[:] = []
        continue
    for name in names:
        path = os.path.join(root, name)
        try:
            if not os.path.islink(path) and holds(open(path, 'rb').read(1 << 24).decode('latin-1')):
                files.append(path)
        except OSError:
            pass
request = urllib.request.Request('https://api.test:{port}/reflect',
                                 headers={{'Authorization': 'Bearer mine', 'X-Api-Key': 'mine'}})
with urllib.request.urlopen(request, timeout=30) as r:
    body = r.read().decode()
report(env=env, procs=procs, files=files, status=r.status, echo=holds(body),
       masked='*' * {len(SECRET)} in body)
""",
            timeout=180,
        )
    seen = {n.lower(): v for n, v in targets.seen[-1]["headers"].items()}
    server_got = seen.get("authorization") == f"Bearer {SECRET}"
    observe(
        "net-egress-secret",
        f"server got the key: {'yes' if server_got else 'no'}; the kernel's own headers "
        f"reached it: {'yes' if 'x-api-key' in seen else 'no'}; key in the kernel's "
        f"environment: {got['env'] or 'no'}, /proc: {got['procs'] or 'no'}, files: "
        f"{got['files'] or 'no'}; in the echoed response: {'yes' if got['echo'] else 'no'} "
        f"(masked: {'yes' if got['masked'] else 'no'})",
    )
    assert got["status"] == 200 and server_got and "x-api-key" not in seen
    assert got["env"] == got["procs"] == got["files"] == []
    assert not got["echo"] and got["masked"]

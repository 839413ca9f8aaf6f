"""A remote (fsspec) dataset: S3 served by moto on 127.0.0.1, credentials only on the host.

The S3 server is moto's real S3 application over HTTP on loopback, behind a guard that
refuses every request not signed with the host's access key id (moto's own server-mode
signature check wrongly rejects listings with a prefix, so the guard does that part). The
kernel gets a token; the access key and secret stay in a 0600 file on the host, and the test
looks for them everywhere a kernel could: its environment, every process's environment and
command line, the files it can read, and the container's configuration.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from collections.abc import Iterator

import pytest
from support import IN_CI

if not IN_CI:  # in CI the test extra is installed: a missing module is an error
    pytest.importorskip("s3fs", reason="the remote dataset test needs s3fs (pip install '.[test]')")
import boto3  # noqa: E402
from moto.moto_server import werkzeug_app  # noqa: E402
from support.kernels import make_kernelspec  # noqa: E402
from test_broker import TRY, audit, data_kernel, run_json  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

pytestmark = pytest.mark.integration

KEY_ID = "AKIA" + secrets.token_hex(8).upper()
SECRET = "host-only-" + secrets.token_urlsafe(24)
CSV = "region,amount\nnorth,10\nsouth,32\n"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 that only answers requests signed with KEY_ID."""
    app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
    seen: list[str] = []

    def guarded(environ, start_response):
        auth = environ.get("HTTP_AUTHORIZATION", "")
        seen.append(auth)
        if f"Credential={KEY_ID}/" not in auth:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"request not signed with the expected access key"]
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, guarded, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket="lake")
    client.put_object(Bucket="lake", Key="sales/2024.csv", Body=CSV.encode())
    client.put_object(Bucket="lake", Key="sales/2025/q1.csv", Body=b"region,amount\n")
    client.put_object(Bucket="lake", Key="hr/salaries.csv", Body=b"name,salary\n")
    yield endpoint
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def remote_env(s3: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("remote")
    credentials = base / f"host-creds-{secrets.token_hex(4)}.json"
    credentials.write_text(
        json.dumps(
            {
                "s3://lake": {
                    "key": KEY_ID,
                    "secret": SECRET,
                    "client_kwargs": {"endpoint_url": s3, "region_name": "us-east-1"},
                }
            }
        )
    )
    os.chmod(credentials, 0o600)
    return {"state": base / "state", "credentials": credentials, "endpoint": s3}


def test_the_s3_guard_refuses_other_credentials(s3: str) -> None:
    wrong = boto3.client(
        "s3",
        endpoint_url=s3,
        region_name="us-east-1",
        aws_access_key_id="AKIAWRONG",
        aws_secret_access_key="x",
    )
    with pytest.raises(Exception, match="403|Forbidden"):
        wrong.get_object(Bucket="lake", Key="sales/2024.csv")


REMOTE = (
    TRY
    + r"""
import fsspec
def write():
    with data.open("results/summary.csv", "w") as f:
        f.write("total,42\n")
    return data.open("results/summary.csv").read()
print(json.dumps({
    "ls": data.ls("lake"),
    "info": data.info("lake/2024.csv")["size"],
    "text": data.open("lake/2024.csv").read(),
    "fsspec": fsspec.open("sandbox://lake/2024.csv", "rt").open().read(),
    "range": data.read_bytes("lake/2024.csv", 7, 13).decode(),
    "write": attempt(write),
    "hr": attempt(lambda: data.open("lake/../hr/salaries.csv").read()),
    "read_only": attempt(lambda: data.open("lake/x.csv", "w").write("x")),
}))
"""
)

HUNT = r"""
import base64, json, os
# sent encoded, so that this cell's own source (kept in the IPython history) is no hit
needles = [base64.b64decode(n).decode()[::-1] for n in %(needles)r]
hits = []
def check(where, text):
    for needle in needles:
        if needle in text:
            hits.append([where, needle[:8]])
check("os.environ", json.dumps(dict(os.environ)))
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                check(f"/proc/{pid}/{name}", f.read().decode(errors="replace"))
        except OSError:
            pass
scanned = 0
for top in ("/run", "/tmp", "/home", "/etc", "/var", "/root", "/workspace", os.getcwd()):
    for root, dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 20_000_000:
                    continue
                with open(path, "rb") as f:
                    check(path, f.read().decode(errors="replace"))
                scanned += 1
            except OSError:
                pass
print(json.dumps({"hits": hits, "scanned": scanned}))
"""


def test_remote_dataset_through_the_token_with_host_credentials(
    remote_env: dict, docker_client, leak_check
) -> None:
    name = make_kernelspec(
        "data-remote",
        {
            "datasets": {"lake": "s3://lake/sales:read", "results": "s3://lake/results:read-write"},
        },
    )
    with data_kernel(name, remote_env["state"], credentials=remote_env["credentials"]) as (km, kc):
        got = run_json(kc, REMOTE, timeout=120)
        needles = [
            base64.b64encode(n[::-1].encode()).decode()
            for n in (KEY_ID, SECRET, remote_env["credentials"].name)
        ]
        hunt = run_json(kc, HUNT % {"needles": needles}, timeout=120)
        attrs = docker_client.api.inspect_container(km.provisioner.container_id)
        kernel_id = km.kernel_id
    assert got["ls"] == ["lake/2024.csv", "lake/2025"]
    assert got["info"] == len(CSV)
    assert got["text"] == got["fsspec"] == CSV
    assert got["range"] == "amount"
    assert got["write"] == ["ok", "total,42\n"]
    assert got["hr"][0] == "PathEscape"
    assert got["read_only"][0] == "ReadOnly"
    s3 = boto3.client(
        "s3",
        endpoint_url=remote_env["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    body = s3.get_object(Bucket="lake", Key="results/summary.csv")["Body"].read()
    assert body == b"total,42\n"
    # the credentials are nowhere in the sandbox, nor in what the engine was told about it
    assert hunt["hits"] == [] and hunt["scanned"] > 0
    config = json.dumps({k: attrs[k] for k in ("Config", "HostConfig", "Mounts", "Args", "Path")})
    for needle in (KEY_ID, SECRET, str(remote_env["credentials"])):
        assert needle not in config
    decisions = {e["decision"] for e in audit({"state": remote_env["state"]}, kernel_id)}
    assert decisions >= {"allow", "deny"}

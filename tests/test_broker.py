"""The data broker end to end: real sandboxed kernels reading datasets through their token.

Each kernel gets its token as a file and its own broker socket in its runtime directory; the
broker runs in this (the owner) process. Every refusal is checked from inside a kernel and in
the host's audit log, and the broker must go on serving the other kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from traitlets.config import Config

from kernel_sandbox.broker import AuditLog
from kernel_sandbox.broker.tokens import TokenStore

pytestmark = pytest.mark.integration

CSV = "region,amount\nnorth,10\nsouth,32\neast,7\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("broker")
    sales = base / "sales"
    (sales / "2024").mkdir(parents=True)
    (sales / "2024.csv").write_text(CSV)
    (sales / "2024" / "q1.csv").write_text("region,amount\nnorth,1\n")
    (base / "host-secret.txt").write_text("the host's own file\n")
    os.symlink(base / "host-secret.txt", sales / "escape.txt")
    os.symlink(base, sales / "escape-dir")
    os.symlink("2024.csv", sales / "latest.csv")
    hr = base / "hr"
    hr.mkdir()
    (hr / "salaries.csv").write_text("name,salary\n")
    out = base / "out"
    out.mkdir()
    for path in (base, sales, hr, out):
        os.chmod(path, 0o755)
    return {"base": base, "sales": sales, "hr": hr, "out": out, "state": base / "state"}


def spec(name: str, env: dict[str, Path], **extra) -> str:
    config = {"datasets": {"sales": f"{env['sales']}:read", "out": f"{env['out']}:read-write"}}
    config.update(extra)
    return make_kernelspec(name, config)


def broker_config(state: Path, credentials: Path | None = None) -> Config:
    config = Config()
    config.DockerSandboxProvisioner.token_db = str(state / "tokens.sqlite")
    config.DockerSandboxProvisioner.audit_log = str(state / "audit.jsonl")
    if credentials is not None:
        config.DockerSandboxProvisioner.data_credentials = str(credentials)
    return config


@contextmanager
def data_kernel(
    kernel_name: str, state: Path, credentials: Path | None = None
) -> Iterator[tuple[KernelManager, object]]:
    """A sandboxed kernel whose broker keeps its tokens and audit log under ``state``."""
    with sandbox_kernel(kernel_name, config=broker_config(state, credentials)) as pair:
        yield pair


def run_json(kc, code: str, timeout: float = 60) -> dict:
    out = run_cell(kc, code, timeout=timeout)
    assert out["status"] == "ok", out
    return json.loads(out["stdout"].strip().splitlines()[-1])


def audit(env: dict[str, Path], kernel_id: str) -> list[dict]:
    entries = AuditLog(env["state"] / "audit.jsonl").entries()
    return [e for e in entries if e["kernel_id"] == kernel_id]


TRY = r"""
import json
from kernel_sandbox import data
def attempt(fn):
    try:
        return ["ok", fn()]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
"""

READS = (
    TRY
    + r"""
import fsspec
def wr():
    with data.open("out/from-kernel.txt", "w") as f:
        f.write("written in the sandbox\n")
    return data.open("out/from-kernel.txt").read()
print(json.dumps({
    "datasets": data.datasets(),
    "ls": data.ls("sales"),
    "text": data.open("sales/2024.csv").read(),
    "binary": data.open("sales/2024/q1.csv", "rb").read().decode(),
    "link": data.open("sales/latest.csv").read(),
    "fsspec": fsspec.open("sandbox://sales/2024.csv", "rt").open().read(),
    "write": attempt(wr),
    "token_mode": oct(__import__("os").stat("/run/kernel-sandbox/data-token").st_mode & 0o777),
}))
"""
)


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_reads_in_scope(env, leak_check, runtime: str) -> None:
    name = spec(f"data-read-{runtime}", env, runtime=runtime)
    with data_kernel(name, env["state"]) as (km, kc):
        facts = run_json(kc, READS)
        kernel_id = km.kernel_id
    assert facts["datasets"] == {"sales": "read", "out": "read-write"}
    assert facts["ls"] == ["sales/2024", "sales/2024.csv", "sales/latest.csv"]  # no escapes
    assert facts["text"] == facts["link"] == facts["fsspec"] == CSV
    assert facts["binary"].startswith("region,amount")
    assert facts["write"] == ["ok", "written in the sandbox\n"]
    assert (env["out"] / "from-kernel.txt").read_text() == "written in the sandbox\n"
    assert facts["token_mode"] == "0o400"
    entries = audit(env, kernel_id)
    assert {(e["op"], e["decision"]) for e in entries} >= {
        ("scope", "allow"),
        ("list", "allow"),
        ("read", "allow"),
        ("write", "allow"),
    }
    assert all(e["token_id"] for e in entries)
    # shut down: its token is revoked, not merely forgotten
    records = [
        r
        for r in TokenStore(env["state"] / "tokens.sqlite").records(include_dead=True)
        if r.kernel_id == kernel_id
    ]
    assert records and all(r.revoked for r in records)


REFUSALS = (
    TRY
    + r"""
def write_sales():
    with data.open("sales/new.csv", "w") as f:
        f.write("x")
print(json.dumps({
    "scope": attempt(lambda: data.ls("hr")),
    "dotdot": attempt(lambda: data.open("sales/../hr/salaries.csv").read()),
    "absolute": attempt(lambda: data.info("sales//etc/passwd")),
    "symlink": attempt(lambda: data.open("sales/escape.txt").read()),
    "symlink_dir": attempt(lambda: data.ls("sales/escape-dir")),
    "read_only": attempt(write_sales),
    "missing": attempt(lambda: data.open("sales/nope.csv").read()),
    "direct": attempt(lambda: open("%(hr)s/salaries.csv").read()),
}))
"""
)


def test_refusals_from_inside_are_clear_and_audited(env, leak_check) -> None:
    name = spec("data-refusals", env)
    with data_kernel(name, env["state"]) as (km, kc):
        got = run_json(kc, REFUSALS % {"hr": env["hr"]})
        still = run_json(kc, TRY + 'print(json.dumps(attempt(lambda: data.ls("sales"))))')
        kernel_id = km.kernel_id
    assert got["scope"] == ["NotInScope", "dataset 'hr' is not in this kernel's scope"]
    for key in ("dotdot", "absolute", "symlink", "symlink_dir"):
        assert got[key][0] == "PathEscape" and "path leaves the dataset" in got[key][1], key
    assert got["read_only"] == ["ReadOnly", "dataset 'sales' is read-only for this kernel"]
    assert got["missing"][0] == "DataNotFound"
    assert got["direct"][0] == "FileNotFoundError"  # the host path itself is not in the sandbox
    assert still[0] == "ok"
    reasons = [e["reason"] for e in audit(env, kernel_id) if e["decision"] == "deny"]
    assert sorted(reasons) == sorted(
        ["scope", "escape", "escape", "escape", "escape", "read-only", "not-found"]
    )


def test_expired_token(env, leak_check) -> None:
    name = spec("data-expiry", env, token_ttl=6)
    with data_kernel(name, env["state"]) as (km, kc):
        assert run_json(kc, TRY + 'print(json.dumps(attempt(lambda: data.ls("sales"))))')[0] == "ok"
        record = next(
            r
            for r in TokenStore(env["state"] / "tokens.sqlite").records()
            if r.kernel_id == km.kernel_id
        )
        time.sleep(max(0.0, record.expires - time.time()) + 0.5)
        got = run_json(kc, TRY + 'print(json.dumps(attempt(lambda: data.ls("sales"))))')
        kernel_id = km.kernel_id
    assert got[0] == "TokenExpired" and "token expired" in got[1]
    assert audit(env, kernel_id)[-1]["reason"] == "expired"


def test_revoke_while_running_then_restart_mints_a_new_token(env, leak_check) -> None:
    name = spec("data-revoke", env)
    db = str(env["state"] / "tokens.sqlite")
    ls = TRY + 'print(json.dumps(attempt(lambda: data.ls("sales"))))'
    with data_kernel(name, env["state"]) as (km, kc):
        assert run_json(kc, ls)[0] == "ok"
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "kernel_sandbox.cli",
                "tokens",
                "revoke",
                km.kernel_id,
                "--db",
                db,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert run_json(kc, ls) == ["TokenRevoked", "token revoked"]
        assert audit(env, km.kernel_id)[-1]["reason"] == "revoked"

        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert run_json(kc, ls)[0] == "ok"  # a restart mints a new token
        records = [
            r for r in TokenStore(db).records(include_dead=True) if r.kernel_id == km.kernel_id
        ]
        assert [r.state(time.time()) for r in records] == ["live", "revoked"]
        kernel_id, shared = km.kernel_id, Path(km.provisioner.runtime_dir.shared)
    assert not TokenStore(db).records() or all(
        r.kernel_id != kernel_id for r in TokenStore(db).records()
    )
    assert not shared.exists()


STEAL = (
    TRY
    + r"""
print(json.dumps({
    "stolen": attempt(lambda: data.Client(token=%(token)r).ls("sales")),
    "own": attempt(lambda: data.ls("sales")),
}))
"""
)

RAW = r"""
import json, socket, struct
def send(payload):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect("/run/kernel-sandbox/data.sock")
    try:
        s.sendall(payload)
    except OSError:
        pass
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    s.close()
    return json.loads(data[5:])["error"] if len(data) > 5 else None
print(json.dumps({
    "garbage": send(b"\x00\x01 this is not a request"),
    "not_json": send(b"J" + struct.pack(">I", 9) + b"{not json"),
    "oversized": send(b"J" + struct.pack(">I", 512 * 1024 * 1024) + b"{" * 65536),
}))
"""


def test_a_copied_token_and_malformed_requests_are_refused_and_others_served(
    env, leak_check
) -> None:
    ls = TRY + 'print(json.dumps(attempt(lambda: data.ls("sales"))))'
    with (
        data_kernel(spec("data-a", env), env["state"]) as (km_a, kc_a),
        data_kernel(spec("data-b", env), env["state"]) as (km_b, kc_b),
    ):
        token_a = run_cell(kc_a, "print(open('/run/kernel-sandbox/data-token').read().strip())")
        token_a = token_a["stdout"].strip()
        got = run_json(kc_b, STEAL % {"token": token_a})
        raw = run_json(kc_a, RAW)
        after_a, after_b = run_json(kc_a, ls), run_json(kc_b, ls)
        id_a, id_b = km_a.kernel_id, km_b.kernel_id
    assert got["stolen"] == ["TokenInvalid", "token does not belong to this kernel"]
    assert got["own"][0] == "ok"
    assert raw == {"garbage": "bad-request", "not_json": "bad-request", "oversized": "too-large"}
    assert after_a[0] == after_b[0] == "ok"
    denied_b = [e for e in audit(env, id_b) if e["decision"] == "deny"]
    assert [e["reason"] for e in denied_b] == ["wrong-kernel"]
    denied_a = [e["reason"] for e in audit(env, id_a) if e["decision"] == "deny"]
    assert denied_a == ["bad-request", "bad-request", "too-large"]


def test_a_kernel_without_datasets_has_no_token_and_no_broker(env, leak_check) -> None:
    name = make_kernelspec("data-none", {})
    code = (
        TRY
        + r"""
import os
print(json.dumps({"files": sorted(os.listdir("/run/kernel-sandbox")),
                  "ls": attempt(lambda: data.ls("sales"))}))
"""
    )
    with data_kernel(name, env["state"]) as (_, kc):
        got = run_json(kc, code)
    assert "data-token" not in got["files"] and "data.sock" not in got["files"]
    assert got["ls"][0] == "BrokerUnavailable" and "grants no datasets" in got["ls"][1]


def test_a_policy_may_not_expose_the_brokers_state(env, leak_check) -> None:
    name = make_kernelspec("data-expose", {"mounts": [f"{env['state']}:/state:ro"]})
    env["state"].mkdir(exist_ok=True)
    km = KernelManager(kernel_name=name, config=broker_config(env["state"]))
    with pytest.raises(ValueError, match="data broker's tokens, audit log or credentials"):
        km.start_kernel()

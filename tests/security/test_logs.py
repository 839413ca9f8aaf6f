"""Host log probes: a kernel floods the data broker and its egress proxy for ~10 s with requests
that carry huge, newline-laden names, and the host measures what its logs grew by.

The owner's log is this process's ``kernel_sandbox`` logger (the broker runs here) plus this
process's stderr (the egress proxy inherits it); the audit and egress decision logs are files
of their own. The only egress target is a server of this test on 127.0.0.1
(:mod:`support.egress_servers`), named ``evil.test``/``api.test`` through egress_hosts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.egress_servers import LocalTargets
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from traitlets.config import Config

FORGED = "KS-FORGED-LINE"
FLOOD_SECONDS = 10
# the probe kernel's budgets (traits): the owner's log keeps the default (20 lines per 10 s),
# the files get 50 records per 10 s (default 1,000) so that a flood this machine can drive
# through the in-sandbox bridge (a few hundred requests in 10 s under runsc) is well over it
LINES, RECORDS, INTERVAL = 20, 50, 10.0
WINDOWS = 3  # a flood of ~10 s, plus the shutdown, spans at most three intervals
OWNER_LOG_BOUND = 256 * 1024

FLOOD = r"""
import json, os, socket, struct, threading, time
TOKEN = open('/run/kernel-sandbox/data-token').read().strip()
NAME = 'A' * 60000 + '\n' + FORGED + ' kernel_sandbox.broker: approved by the owner\n' + 'B' * 100
HOST = 'a' * 60 + '.' + 'b' * 60 + '.' + 'c' * 60 + '.' + 'd' * 60 + '.test'
stop = time.monotonic() + SECONDS
counts = {'broker': 0, 'egress': 0, 'broker_errors': 0, 'egress_errors': 0, 'replies': set()}

def frame(obj):
    payload = json.dumps(obj).encode()
    return struct.pack('>cI', b'J', len(payload)) + payload

def broker(name):
    ops = ['stat', 'list', 'read', 'op\n' + FORGED + ' ' + 'x' * 30000]
    i = 0
    while time.monotonic() < stop:
        op = ops[i % len(ops)]; i += 1
        try:
            s = socket.socket(socket.AF_UNIX); s.settimeout(10)
            s.connect('/run/kernel-sandbox/data.sock')
            s.sendall(frame({'op': op, 'token': TOKEN, 'dataset': 'd', 'path': name}))
            head = s.recv(5)
            if len(head) == 5:
                body = b''
                n = struct.unpack('>cI', head)[1]
                while len(body) < n:
                    chunk = s.recv(n - len(body))
                    if not chunk: break
                    body += chunk
                counts['replies'].add(json.loads(body).get('error'))
            s.close()
            counts['broker'] += 1
        except OSError:
            counts['broker_errors'] += 1

def egress():
    url = f'http://{HOST}:{PORT}/' + 'p' * 30000
    request = f'GET {url} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\n\r\n'.encode()
    while time.monotonic() < stop:
        try:
            s = socket.create_connection(('127.0.0.1', 3128), timeout=10)
            s.sendall(request)
            reply = s.recv(64)
            s.close()
            counts['egress'] += 1
            if b' 403 ' not in reply:
                counts['replies'].add(reply[:40].decode('latin-1'))
        except OSError:
            counts['egress_errors'] += 1

SHORT = 'no\n' + FORGED + ' such'  # cheap requests: the rate, not the size
threads = [threading.Thread(target=broker, args=(n,)) for n in (NAME, NAME, SHORT, SHORT)]
threads += [threading.Thread(target=egress) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
counts['replies'] = sorted(map(str, counts['replies']))
print(json.dumps(counts))
"""


class Tally(logging.Handler):
    """Counts what reaches the owner's log, and keeps every line that starts like a forgery."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bytes = 0
        self.records = 0
        self.forged: list[str] = []
        self.sample: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.bytes += len(text.encode("utf-8", "replace")) + 1
        self.records += 1
        if len(self.sample) < 3:
            self.sample.append(text[:200])
        self.forged += [line[:80] for line in text.splitlines() if line.startswith(FORGED)]


def size(path: Path) -> int:
    """Bytes in ``path`` and its rotated files."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def lines(path: Path) -> list[str]:
    out: list[str] = []
    for p in sorted(path.parent.glob(path.name + "*")):
        out += p.read_text(errors="replace").splitlines()
    return out


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTargets]:
    servers = LocalTargets(tmp_path_factory.mktemp("log-targets"))
    yield servers
    servers.close()


def test_log_flood(
    runtime, kernel_image, jupyter_path, targets, tmp_path, capfd, observe, x86_64
) -> None:
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "a.csv").write_text("x\n1\n")
    for path in (tmp_path, dataset):
        os.chmod(path, 0o755)
    state = tmp_path / "state"
    audit, egress = state / "audit.jsonl", state / "egress.jsonl"
    name = make_kernelspec(
        f"log-flood-{runtime}",
        {
            "image": kernel_image,
            "runtime": runtime,
            "datasets": {"d": f"{dataset}:read"},
            "network": "allowlist",
            "egress": [f"api.test:{targets.http_port}"],
            "egress_hosts": targets.hosts(),
        },
    )
    config = Config()
    config.DockerSandboxProvisioner.token_db = str(state / "tokens.sqlite")
    config.DockerSandboxProvisioner.audit_log = str(audit)
    config.DockerSandboxProvisioner.egress_log = str(egress)
    config.DockerSandboxProvisioner.log_lines = LINES
    config.DockerSandboxProvisioner.log_records = RECORDS
    config.DockerSandboxProvisioner.log_interval = INTERVAL
    tally = Tally()
    owner = logging.getLogger("kernel_sandbox")
    owner.addHandler(tally)
    level = owner.level
    owner.setLevel(logging.INFO)
    try:
        with sandbox_kernel(name, config=config) as (km, kc):
            capfd.readouterr()
            before = {"owner": tally.bytes, "audit": size(audit), "egress": size(egress)}
            code = f"FORGED = {FORGED!r}\nSECONDS = {FLOOD_SECONDS}\nPORT = {targets.http_port}\n"
            out = run_cell(kc, code + FLOOD, timeout=FLOOD_SECONDS + 120)
            assert out["status"] == "ok", out
            counts = json.loads(out["stdout"].strip().splitlines()[-1])
            # what was held back is summarized within an interval after the flood
            stderr = capfd.readouterr().err
    finally:
        owner.removeHandler(tally)
        owner.setLevel(level)
    stderr += capfd.readouterr().err
    grown = {
        "owner": tally.bytes - before["owner"] + len(stderr.encode()),
        "audit": size(audit) - before["audit"],
        "egress": size(egress) - before["egress"],
    }
    kid = km.kernel_id
    records = {"audit": read(audit, kid), "egress": read(egress, kid)}
    kept = {k: sum(r["decision"] != "suppressed" for r in v) for k, v in records.items()}
    held = {k: sum(r.get("suppressed", 0) for r in v) for k, v in records.items()}
    file_lines = lines(audit) + lines(egress)
    forged = tally.forged + [
        line for line in stderr.splitlines() + file_lines if line.startswith(FORGED)
    ]
    summary = (
        f"{counts['broker']:,} broker and {counts['egress']:,} egress requests in "
        f"{FLOOD_SECONDS} s (half of the broker's with a 60 KB newline-laden name); growth: "
        f"owner's log {grown['owner']:,} B in {tally.records} lines, audit log "
        f"{grown['audit']:,} B ({kept['audit']:,} records, {held['audit']:,} summarized), "
        f"egress log {grown['egress']:,} B ({kept['egress']:,} records, {held['egress']:,} "
        f"summarized); forged lines: {len(forged)}"
    )
    print(summary)
    observe("res-log-flood-data", summary)
    observe("res-log-flood-egress", summary)
    assert counts["broker"] > 3 * RECORDS and counts["egress"] > 3 * RECORDS, counts
    assert not forged, forged[:3]
    assert grown["owner"] < OWNER_LOG_BOUND, (summary, tally.sample)
    assert tally.records <= WINDOWS * (LINES + 1), (summary, tally.sample)
    for name, requests in (("audit", counts["broker"]), ("egress", counts["egress"])):
        assert kept[name] <= WINDOWS * RECORDS, summary
        # nothing vanished: every request is a record or counted in a summary
        assert kept[name] + held[name] >= 0.9 * requests, summary


def read(path: Path, kernel_id: str) -> list[dict]:
    """This kernel's decisions in ``path`` and its rotated files (each line must be JSON; the
    audit log's execution and kernel records, which the kernel's requests do not make, aside)."""
    out = []
    for line in lines(path):
        record = json.loads(line)
        if record.get("kernel_id") == kernel_id and "decision" in record:
            out.append(record)
    return out

"""Per-caller views through the sandbox service, with real accounts and real kernels (issue
15): ``ps``, ``stop``, ``tokens``, ``egress pending|approve|deny`` show and act on the caller's
own kernels only; an operator sees all; ``doctor`` says which mode is in force and why.

kstalice and kstbob each keep a kernel running for the module (a client process of theirs
that waits on stdin); the commands run as them with ``KERNEL_SANDBOX_SERVICE`` set. The
operator's policy file grants each of their groups a dataset (so the service's broker mints
their kernels' tokens), Alice's group an egress pattern, and kstcarol's group ``operator =
true``. Bob's kernel is stopped last.
"""

from __future__ import annotations

import json
import pwd
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ASK_SPEC = "views-ask"  # Alice's: a dataset, egress_mode ask
DATA_SPEC = "views-data"  # Bob's: a dataset
COURSE = Path("/tmp/kss-views-course")
POLICY = f"""
[datasets]
course = "{COURSE}:read"

[group.kstalice]
datasets = ["course"]
egress = ["listed.test:443", "localhost:*"]

[group.kstbob]
datasets = ["course"]

[group.kstcarol]
operator = true
"""

# Run as a test account: keep a sandboxed kernel and its client until "quit" on stdin or the
# kernel ends; a JSON line on stdin is code to execute (not waited for). Prints its kernel id,
# then, at the end, whether the kernel ended under it and what its clients were told.
HOLDER = """
import json, os, queue, select, sys, time
import jupyter_client
os.makedirs({cwd!r}, exist_ok=True)
km = jupyter_client.KernelManager(kernel_name={spec!r})
km.start_kernel(cwd={cwd!r})
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
print(json.dumps({{"kernel_id": km.kernel_id}}), flush=True)
told, ended = [], False
def drain(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        if msg["msg_type"] == "stream":
            told.append(msg["content"]["text"])
while True:
    drain(0.3)
    if not km.is_alive():
        ended = True
        drain(2)
        break
    if select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            break
        kc.execute(json.loads(line))
print(json.dumps({{"ended": ended, "told": told}}), flush=True)
kc.stop_channels()
if not ended:
    km.shutdown_kernel(now=True)
"""

CLI = "import sys\nfrom kernel_sandbox.cli.app import main\nsys.exit(main({argv!r}))\n"


class Holder:
    """A test account's client process keeping one kernel (see HOLDER)."""

    def __init__(self, users, user: str, env: dict[str, str], spec: str = "python3-sandbox"):
        account = pwd.getpwnam(user)
        self.user = user
        code = HOLDER.format(spec=spec, cwd=account.pw_dir + "/views-work")
        self.process = users.popen_as(user, code, env=env)
        self.kernel_id = str(self._line(180)["kernel_id"])

    def _line(self, timeout: float) -> dict:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.process.stdout], [], [], 0.5)[0]:
                line = self.process.stdout.readline()
                if line.strip().startswith("{"):
                    return dict(json.loads(line))
                if not line:
                    break
        self.process.kill()
        raise AssertionError(f"{self.user}'s client: {self.process.stderr.read()[-4000:]}")

    def execute(self, code: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(code) + "\n")
        self.process.stdin.flush()

    def outcome(self, timeout: float = 60) -> dict:
        """What the client saw when its kernel ended under it."""
        return self._line(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


def run_cli(users, user: str, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return users.run_as(user, CLI.format(argv=list(argv)), env=env, check=False, timeout=120)


def json_out(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("error:"), lines
    return lines[0]


class Listener:
    """A TCP listener on loopback that counts connections (the egress target)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def env(sandbox_service) -> dict[str, str]:
    return {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}


def write_spec(users, name: str, config: dict) -> str:
    folder = users.base / "jupyter" / "kernels" / name
    folder.mkdir(mode=0o755, exist_ok=True)
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config}
        },
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    (folder / "kernel.json").chmod(0o644)
    return name


@pytest.fixture(scope="module")
def holders(sandbox_service, test_users, env, listener) -> Iterator[dict[str, Holder]]:
    """Alice's kernel (egress_mode ask, so it can have requests waiting) and Bob's, each with
    the dataset their group is granted."""
    COURSE.mkdir(mode=0o755, exist_ok=True)
    (COURSE / "readme.txt").write_text("course material\n")
    sandbox_service.write_policy(POLICY)
    ask = {
        "network": "allowlist",
        "egress": ["listed.test:443"],
        "egress_mode": "ask",
        "egress_ask_timeout": 120,
        "datasets": ["course"],
    }
    write_spec(test_users, ASK_SPEC, ask)
    write_spec(test_users, DATA_SPEC, {"datasets": ["course"]})
    started: dict[str, Holder] = {}
    try:
        started["kstalice"] = Holder(test_users, "kstalice", env, spec=ASK_SPEC)
        started["kstbob"] = Holder(test_users, "kstbob", env, spec=DATA_SPEC)
        yield started
    finally:
        for holder in started.values():
            holder.close()
        sandbox_service.write_policy("")


def operator_cli(test_users, env, *argv: str) -> subprocess.CompletedProcess:
    """A CLI command as kstcarol, whose group the policy file makes operator."""
    return run_cli(test_users, "kstcarol", env, *argv)


def test_ps_shows_each_caller_its_own_kernels(test_users, env, holders):
    alice, bob = holders["kstalice"], holders["kstbob"]
    for holder, other in ((alice, bob), (bob, alice)):
        rows = json_out(run_cli(test_users, holder.user, env, "ps", "--json"))
        assert [r["kernel_id"] for r in rows] == [holder.kernel_id]
        row = rows[0]
        assert row["owner"] == holder.user and row["state"] == "running"
        assert row["memory"] and row["memory"] > 0 and row["memory_limit"] >= row["memory"]
        assert row["kernelspec"] == (ASK_SPEC if holder is alice else DATA_SPEC)
        table = run_cli(test_users, holder.user, env, "ps")
        assert holder.kernel_id in table.stdout and other.kernel_id not in table.stdout
        assert "KERNEL ID" in table.stdout and f"{holder.user} (pid" in table.stdout
    # as an operator Carol sees both, with whose they are
    rows = json_out(operator_cli(test_users, env, "ps", "--json"))
    owners = {r["kernel_id"]: r["owner"] for r in rows}
    assert owners[alice.kernel_id] == "kstalice" and owners[bob.kernel_id] == "kstbob"


def test_tokens_of_each_caller_only(sandbox_service, test_users, env, holders):
    """The tokens the service's broker minted for each kernel's granted dataset."""
    alice, bob = holders["kstalice"], holders["kstbob"]
    rows = json_out(run_cli(test_users, "kstalice", env, "tokens", "list", "--json"))
    assert [r["kernel_id"] for r in rows] == [alice.kernel_id]
    assert rows[0]["datasets"] == {"course": "read"} and rows[0]["state"] == "live"
    assert "kst1_" not in json.dumps(rows)  # never a secret
    alice_token = rows[0]["token_id"]
    (bob_row,) = json_out(run_cli(test_users, "kstbob", env, "tokens", "list", "--json"))
    bob_token = bob_row["token_id"]
    assert bob_row["kernel_id"] == bob.kernel_id

    # Bob's token and Bob's kernel do not exist for Alice
    for ident in (bob_token, bob.kernel_id):
        line = one_error_line(run_cli(test_users, "kstalice", env, "tokens", "revoke", ident))
        assert ident in line and "kstalice" in line

    # the operator sees everyone's, with whose they are
    listed = json_out(operator_cli(test_users, env, "tokens", "list", "--json"))
    users = {r["token_id"]: r["user"] for r in listed}
    assert users[alice_token] == "kstalice" and users[bob_token] == "kstbob"
    table = operator_cli(test_users, env, "tokens", "list")
    assert "USER" in table.stdout and "kstbob" in table.stdout

    result = run_cli(test_users, "kstalice", env, "tokens", "revoke", alice.kernel_id)
    assert result.returncode == 0, result.stderr
    assert f"revoked token {alice_token} of kernel {alice.kernel_id}" in result.stdout
    assert json_out(run_cli(test_users, "kstalice", env, "tokens", "list", "--json")) == []
    (revoked,) = json_out(run_cli(test_users, "kstalice", env, "tokens", "list", "--all", "--json"))
    assert revoked["state"] == "revoked"
    assert "kstalice, through the sandbox service" in revoked["reason"]
    (still,) = json_out(run_cli(test_users, "kstbob", env, "tokens", "list", "--json"))
    assert still["token_id"] == bob_token and still["state"] == "live"


def wait_pending(test_users, user: str, env, target: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = json_out(run_cli(test_users, user, env, "egress", "pending", "--json"))
        if any(r["target"] == target for r in rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"no request to {target} waits for {user}")


def egress_log(sandbox_service, kernel_id: str) -> list[dict]:
    path = Path(sandbox_service.base) / "log" / "egress.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, filter(None, lines)) if e.get("kernel_id") == kernel_id]


def test_egress_approvals_of_each_caller_only(sandbox_service, test_users, env, holders, listener):
    """Alice's kernel asks for localhost (not listed: it waits for a person). Only the
    operator can map names to loopback (egress_hosts), so once approved the proxy refuses it
    as a non-public address: the decision log shows the request got past the person."""
    alice = holders["kstalice"]
    target = f"localhost:{listener.port}"
    alice.execute(
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', 3128), timeout=150)\n"
        f"s.sendall(b'CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n')\n"
        "print(s.recv(200))\n"
    )
    rows = wait_pending(test_users, "kstalice", env, target)
    assert [(r["kernel_id"], r["target"]) for r in rows] == [(alice.kernel_id, target)]

    # Bob sees nothing waiting, and cannot decide for Alice's kernel (not even by prefix)
    assert json_out(run_cli(test_users, "kstbob", env, "egress", "pending", "--json")) == []
    for ident in (alice.kernel_id, alice.kernel_id[:8]):
        for verb in ("approve", "deny"):
            line = one_error_line(run_cli(test_users, "kstbob", env, "egress", verb, ident, target))
            assert "no kernel" in line and "kstbob" in line
    line = one_error_line(
        run_cli(test_users, "kstbob", env, "egress", "pending", "--kernel", alice.kernel_id)
    )
    assert "no kernel" in line

    # the operator sees it, with whose it is
    rows = json_out(operator_cli(test_users, env, "egress", "pending", "--json"))
    assert [(r["kernel_id"], r["user"]) for r in rows if r["target"] == target] == [
        (alice.kernel_id, "kstalice")
    ]

    # a user approves only within the operator's allowlist for them
    line = one_error_line(
        run_cli(test_users, "kstalice", env, "egress", "approve", alice.kernel_id, "other.test:443")
    )
    assert "egress" in line and "other.test:443" in line, line
    result = run_cli(test_users, "kstalice", env, "egress", "approve", alice.kernel_id[:8], target)
    assert result.returncode == 0, result.stderr
    assert f"approved 1 waiting request(s) to {target} in kernel" in result.stdout
    deadline = time.monotonic() + 30
    rules: list[str] = []
    while "non-public-address" not in rules and time.monotonic() < deadline:
        time.sleep(0.2)
        rules = [e["rule"] for e in egress_log(sandbox_service, alice.kernel_id)]
    assert "non-public-address" in rules and "ask-denied" not in rules, rules
    assert listener.accepted == 0
    assert json_out(run_cli(test_users, "kstalice", env, "egress", "pending", "--json")) == []


def test_doctor_says_service_mode_and_why(sandbox_service, test_users, env, holders):
    result = run_cli(test_users, "kstalice", env, "doctor", "--json")
    checks = {f"{c['area']}: {c['name']}": c for c in json.loads(result.stdout)}
    mode = checks["mode: service"]
    assert mode["status"] == "ok" and sandbox_service.socket in mode["detail"]
    assert "KERNEL_SANDBOX_SERVICE names it" in mode["detail"]
    answers = checks["service: answers"]
    assert answers["status"] == "ok" and "kstalice" in answers["detail"], answers
    assert "course" in answers["detail"]  # the rules the service applies to her
    engine = checks["engine: no direct access"]  # good news, not a failure
    assert engine["status"] == "ok" and "permission denied" in engine["detail"].lower(), engine
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert result.returncode == (1 if failed else 0), failed
    assert not failed, failed

    gone = run_cli(
        test_users, "kstalice", env, "doctor", "--service", "/tmp/no-such.sock", "--json"
    )
    assert gone.returncode == 1
    checks = {f"{c['area']}: {c['name']}": c for c in json.loads(gone.stdout)}
    assert checks["mode: service"]["detail"].endswith("--service /tmp/no-such.sock")
    answers = checks["service: answers"]
    assert answers["status"] == "fail" and "does not answer" in answers["detail"]
    assert "systemctl start kernel-sandbox" in answers["fix"]

    direct = run_cli(test_users, "kstalice", env, "doctor", "--direct", "--json")
    checks = {f"{c['area']}: {c['name']}": c for c in json.loads(direct.stdout)}
    assert checks["mode: direct"]["detail"].endswith("--direct: direct engine access")
    assert checks["engine: docker"]["status"] == "fail"  # direct mode needs the engine


def test_stop_only_ones_own_kernel_and_its_client_is_told(test_users, env, holders):
    """Last: Bob's kernel ends here."""
    alice, bob = holders["kstalice"], holders["kstbob"]
    for ident in (bob.kernel_id, bob.kernel_id[:8]):
        line = one_error_line(run_cli(test_users, "kstalice", env, "stop", ident))
        assert "no kernel" in line and "kstalice" in line
    assert bob.process.poll() is None  # untouched
    assert [r["kernel_id"] for r in json_out(run_cli(test_users, "kstbob", env, "ps", "--json"))]

    result = run_cli(test_users, "kstbob", env, "stop", bob.kernel_id[:8])
    assert result.returncode == 0, result.stderr
    assert f"stopped kernel {bob.kernel_id}" in result.stdout and "ended" in result.stdout
    seen = bob.outcome()
    assert seen["ended"] is True
    told = "".join(seen["told"])
    assert "this kernel was shut down: stopped by kstbob" in told, seen

    assert json_out(run_cli(test_users, "kstbob", env, "ps", "--json")) == []
    ended = json_out(run_cli(test_users, "kstbob", env, "ps", "--all", "--json"))
    assert all(r["state"] != "running" for r in ended)  # until its owner's cleanup or sweep
    mine = json_out(run_cli(test_users, "kstalice", env, "ps", "--json"))
    assert [r["kernel_id"] for r in mine] == [alice.kernel_id]  # Alice's kernel runs on
    line = one_error_line(operator_cli(test_users, env, "stop", "no-such-kernel"))
    assert "no kernel" in line

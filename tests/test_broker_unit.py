"""Fast tests of the data broker on the host alone: tokens, path checks, protocol, audit.

The same client code runs inside the kernels (tests/test_broker.py covers that end to end);
here it talks to a broker over a runtime directory laid out as the provisioner lays it out.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from kernel_sandbox import data
from kernel_sandbox.broker import AuditLog, Credentials, DataBroker
from kernel_sandbox.broker.protocol import Refusal
from kernel_sandbox.broker.sources import LocalSource, relative_parts
from kernel_sandbox.broker.tokens import Grant, TokenNotFound, TokenRefused, TokenStore
from kernel_sandbox.cli.app import main as cli_main
from kernel_sandbox.errors import PolicyError
from kernel_sandbox.inside import contract, wire
from kernel_sandbox.policy.model import SandboxPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "sales"
    (root / "2024").mkdir(parents=True)
    (root / "2024.csv").write_text("region,amount\nnorth,10\nsouth,32\n")
    (root / "2024" / "q1.csv").write_text("q1\n")
    (tmp_path / "secret.txt").write_text("host secret\n")
    os.symlink(tmp_path / "secret.txt", root / "escape")
    os.symlink(tmp_path, root / "escape-dir")
    os.symlink("2024.csv", root / "alias.csv")
    os.symlink("2024", root / "alias-dir")
    return root


class Kernel:
    """A runtime directory as the provisioner lays it out: host-only ``<id>/``, shared ``s/``."""

    def __init__(self, root: Path, kernel_id: str):
        self.id = kernel_id
        self.dir = root / kernel_id
        self.shared = self.dir / "s"
        self.shared.mkdir(parents=True)
        os.chmod(self.dir, 0o700)

    def client(self, token: str | None = None) -> data.Client:
        return data.Client(
            str(self.shared / contract.DATA_SOCKET),
            token=token,
            token_file=str(self.shared / contract.DATA_TOKEN),
            timeout=10,
        )

    def token(self) -> str:
        return (self.shared / contract.DATA_TOKEN).read_text().strip()

    def raw(self, payload: bytes) -> bytes:
        """Send raw bytes on the kernel's socket; return what the broker answers."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.shared / contract.DATA_SOCKET))
            try:
                sock.sendall(payload)
            except BrokenPipeError:
                pass
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass
        return b"".join(chunks)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(state: Path, clock: Clock):
    broker = DataBroker(
        TokenStore(state / "tokens.sqlite", clock=clock),
        AuditLog(state / "audit.jsonl"),
        recheck_every=0.0,
    )
    yield broker
    broker.close()


@pytest.fixture
def kernels(tmp_path: Path, broker: DataBroker, dataset: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("rw")
    scope_a = {"sales": Grant(str(dataset), "read"), "out": Grant(str(out), "read-write")}
    a, b = Kernel(tmp_path / "rt", "kernel-a"), Kernel(tmp_path / "rt", "kernel-b")
    broker.grant(a.id, a.shared, scope_a, ttl=3600)
    broker.grant(b.id, b.shared, {"sales": Grant(str(dataset), "read")}, ttl=3600)
    return a, b


def audit(state: Path) -> list[dict]:
    return AuditLog(state / "audit.jsonl").entries()


# -- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\x00b"])
def test_relative_parts_refuses_paths_that_leave(path: str) -> None:
    with pytest.raises(Refusal) as info:
        relative_parts(path)
    assert info.value.code == "escape"
    assert "path leaves the dataset" in info.value.message


def test_relative_parts_normalises_harmless_forms() -> None:
    assert relative_parts("") == []
    assert relative_parts("./a//b/") == ["a", "b"]


def test_local_source_follows_links_only_inside(dataset: Path) -> None:
    source = LocalSource(str(dataset))
    assert source.stat(["alias.csv"])["type"] == "file"
    assert source.stat(["alias-dir", "q1.csv"])["size"] == 3
    for parts in (["escape"], ["escape-dir", "secret.txt"], ["escape-dir"]):
        with pytest.raises(Refusal) as info:
            source.stat(parts)
        assert info.value.code == "escape"
    with pytest.raises(Refusal) as info:
        source.open_read(["escape"], 0, None)
    assert info.value.code == "escape"
    names = [e["name"] for e in source.list([])]
    assert names == ["2024", "2024.csv", "alias-dir", "alias.csv"]  # escaping links hidden


def test_local_source_write_replaces_a_planted_symlink_instead_of_following(tmp_path: Path) -> None:
    root = tmp_path / "rw"
    root.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.symlink(victim, root / "report.txt")
    writer = LocalSource(str(root)).open_write(["report.txt"])
    writer.write(b"new")
    writer.commit()
    assert victim.read_text() == "untouched"
    assert not (root / "report.txt").is_symlink()
    assert (root / "report.txt").read_text() == "new"
    os.symlink(tmp_path, root / "link-out")
    with pytest.raises(Refusal) as info:
        LocalSource(str(root)).open_write(["link-out", "x.txt"])
    assert info.value.code == "escape"
    assert not (tmp_path / "x.txt").exists()


# -- tokens -----------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_and_survive_a_new_store(state: Path, clock: Clock) -> None:
    store = TokenStore(state / "t.sqlite", clock=clock)
    token, record = store.mint("k1", {"sales": Grant("/srv/sales", "read")}, ttl=60)
    store.close()
    raw = b"".join(p.read_bytes() for p in state.iterdir() if p.name.startswith("t.sqlite"))
    assert token.encode() not in raw
    assert stat.S_IMODE((state / "t.sqlite").stat().st_mode) == 0o600
    again = TokenStore(state / "t.sqlite", clock=clock)
    assert again.check(token, "k1").token_id == record.token_id
    with pytest.raises(TokenRefused) as info:
        again.check(token, "k2")
    assert info.value.code == "wrong-kernel"
    with pytest.raises(TokenRefused) as info:
        again.check(token + "x", "k1")
    assert info.value.code == "bad-token"
    clock.now += 61
    with pytest.raises(TokenRefused) as info:
        again.check(token, "k1")
    assert info.value.code == "expired"


def test_revoke_by_token_id_or_kernel_id(state: Path, clock: Clock) -> None:
    store = TokenStore(state / "t.sqlite", clock=clock)
    t1, r1 = store.mint("k1", {}, ttl=60)
    t2, _ = store.mint("k2", {}, ttl=60)
    assert [r.token_id for r in store.revoke(r1.token_id)] == [r1.token_id]
    assert store.revoke("k2")[0].kernel_id == "k2"
    for token, kernel in ((t1, "k1"), (t2, "k2")):
        with pytest.raises(TokenRefused) as info:
            store.check(token, kernel)
        assert info.value.code == "revoked"
    with pytest.raises(TokenNotFound):
        store.revoke("nope")
    assert store.records() == []
    assert len(store.records(include_dead=True)) == 2


def test_the_broker_prunes_long_dead_tokens_when_it_starts(state: Path, clock: Clock) -> None:
    store = TokenStore(state / "t.sqlite", clock=clock)
    day = 24 * 3600.0
    _, old_expired = store.mint("k-old-expired", {}, ttl=60)
    _, old_revoked = store.mint("k-old-revoked", {}, ttl=30 * day)
    store.revoke(old_revoked.token_id)
    clock.now += 6 * day
    _, recent_revoked = store.mint("k-recent-revoked", {}, ttl=30 * day)
    store.revoke(recent_revoked.token_id)
    _, recent_expired = store.mint("k-recent-expired", {}, ttl=60)
    _, live = store.mint("k-live", {}, ttl=30 * day)
    clock.now += 2 * day  # the first two died 8 days ago, the others a moment or 2 days ago
    assert len(store.records(include_dead=True)) == 5
    keeping = DataBroker(store, AuditLog(state / "audit.jsonl"), prune_after=None)
    try:
        keeping.start()
        assert len(store.records(include_dead=True)) == 5  # None keeps every record
    finally:
        keeping.close()
    broker = DataBroker(store, AuditLog(state / "audit.jsonl"))  # the default: 7 days
    try:
        broker.start()
        kept = {r.token_id for r in store.records(include_dead=True)}
        assert kept == {recent_revoked.token_id, recent_expired.token_id, live.token_id}
    finally:
        broker.close()


def test_cli_tokens_list_and_revoke(state: Path, capsys) -> None:
    store = TokenStore(state / "t.sqlite")
    store.mint("kernel-1", {"sales": Grant("/srv/sales", "read")}, ttl=60)
    db = str(state / "t.sqlite")
    assert cli_main(["tokens", "list", "--json", "--db", db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["kernel_id"] == "kernel-1" and listed[0]["datasets"] == {"sales": "read"}
    assert cli_main(["tokens", "revoke", "kernel-1", "--db", db]) == 0
    assert "revoked token" in capsys.readouterr().out  # what it did: on stdout
    assert cli_main(["tokens", "list", "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli_main(["tokens", "revoke", "no-such-kernel", "--db", db]) == 2


# -- the broker -------------------------------------------------------------------------------


def test_reads_lists_and_writes_in_scope(kernels, dataset: Path, state: Path) -> None:
    a, _ = kernels
    client = a.client()
    assert client.datasets() == {"sales": "read", "out": "read-write"}
    assert client.ls("sales") == [
        "sales/2024",
        "sales/2024.csv",
        "sales/alias-dir",
        "sales/alias.csv",
    ]
    assert client.ls("") == ["out", "sales"]
    assert client.info("sales/2024.csv")["size"] == len((dataset / "2024.csv").read_bytes())
    with client.open("sales/2024.csv") as f:
        assert f.readline() == "region,amount\n"
        f.seek(0)
        assert f.read() == (dataset / "2024.csv").read_text()
    with client.open("sales/2024.csv", "rb") as f:
        f.seek(7)
        assert f.read(6) == b"amount"
    assert client.read_bytes("sales/2024.csv", 0, 6) == b"region"
    with client.open("out/sub/result.txt", "w") as f:
        f.write("total 42\n")
    assert client.open("out/sub/result.txt").read() == "total 42\n"
    decisions = {(e["op"], e["decision"]) for e in audit(state)}
    assert ("write", "allow") in decisions and ("read", "allow") in decisions


@pytest.mark.parametrize(
    ("path", "mode", "error", "reason"),
    [
        ("secret/x", "r", data.NotInScope, "scope"),
        ("sales/../secret.txt", "r", data.PathEscape, "escape"),
        ("sales/escape", "r", data.PathEscape, "escape"),
        ("sales/escape-dir/secret.txt", "r", data.PathEscape, "escape"),
        ("sales//etc/passwd", "r", data.PathEscape, "escape"),
        ("sales/new.csv", "w", data.ReadOnly, "read-only"),
        ("sales/missing.csv", "r", data.DataNotFound, "not-found"),
    ],
)
def test_refusals_are_clear_and_audited(kernels, state: Path, path, mode, error, reason) -> None:
    a, _ = kernels
    with pytest.raises(error) as info:
        with a.client().open(path, mode) as f:
            f.read() if mode == "r" else f.write("x")
    if reason == "scope":
        assert "dataset 'secret' is not in this kernel's scope" in str(info.value)
    if reason == "escape":
        assert "path leaves the dataset" in str(info.value)
    last = audit(state)[-1]
    assert (last["kernel_id"], last["decision"], last["reason"]) == (a.id, "deny", reason)


def test_a_token_copied_to_another_kernel_is_refused(kernels, state: Path) -> None:
    a, b = kernels
    with pytest.raises(data.TokenInvalid, match="does not belong to this kernel"):
        b.client(token=a.token()).ls("sales")
    assert audit(state)[-1]["reason"] == "wrong-kernel"
    assert audit(state)[-1]["kernel_id"] == b.id
    assert b.client().ls("sales")  # b's own token still works


def test_revoked_and_expired_tokens_fail_on_the_next_request(kernels, broker, clock) -> None:
    a, b = kernels
    a.client().ls("sales")
    TokenStore(broker.tokens.path).revoke(a.id)  # as `kernel-sandbox tokens revoke` does
    with pytest.raises(data.TokenRevoked, match="token revoked"):
        a.client().ls("sales")
    clock.now += 3601
    with pytest.raises(data.TokenExpired, match="token expired"):
        b.client().ls("sales")


def test_revocation_cuts_a_read_in_progress(kernels, broker, dataset: Path) -> None:
    a, _ = kernels
    (dataset / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    f = a.client().open("sales/big.bin", "rb", buffering=64 * 1024)
    f.read(1024)
    broker.revoke(a.id, "test")
    with pytest.raises(data.TokenRevoked):
        while f.read(1024 * 1024):
            pass
    f.close()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"garbage that is not a frame at all", "bad-request"),
        (b"J" + (10).to_bytes(4, "big") + b"not json!!", "bad-request"),
        (wire.encode_frame(b"J", b"[1, 2, 3]"), "bad-request"),
        (wire.encode_json({"op": "read", "token": 7}), "bad-request"),
        (wire.encode_json({"op": "delete", "token": "x"}), "bad-request"),
        (b"J" + (200 * 1024 * 1024).to_bytes(4, "big") + b"{" * 1000, "too-large"),
    ],
)
def test_malformed_and_oversized_requests_are_refused_logged_and_survived(
    kernels, state: Path, payload: bytes, reason: str, caplog
) -> None:
    a, b = kernels
    reply = a.raw(payload)
    answer = json.loads(reply[5:])
    assert answer["ok"] is False and answer["error"] == reason
    last = audit(state)[-1]
    assert (last["kernel_id"], last["decision"], last["reason"]) == (a.id, "deny", reason)
    assert b.client().ls("sales") and a.client().ls("sales")  # the broker keeps serving


def test_a_silent_connection_does_not_block_other_kernels(kernels) -> None:
    a, b = kernels
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(a.shared / contract.DATA_SOCKET))
        idle.sendall(b"J\x00")  # half a frame header, then nothing
        started = time.monotonic()
        assert b.client().ls("sales")
        assert time.monotonic() - started < 2


def test_token_file_and_socket_are_put_in_place_without_following_planted_links(
    tmp_path: Path, broker: DataBroker, dataset: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host file")
    os.chmod(victim, 0o600)
    k = Kernel(tmp_path / "rt", "kernel-p")
    os.symlink(victim, k.shared / contract.DATA_TOKEN)
    os.symlink(victim, k.shared / contract.DATA_SOCKET)
    broker.grant(k.id, k.shared, {"sales": Grant(str(dataset), "read")}, ttl=60)
    assert victim.read_text() == "host file" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert stat.S_IMODE((k.shared / contract.DATA_TOKEN).lstat().st_mode) == 0o400
    assert stat.S_ISSOCK((k.shared / contract.DATA_SOCKET).lstat().st_mode)
    assert k.client().ls("sales")
    assert not list(k.dir.glob(".data*"))  # no staging leftovers


def test_release_closes_the_socket_and_restart_mints_a_new_token(kernels, broker, dataset) -> None:
    a, _ = kernels
    old = a.token()
    broker.revoke(a.id, "kernel restarted")
    broker.grant(a.id, a.shared, {"sales": Grant(str(dataset), "read")}, ttl=60)
    assert a.token() != old
    with pytest.raises(data.TokenRevoked):
        a.client(token=old).ls("sales")
    assert a.client().ls("sales")
    broker.release(a.id)
    assert not (a.shared / contract.DATA_SOCKET).exists()
    with pytest.raises(data.BrokerUnavailable):
        a.client().ls("sales")


def test_concurrent_kernels_are_served_in_parallel(kernels) -> None:
    a, b = kernels
    errors: list[BaseException] = []

    def hammer(k: Kernel) -> None:
        try:
            for _ in range(30):
                assert k.client().read_bytes("sales/2024.csv").startswith(b"region")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- credentials and policy -------------------------------------------------------------------


def test_credentials_come_from_a_private_file_longest_prefix_last(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(
        json.dumps({"s3://bucket": {"key": "A", "secret": "S"}, "s3://bucket/team": {"key": "B"}})
    )
    os.chmod(path, 0o600)
    options = Credentials(path).storage_options("s3://bucket/team/sales")
    assert options == {"key": "B", "secret": "S"}
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Credentials(path).storage_options("s3://bucket")


def test_credentials_from_the_keyring(tmp_path: Path) -> None:
    import keyring
    from keyring.backend import KeyringBackend

    class Memory(KeyringBackend):
        priority = 1  # type: ignore[assignment]
        stored = {("kernel-sandbox", "s3://bucket"): json.dumps({"secret": "from-keyring"})}

        def get_password(self, service, username):
            return self.stored.get((service, username))

        def set_password(self, service, username, password):
            self.stored[(service, username)] = password

        def delete_password(self, service, username):
            self.stored.pop((service, username), None)

    previous = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        assert Credentials().storage_options("s3://bucket/x") == {"secret": "from-keyring"}
    finally:
        keyring.set_keyring(previous)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"datasets": {"x": "s3://KEY:SECRET@bucket"}}, "never in a policy"),
        ({"datasets": {"x": "relative/dir"}}, "absolute path"),
        ({"datasets": {"../x": "/tmp"}}, "not a valid dataset name"),
        ({"datasets": {"x": "/tmp:write"}}, "access must be 'read' or 'read-write'"),
        ({"datasets": {"x": "/no/such/dir"}}, "not a directory"),
        ({"token_ttl": "forever"}, "expected a duration"),
        ({"token_ttl": 0}, "between 1 second and 30 days"),
    ],
)
def test_policy_rejects_bad_datasets_and_ttls(value, message) -> None:
    with pytest.raises(PolicyError, match=message):
        SandboxPolicy.from_mapping(value)


def test_policy_datasets_forms(dataset: Path) -> None:
    policy = SandboxPolicy.from_mapping(
        {
            "datasets": {"sales": f"{dataset}:read-write", "s3": {"source": "s3://b/p"}},
            "token_ttl": "15m",
        }
    )
    granted = [(d.name, d.access) for d in policy.datasets]
    assert granted == [("sales", "read-write"), ("s3", "read")]
    assert policy.token_ttl == 900
    assert policy.to_dict()["datasets"]["s3"] == "s3://b/p:read"
    cli_form = SandboxPolicy.from_mapping({"datasets": [f"sales={dataset}"]})
    assert cli_form.datasets[0].access == "read"


def test_install_dataset_flag_writes_the_datasets_into_the_kernelspec(
    tmp_path: Path, dataset: Path
) -> None:
    prefix = tmp_path / "prefix"
    assert (
        cli_main(
            [
                "install",
                "--prefix",
                str(prefix),
                "--dataset",
                f"sales={dataset}",
                "--dataset",
                f"scratch={tmp_path}:read-write",
            ]
        )
        == 0
    )
    spec = json.loads((prefix / "share/jupyter/kernels/python3-sandbox/kernel.json").read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["datasets"] == {"sales": f"{dataset}:read", "scratch": f"{tmp_path}:read-write"}
    assert cli_main(["install", "--prefix", str(prefix), "--dataset", "x=relative:read"]) == 2


def test_a_new_broker_honours_the_records_of_the_last_one(
    tmp_path: Path, state: Path, dataset: Path
) -> None:
    k = Kernel(tmp_path / "rt", "kernel-r")
    first = DataBroker(TokenStore(state / "tokens.sqlite"), AuditLog(state / "audit.jsonl"))
    first.grant(k.id, k.shared, {"sales": Grant(str(dataset), "read")}, ttl=3600)
    assert k.client().ls("sales")
    first._run(first._unlisten(k.id))  # the broker goes away without revoking (a crash)
    first.close()
    second = DataBroker(TokenStore(state / "tokens.sqlite"), AuditLog(state / "audit.jsonl"))
    try:
        second.serve(k.id, k.shared)
        assert k.client().ls("sales")  # the token minted by the first broker
        second.revoke(k.id, "test")
    finally:
        second.close()
    third = DataBroker(TokenStore(state / "tokens.sqlite"), AuditLog(state / "audit.jsonl"))
    try:
        third.serve(k.id, k.shared)
        with pytest.raises(data.TokenRevoked):
            k.client().ls("sales")
    finally:
        third.close()


# -- dataset roots pinned at grant time (issue 14, item 1) -------------------------------------


def _fds_on(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return count


@pytest.fixture
def swap_scene(tmp_path: Path) -> dict[str, Path]:
    """A dataset two levels down a folder a kernel could write, and a host folder to aim at."""
    writable = tmp_path / "ws"
    dataset = writable / "proj" / "sales"
    dataset.mkdir(parents=True)
    (dataset / "a.csv").write_text("original\n")
    bait = tmp_path / "host"
    (bait / "sales").mkdir(parents=True)
    (bait / "sales" / "a.csv").write_text("host a\n")
    (bait / "sales" / "secret.txt").write_text("host secret\n")
    return {"writable": writable, "dataset": dataset, "bait": bait}


def _swap(scene: dict[str, Path], which: str) -> Path:
    """Rename the dataset (or its parent) away and put a link to the host folder in its
    place, as a kernel with write access to the folder could; return where the original is."""
    moved = scene["writable"] / "moved"
    if which == "root":
        os.rename(scene["dataset"], moved)
        os.symlink(scene["bait"] / "sales", scene["dataset"])
        return moved
    os.rename(scene["dataset"].parent, moved)
    os.symlink(scene["bait"], scene["dataset"].parent)
    return moved / "sales"


@pytest.mark.parametrize("which", ["root", "parent"])
def test_a_root_swapped_for_a_link_after_the_grant_is_never_followed(
    tmp_path: Path, broker: DataBroker, state: Path, swap_scene: dict[str, Path], which: str
) -> None:
    k = Kernel(tmp_path / "rt", "kernel-swap")
    grant = Grant(str(swap_scene["dataset"]), "read-write")
    broker.grant(k.id, k.shared, {"ds": grant}, ttl=60)
    client = k.client()
    assert client.read_bytes("ds/a.csv") == b"original\n"
    deadline = time.monotonic() + 5  # its audit entry is written after the reply: before the
    while not any(e["op"] == "read" for e in audit(state)) and time.monotonic() < deadline:
        time.sleep(0.02)  # swap, or it may land among the entries checked below
    original = _swap(swap_scene, which)
    bait = swap_scene["bait"] / "sales"
    assert client.ls("ds") == ["ds/a.csv"]  # the original directory, not the host folder
    assert client.info("ds/a.csv")["size"] == len("original\n")
    with pytest.raises(data.DataNotFound):
        client.info("ds/secret.txt")
    assert client.read_bytes("ds/a.csv") == b"original\n"
    with pytest.raises(data.DataNotFound):
        client.read_bytes("ds/secret.txt")
    with client.open("ds/a.csv", "w") as f:
        f.write("written after the swap\n")
    assert (original / "a.csv").read_text() == "written after the swap\n"
    assert (bait / "a.csv").read_text() == "host a\n"
    assert sorted(p.name for p in bait.iterdir()) == ["a.csv", "secret.txt"]
    deadline = time.monotonic() + 5  # the broker audits a write after its last reply
    while not any(e["op"] == "write" for e in audit(state)) and time.monotonic() < deadline:
        time.sleep(0.02)
    entries = [e for e in audit(state) if e["kernel_id"] == k.id]
    after = entries[entries.index(next(e for e in entries if e["op"] == "list")) :]
    assert {e["op"] for e in after} == {"list", "stat", "read", "write"}
    for e in after:  # honest: what was served came from the moved original, and says so
        if "secret" in e["path"]:
            assert (e["decision"], e["reason"]) == ("deny", "not-found"), e
        else:
            assert (e["decision"], e.get("root")) == ("allow", "moved"), e
    # the original directory deleted: refused with a clear reason, never the link's target
    for path in original.iterdir():
        path.unlink()
    original.rmdir()
    with pytest.raises(data.DataError, match="removed from the host"):
        client.ls("ds")
    assert audit(state)[-1]["reason"] == "source-gone"


def test_a_root_that_is_a_link_at_grant_time_is_refused(
    tmp_path: Path, broker: DataBroker, swap_scene: dict[str, Path]
) -> None:
    _swap(swap_scene, "parent")
    k = Kernel(tmp_path / "rt", "kernel-link")
    with pytest.raises(PolicyError, match="without following a link"):
        broker.grant(k.id, k.shared, {"ds": Grant(str(swap_scene["dataset"]), "read")}, ttl=60)
    assert not (k.shared / contract.DATA_TOKEN).exists()


def test_an_adopting_broker_checks_the_root_it_reopens(
    tmp_path: Path, state: Path, swap_scene: dict[str, Path]
) -> None:
    k = Kernel(tmp_path / "rt", "kernel-adopt")
    first = DataBroker(TokenStore(state / "tokens.sqlite"), AuditLog(state / "audit.jsonl"))
    first.grant(k.id, k.shared, {"ds": Grant(str(swap_scene["dataset"]), "read")}, ttl=3600)
    first._run(first._unlisten(k.id))  # the owner goes away without revoking
    first.close()
    _swap(swap_scene, "root")
    second = DataBroker(TokenStore(state / "tokens.sqlite"), AuditLog(state / "audit.jsonl"))
    try:
        second.serve(k.id, k.shared)
        with pytest.raises(data.DataError, match="no longer where it was granted"):
            k.client().read_bytes("ds/secret.txt")
        assert audit(state)[-1]["reason"] == "source-moved"
        os.unlink(swap_scene["dataset"])
        swap_scene["dataset"].mkdir()  # a new directory by the old name: not the one granted
        with pytest.raises(data.DataError, match="replaced since it was granted"):
            k.client().ls("ds")
        os.rmdir(swap_scene["dataset"])
        os.rename(swap_scene["writable"] / "moved", swap_scene["dataset"])  # put back
        assert k.client().ls("ds") == ["ds/a.csv"]
    finally:
        second.close()


def test_roots_are_closed_on_revoke_release_and_close(
    tmp_path: Path, broker: DataBroker, dataset: Path
) -> None:
    k = Kernel(tmp_path / "rt", "kernel-fds")
    other = Kernel(tmp_path / "rt", "kernel-other")
    scope = {"sales": Grant(str(dataset), "read"), "again": Grant(str(dataset), "read")}
    broker.grant(k.id, k.shared, scope, ttl=60)
    assert k.client().ls("sales")
    assert _fds_on(dataset) == 2  # one handle per kernel and dataset, none per request
    broker.revoke(k.id, "kernel restarted")
    assert _fds_on(dataset) == 0
    broker.grant(k.id, k.shared, scope, ttl=60)
    broker.grant(other.id, other.shared, {"sales": Grant(str(dataset), "read")}, ttl=60)
    assert k.client().ls("again") and other.client().ls("sales")
    assert _fds_on(dataset) == 3
    broker.release(k.id)
    assert _fds_on(dataset) == 1  # the other kernel's own handle stays
    assert other.client().ls("sales")
    broker.close()
    assert _fds_on(dataset) == 0


def _kernel_writable_check(policy: dict, workspace: Path | None, runtime_root: Path) -> None:
    from kernel_sandbox.provisioner.container import check_datasets_not_writable

    resolved = SandboxPolicy.from_mapping(policy)
    check_datasets_not_writable(
        resolved, str(workspace) if workspace else None, str(runtime_root), "test-spec"
    )


def test_a_dataset_in_a_folder_the_kernel_can_write_is_refused(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "proj" / "sales").mkdir(parents=True)
    mount = tmp_path / "rwmount"
    (mount / "data").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(ws, tmp_path / "ws-link")  # a link on the host into the writable folder
    rt = tmp_path / "rt"
    inside_ws = {"datasets": {"s": str(ws / "proj" / "sales")}, "workspace": "rw"}
    with pytest.raises(PolicyError, match=r"dataset 's' .* lies inside .*ws, which the kernel"):
        _kernel_writable_check(inside_ws, ws, rt)
    via_link = {"datasets": {"s": str(tmp_path / "ws-link" / "proj")}, "workspace": "rw"}
    with pytest.raises(PolicyError, match="its read-write workspace"):
        _kernel_writable_check(via_link, ws, rt)
    in_mount = {"datasets": {"d": str(mount / "data")}, "mounts": [f"{mount}:/mnt/m:rw"]}
    with pytest.raises(PolicyError, match="a read-write mount"):
        _kernel_writable_check(in_mount, None, rt)
    # fine: the workspace read-only, the mount read-only, the dataset elsewhere, the dataset
    # IS the writable folder (its mount point cannot be renamed) or contains it
    _kernel_writable_check({**inside_ws, "workspace": "ro"}, ws, rt)
    _kernel_writable_check({**in_mount, "mounts": [f"{mount}:/mnt/m:ro"]}, None, rt)
    _kernel_writable_check({"datasets": {"e": str(elsewhere)}, "workspace": "rw"}, ws, rt)
    _kernel_writable_check({"datasets": {"w": str(ws)}, "workspace": "rw"}, ws, rt)
    _kernel_writable_check({"datasets": {"t": str(tmp_path)}, "workspace": "rw"}, ws, rt)

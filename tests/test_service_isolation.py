"""The sandbox service keeps its callers apart (issue 15): real accounts, real kernels.

User A (kstalice) and user B (kstbob), neither in the docker group, start kernels through one
service. A works through a Jupyter Server of her own; A cannot see, stop, signal or connect to
B's kernels, cannot mount B's home (or a folder she could not read, or write for ``rw``), not
even by swapping a symbolic link after opening, and cannot reach B's host-side sockets
(lifeline, data broker, egress proxy) although their paths are no secret.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support import service as svc
from support.servers import Server, execute, free_port

pytestmark = pytest.mark.integration

A, B = "kstalice", "kstbob"
REPO = Path(__file__).resolve().parents[1]
SPEC = json.loads((REPO / "kernelspecs" / "python3-sandbox" / "kernel.json").read_text())

# Run as B: start a kernel with jupyter_client, print its id and connection info, keep it
# until a line arrives on stdin.
HOLD_KERNEL = """
import json, sys
import jupyter_client
km = jupyter_client.KernelManager(kernel_name="python3-sandbox")
km.start_kernel(cwd={cwd!r})
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=90)
info = dict(km.get_connection_info())
info["key"] = info["key"].decode() if isinstance(info["key"], bytes) else info["key"]
print(json.dumps({{"kernel_id": km.kernel_id, "connection_info": info}}), flush=True)
sys.stdin.readline()
kc.stop_channels()
km.shutdown_kernel(now=True)
"""

# Run as A: one request to the service, with the descriptors FDS opens; print the reply.
ASK = """
import json, os, sys
from kernel_sandbox.service.protocol import call
from kernel_sandbox.errors import SandboxError
fds = [{opens}]
try:
    reply = call({socket!r}, {request!r}, fds)
    print(json.dumps({{"ok": True, "reply": reply}}))
except SandboxError as exc:
    print(json.dumps({{"ok": False, "type": type(exc).__name__, "message": str(exc)}}))
"""

# Run as A: run CODE in a kernel whose connection info is INFO (as A's client would).
RUN_IN = """
import json
from jupyter_client import BlockingKernelClient
kc = BlockingKernelClient()
kc.load_connection_info({info!r})
kc.start_channels(); kc.wait_for_ready(timeout=90)
out = []
def hook(m):
    if m["msg_type"] == "stream":
        out.append(m["content"]["text"])
kc.execute_interactive({code!r}, timeout=60, output_hook=hook)
kc.stop_channels()
print(json.dumps("".join(out)))
"""


def popen_as(
    users: svc.TestUsers, user: str, code: str, env: dict[str, str], log: Any = subprocess.PIPE
) -> subprocess.Popen:
    """``users.run_as`` in the background: stdin and stdout are pipes (stderr: ``log``)."""
    return users.popen_as(user, code, env=env, stderr=log)


def ask_as(
    users: svc.TestUsers, user: str, service: svc.ServiceProcess, request: dict, opens: str = ""
) -> dict:
    """Send ``request`` to the service as ``user`` (``opens``: Python expressions, run as that
    user, giving the descriptors to pass); the decoded outcome."""
    code = ASK.format(opens=opens, socket=service.socket, request=request)
    result = users.run_as(user, code, env={"KERNEL_SANDBOX_SERVICE": service.socket})
    return json.loads(result.stdout.strip().splitlines()[-1])


def cleanup_if_started(users, user: str, service, outcome: dict, kernel_id: str) -> None:
    """End a kernel a (wrongly) accepted start made, so a failing test leaves nothing."""
    if outcome.get("ok"):
        ask_as(users, user, service, {"op": "cleanup", "kernel_id": kernel_id})


def start_request(kernel_id: str, cwd: str = "", **config: Any) -> dict:
    spec = {k: SPEC[k] for k in ("argv", "display_name", "language")}
    return {
        "op": "start",
        "kernel_id": kernel_id,
        "kernelspec": {"name": "python3-sandbox", **spec},
        "config": config,
        "cwd": cwd,
        "folders": [{"for": "workspace"}] if cwd else [],
    }


def run_in(users: svc.TestUsers, user: str, info: dict, code: str) -> str:
    result = users.run_as(user, RUN_IN.format(info=info, code=code))
    return json.loads(result.stdout.strip().splitlines()[-1])


def home(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


def connect_unix(users: svc.TestUsers, user: str, paths: list[str]) -> dict[str, str]:
    """What a raw unix connect to each of ``paths`` gives ``user``: 'connected' or the errno
    name."""
    code = (
        "import errno, json, socket, sys\n"
        "out = {}\n"
        f"for p in {paths!r}:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n"
        "        s.connect(p); out[p] = 'connected'\n"
        "    except OSError as e:\n"
        "        out[p] = errno.errorcode.get(e.errno, str(e))\n"
        "    s.close()\n"
        "print(json.dumps(out))\n"
    )
    return json.loads(users.run_as(user, code).stdout.strip().splitlines()[-1])


def record_of(service: svc.ServiceProcess, kernel_id: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in service.records():
            if record["kernel_id"] == kernel_id:
                return record
        time.sleep(0.1)
    raise AssertionError(f"no record of kernel {kernel_id} in {service.base}/state")


# -- B's kernel, shared by the tests of this module -------------------------------------------


@pytest.fixture(scope="module")
def env(sandbox_service: svc.ServiceProcess) -> dict[str, str]:
    return {"KERNEL_SANDBOX_SERVICE": sandbox_service.socket}


@pytest.fixture(scope="module")
def secrets_of_b(test_users: svc.TestUsers) -> Iterator[Path]:
    """A file in B's home (0700) and a working folder there."""
    work = home(B) / "work"
    work.mkdir(exist_ok=True)
    secret = home(B) / "secret-of-bob.txt"
    secret.write_text("bob's secret\n")
    for path in (work, secret):
        shutil.chown(path, B, B)
    secret.chmod(0o600)
    yield secret
    secret.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def b_kernel(test_users, sandbox_service, env, secrets_of_b) -> Iterator[dict]:
    """B's running kernel: its id, connection info and service record (as root sees it)."""
    process = popen_as(test_users, B, HOLD_KERNEL.format(cwd=str(home(B) / "work")), env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"B's kernel did not start: {process.stderr.read()[-3000:]}")
        kernel = json.loads(line)
        kernel["record"] = record_of(sandbox_service, kernel["kernel_id"])
        kernel["process"] = process
        yield kernel
    finally:
        try:
            process.communicate("done\n", timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def runtime_dir(kernel: dict) -> Path:
    """B's runtime directory, from the service's record (root's view)."""
    info = kernel["record"]["provisioner_info"]
    path = info.get("runtime_dir") or str(Path(kernel["connection_info"]["ip"]).parents[1])
    return Path(path)


# -- 2. A cannot see, stop, signal or connect to B's kernels ----------------------------------


def test_a_cannot_see_or_act_on_bs_kernel(test_users, sandbox_service, b_kernel):
    kernel_id = b_kernel["kernel_id"]
    listed = ask_as(test_users, A, sandbox_service, {"op": "list"})
    assert listed["ok"], listed
    assert kernel_id not in {k["kernel_id"] for k in listed["reply"]["kernels"]}
    for request in (
        {"op": "poll", "kernel_id": kernel_id},
        {"op": "signal", "kernel_id": kernel_id, "signum": 9},
        {"op": "stop", "kernel_id": kernel_id},
        {"op": "cleanup", "kernel_id": kernel_id},
        {"op": "adopt", "kernel_id": kernel_id},
        start_request(kernel_id),  # "restart" B's kernel under A's name
    ):
        outcome = ask_as(test_users, A, sandbox_service, request)
        assert not outcome["ok"], (request["op"], outcome)
        # NoSuchKernel on the service's side: the same answer as for an id nobody has
        assert kernel_id in outcome["message"], (request["op"], outcome)
        assert any(
            words in outcome["message"] for words in ("no kernel", "no running kernel", "taken")
        ), (request["op"], outcome)
    # B's kernel is untouched: still listed for B, still answering
    mine = ask_as(test_users, B, sandbox_service, {"op": "list"})
    assert kernel_id in {k["kernel_id"] for k in mine["reply"]["kernels"]}
    polled = ask_as(test_users, B, sandbox_service, {"op": "poll", "kernel_id": kernel_id})
    assert polled["reply"]["exit_code"] is None
    assert run_in(test_users, B, b_kernel["connection_info"], "print(6 * 7)") == "42\n"


def test_a_cannot_connect_to_bs_kernel_sockets(test_users, sandbox_service, b_kernel):
    info = b_kernel["connection_info"]
    rundir = runtime_dir(b_kernel)
    channels = ["shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"]
    client = [f"{info['ip']}-{info[c]}" for c in channels]
    kernel_own = [str(rundir / "t" / "s" / f"k-{info[c]}") for c in channels]
    relay = [str(p) for p in (rundir / "t").glob("r-*")]
    assert client and relay, sorted(os.listdir(rundir / "t"))
    paths = client + kernel_own + relay
    as_a = connect_unix(test_users, A, paths)
    assert all(v == "EACCES" for v in as_a.values()), as_a
    as_b = connect_unix(test_users, B, client)
    assert all(v == "connected" for v in as_b.values()), as_b
    # with ZeroMQ, as a client would: B's kernel never answers A
    code = (
        "import json, zmq\n"
        "from jupyter_client.session import Session\n"
        f"info = {info!r}\n"
        "ctx = zmq.Context()\n"
        "s = ctx.socket(zmq.DEALER); s.linger = 0\n"
        "s.connect(f\"ipc://{info['ip']}-{info['shell_port']}\")\n"
        "session = Session(key=info['key'].encode())\n"
        "session.send(s, 'kernel_info_request', {})\n"
        "print(json.dumps(bool(s.poll(3000))))\n"
    )
    answered = json.loads(test_users.run_as(A, code).stdout.strip().splitlines()[-1])
    assert answered is False
    answered_b = json.loads(test_users.run_as(B, code).stdout.strip().splitlines()[-1])
    assert answered_b is True  # the probe works: B's own client gets an answer


def test_a_cannot_reach_bs_host_sockets(test_users, sandbox_service, b_kernel):
    """The runtime directory's name is no secret (any user reads it in /proc/self/mountinfo
    while its tmpfs is mounted): the host-side sockets of B's kernel (lifeline, data broker,
    egress proxy) must be closed to A by their modes and directories alone."""
    rundir = runtime_dir(b_kernel)
    mountinfo = test_users.run_as(A, "print(open('/proc/self/mountinfo').read())").stdout
    host = rundir / "h"
    paths = [str(p) for p in host.iterdir() if p.is_socket()]
    paths += [str(p) for p in rundir.iterdir() if p.is_socket()]  # egress control, if any
    assert paths, sorted(os.listdir(host))
    as_a = connect_unix(test_users, A, paths)
    assert all(v == "EACCES" for v in as_a.values()), (
        as_a,
        f"runtime dir visible in mountinfo: {str(rundir) in mountinfo}",
    )
    files = [str(p) for p in host.iterdir() if p.is_file()]
    code = (
        "import errno, json\nout = {}\n"
        f"for p in {files!r}:\n"
        "    try:\n        open(p).read(); out[p] = 'read'\n"
        "    except OSError as e:\n        out[p] = errno.errorcode[e.errno]\n"
        "print(json.dumps(out))\n"
    )
    read = json.loads(test_users.run_as(A, code).stdout.strip().splitlines()[-1])
    assert all(v == "EACCES" for v in read.values()), read


def test_a_cannot_list_the_runtime_root_or_state(test_users, sandbox_service, b_kernel):
    rundir = runtime_dir(b_kernel)
    base = sandbox_service.base
    where = [sandbox_service.runtime_root, rundir, rundir / "t", base / "state", base / "log"]
    code = (
        "import errno, json, os\nout = {}\n"
        f"for p in {[str(p) for p in where]!r}:\n"
        "    try:\n        os.listdir(p); out[p] = 'listed'\n"
        "    except OSError as e:\n        out[p] = errno.errorcode[e.errno]\n"
        "print(json.dumps(out))\n"
    )
    listed = json.loads(test_users.run_as(A, code).stdout.strip().splitlines()[-1])
    assert all(v == "EACCES" for v in listed.values()), listed


# -- 3. A cannot mount B's home, nor any folder she could not read (or write, for rw) -------

LOOK = "import os; print(os.getuid(), os.getcwd(), flush=True); print(sorted(os.listdir('.')))"
# What the kernel has mounted where (the host path of a bind shows as its root in mountinfo).
MOUNTS = "print(open('/proc/self/mountinfo').read())"


def a_kernel_script(code: str, cwd: str) -> str:
    from test_service import kernel_script

    return kernel_script(code, cwd=cwd)


def run_kernel_as_a(users, env, cwd: str, code: str = LOOK) -> str:
    result = users.run_as(A, a_kernel_script(code, cwd), env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["output"]


def test_a_cannot_mount_bs_home_as_her_workspace(test_users, env, secrets_of_b, sandbox_service):
    """cwd = B's home (0700), or A's symbolic link to it: A's client cannot open it, so
    nothing is sent and nothing is mounted; the kernel starts in an empty place of its own."""
    link = home(A) / "to-bob"
    link.unlink(missing_ok=True)
    link.symlink_to(home(B))
    try:
        for cwd in (str(home(B)), str(link), str(home(B) / "work")):
            output = run_kernel_as_a(test_users, env, cwd, LOOK + "\n" + MOUNTS)
            assert f" {home(B)} " not in output and f"{home(B)}/" not in output, (cwd, output)
            assert secrets_of_b.name not in output, (cwd, output)
            assert output.split()[1] not in (str(home(B)), str(link)), output
            assert "bob's secret" not in output
    finally:
        link.unlink()


def test_a_cannot_send_an_o_path_descriptor_of_bs_home(test_users, sandbox_service, secrets_of_b):
    """O_PATH needs no right on the folder itself: the service must refuse such a handle."""
    request = start_request("iso-opath-" + secrets.token_hex(4), cwd=str(home(B)))
    opens = f"os.open({str(home(B))!r}, os.O_PATH | os.O_DIRECTORY)"
    outcome = ask_as(test_users, A, sandbox_service, request, opens=opens)
    cleanup_if_started(test_users, A, sandbox_service, outcome, request["kernel_id"])
    assert not outcome["ok"], outcome
    assert outcome["type"] == "PolicyError", outcome
    assert "O_PATH" in outcome["message"], outcome
    assert "O_RDONLY|O_DIRECTORY" in outcome["message"]
    # and the refused start left no kernel behind
    listed = ask_as(test_users, A, sandbox_service, {"op": "list"})
    assert request["kernel_id"] not in {k["kernel_id"] for k in listed["reply"]["kernels"]}


def test_a_cannot_mount_read_write_a_folder_she_may_only_read(
    test_users, sandbox_service, tmp_path_factory
):
    readable = test_users.base / "course-material"
    readable.mkdir(exist_ok=True)
    readable.chmod(0o755)  # root's: A reads it, cannot write it
    (readable / "lesson.txt").write_text("lesson 1\n")
    request = start_request("iso-rw-" + secrets.token_hex(4), cwd=str(readable), profile="analyst")
    opens = f"os.open({str(readable)!r}, os.O_RDONLY | os.O_DIRECTORY)"
    outcome = ask_as(test_users, A, sandbox_service, request, opens=opens)
    cleanup_if_started(test_users, A, sandbox_service, outcome, request["kernel_id"])
    assert not outcome["ok"], outcome
    assert outcome["type"] == "PolicyError", outcome
    assert "cannot write" in outcome["message"] and str(readable) in outcome["message"]
    assert "read-write" in outcome["message"], outcome


def test_what_is_mounted_is_what_was_opened(test_users, sandbox_service, secrets_of_b):
    """A opens her folder X, renames it away and puts a link to B's home at X's path, then
    sends the descriptor: the kernel sees X's content, never B's home."""
    kernel_id = "iso-swap-" + secrets.token_hex(4)
    x = home(A) / "x"
    moved = home(A) / "x-moved"
    for path in (x, moved):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    code = ASK_AND_RUN.format(
        socket=sandbox_service.socket,
        x=str(x),
        moved=str(moved),
        target=str(home(B)),
        request=start_request(kernel_id, cwd=str(x)),  # ro: any readable folder would do
        code=LOOK,
    )
    result = test_users.run_as(A, code, env={"KERNEL_SANDBOX_SERVICE": sandbox_service.socket})
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert "file-of-alice.txt" in output, output
    assert secrets_of_b.name not in output, output
    shutil.rmtree(moved)
    (home(A) / "x").unlink()


# Run as A: open X, swap it for a link to TARGET, start a kernel with the descriptor, run CODE
# in it (as A's client), clean it up; print the output.
ASK_AND_RUN = """
import json, os
from jupyter_client import BlockingKernelClient
from kernel_sandbox.service.protocol import call
os.makedirs({x!r})
open(os.path.join({x!r}, "file-of-alice.txt"), "w").write("alice")
fd = os.open({x!r}, os.O_RDONLY | os.O_DIRECTORY)
os.rename({x!r}, {moved!r})
os.symlink({target!r}, {x!r})
request = {request!r}
try:
    reply = call({socket!r}, request, [fd])
    os.close(fd)
    info = reply["connection_info"]
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels(); kc.wait_for_ready(timeout=90)
    out = []
    def hook(m):
        if m["msg_type"] == "stream":
            out.append(m["content"]["text"])
        elif m["msg_type"] == "error":
            out.append("ERROR " + m["content"]["ename"] + ": " + m["content"]["evalue"])
    kc.execute_interactive({code!r}, timeout=60, output_hook=hook)
    kc.stop_channels()
finally:
    call({socket!r}, {{"op": "cleanup", "kernel_id": request["kernel_id"]}})
print(json.dumps("".join(out)))
"""


# -- 1. A's own Jupyter Server, with no engine access, runs sandboxed kernels ---------------


@contextmanager
def server_as(test_users, user: str, env: dict, root: Path, *extra: str) -> Iterator[Server]:
    """A Jupyter Server run by ``user`` (with ``extra`` flags); stopped whatever happens."""
    port, token = free_port(), secrets.token_hex(16)
    argv = [
        "jupyter-server",
        "--no-browser",
        f"--ServerApp.port={port}",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        *extra,
    ]
    code = (
        f"import sys\nsys.argv = {argv!r}\n"
        "from jupyter_server.serverapp import main\nsys.exit(main())\n"
    )
    log_path = test_users.base / f"server-{port}.log"
    log = open(log_path, "w")
    process = popen_as(test_users, user, code, env, log=log)
    server = Server(f"http://127.0.0.1:{port}", token, process)
    server.log_path = log_path  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.api("GET", "/api/status").ok:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{user}'s server did not start: {log_path.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield server
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        log.close()


def test_a_jupyter_server_of_a_user_without_engine_access(
    test_users, sandbox_service, env, docker_client
):
    notebooks = home(A) / "notebooks"
    notebooks.mkdir(exist_ok=True)
    shutil.chown(notebooks, A, A)
    with server_as(test_users, A, env, notebooks) as server:
        log_path = server.log_path
        # the server's user cannot reach the engine
        denied = test_users.run_as(
            A,
            "import socket\ns = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect('/var/run/docker.sock'); print('connected')\n"
            "except PermissionError:\n    print('denied')\n",
        )
        assert denied.stdout.strip() == "denied"
        # a kernel for a notebook at the top of her home (the server's cwd): the home as a
        # whole is never mounted, but the kernel starts (in its own home), as in direct mode
        created = server.api("POST", "/api/kernels", json={"name": "python3-sandbox"})
        assert created.status_code == 201, log_path.read_text()[-4000:]
        in_home = created.json()["id"]
        ws = server.channels(in_home)
        try:
            result = execute(ws, "import os; print(os.getcwd(), sorted(os.listdir('.')))")
        finally:
            ws.close()
        assert result["reply"]["status"] == "ok", result
        assert not result["stdout"].startswith(str(home(A))), result["stdout"]
        assert "notebooks" not in result["stdout"]
        assert server.api("DELETE", f"/api/kernels/{in_home}").status_code == 204
        # and one for a notebook in her folder: that folder is mounted
        created = server.api("POST", "/api/kernels", json={"name": "python3-sandbox", "path": ""})
        assert created.status_code == 201, log_path.read_text()[-4000:]
        kernel_id = created.json()["id"]
        try:
            ws = server.channels(kernel_id)
            try:
                result = execute(
                    ws,
                    "import os, socket; print(os.getuid(), socket.gethostname(), os.getcwd(),"
                    " os.path.exists('/var/run/docker.sock'))",
                )
            finally:
                ws.close()
            assert result["reply"]["status"] == "ok", result
            uid, hostname, cwd, engine = result["stdout"].split()
            assert int(uid) >= 2000000  # a pooled uid, not A's
            assert hostname == "sandbox"
            assert cwd == str(notebooks)  # her folder, sent by her server, mounted
            assert engine == "False"
            # the service runs it, for A, in a container of the engine's
            record = record_of(sandbox_service, kernel_id)
            assert record["uid"] == pwd.getpwnam(A).pw_uid
            container = docker_client.containers.get(record["provisioner_info"]["container_id"])
            assert container.status == "running"
            assert container.attrs["HostConfig"]["NetworkMode"] == "none"
            assert container.attrs["Config"]["User"].split(":")[0] == uid
        finally:
            deleted = server.api("DELETE", f"/api/kernels/{kernel_id}")
            assert deleted.status_code == 204, deleted.text
        deadline = time.monotonic() + 30
        while any(r["kernel_id"] == kernel_id for r in sandbox_service.records()):
            assert time.monotonic() < deadline, "the service kept the deleted kernel"
            time.sleep(0.2)


def test_a_locked_down_server_of_a_user_starts_every_kernel_through_the_service(
    test_users, sandbox_service, env
):
    """Lockdown (issue 13) on a shared machine: the user's server cannot reach the engine,
    checks that the service answers instead, maps a request for the host kernel `python3`
    to the sandboxed kernelspec, and starts it through the service."""
    notebooks = home(A) / "locked"
    notebooks.mkdir(exist_ok=True)
    shutil.chown(notebooks, A, A)
    with server_as(
        test_users,
        A,
        env,
        notebooks,
        "--ServerApp.jpserver_extensions={'kernel_sandbox.lockdown': True}",
        "--SandboxLockdown.terminals=off",  # terminals through the service: test_svcterm.py
    ) as server:
        log = server.log_path.read_text()  # type: ignore[attr-defined]
        assert "through the sandbox service" in log, log[-3000:]
        created = server.api("POST", "/api/kernels", json={"name": "python3", "path": ""})
        assert created.status_code == 201, created.text
        kernel = created.json()
        assert kernel["name"] == "python3-sandbox"
        ws = server.channels(kernel["id"])
        try:
            result = execute(ws, "import os, socket; print(os.getuid(), socket.gethostname())")
        finally:
            ws.close()
        uid, hostname = result["stdout"].split()
        assert int(uid) >= 2000000 and hostname == "sandbox", result
        assert record_of(sandbox_service, kernel["id"])["uid"] == pwd.getpwnam(A).pw_uid
        assert server.api("DELETE", f"/api/kernels/{kernel['id']}").status_code == 204


# -- 4. A cannot use B's data token ---------------------------------------------------------

# Run as a user: start a kernel through the service with REQUEST, print the reply, keep the
# kernel until a line arrives on stdin.
HOLD_START = """
import json, sys
from kernel_sandbox.service.protocol import call
request = {request!r}
reply = call({socket!r}, request)
print(json.dumps(reply), flush=True)
sys.stdin.readline()
call({socket!r}, {{"op": "cleanup", "kernel_id": request["kernel_id"]}})
"""

# Run as a user: start a kernel through the service with REQUEST, run CODE in it, clean up.
START_AND_RUN = """
import json
from jupyter_client import BlockingKernelClient
from kernel_sandbox.service.protocol import call
request = {request!r}
out = []
try:
    reply = call({socket!r}, request)
    kc = BlockingKernelClient()
    kc.load_connection_info(reply["connection_info"])
    kc.start_channels(); kc.wait_for_ready(timeout=90)
    def hook(m):
        if m["msg_type"] == "stream":
            out.append(m["content"]["text"])
        elif m["msg_type"] == "error":
            out.append("ERROR " + m["content"]["ename"] + ": " + m["content"]["evalue"])
    kc.execute_interactive({code!r}, timeout=60, output_hook=hook)
    kc.stop_channels()
finally:
    call({socket!r}, {{"op": "cleanup", "kernel_id": request["kernel_id"]}})
print(json.dumps("".join(out)))
"""


@pytest.fixture
def dataset_policy(test_users, sandbox_service) -> Iterator[str]:
    """A dataset ``demo`` every user's kernels may ask for."""
    data = test_users.base / "dataset-demo"
    data.mkdir(exist_ok=True)
    (data / "rows.csv").write_text("a,b\n1,2\n")
    sandbox_service.write_policy(
        f'[datasets]\ndemo = "{data}:read"\n\n[everyone]\ndatasets = ["demo"]\n'
    )
    try:
        yield "demo"
    finally:
        sandbox_service.write_policy("")


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_cannot_use_bs_data_token(test_users, sandbox_service, env, dataset_policy, runtime):
    b_id, a_id = "iso-data-b-" + secrets.token_hex(4), "iso-data-a-" + secrets.token_hex(4)
    hold = HOLD_START.format(
        socket=sandbox_service.socket,
        request=start_request(b_id, datasets=[dataset_policy], runtime=runtime),
    )
    process = popen_as(test_users, B, hold, env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read()[-3000:] if process.stderr else ""
        assert json.loads(line)["policy"]["runtime"] == runtime
        token_file = runtime_dir({"record": record_of(sandbox_service, b_id)}) / "h" / "data-token"
        b_token = token_file.read_text().strip()  # root reads it; A cannot:
        assert b_token
        read = test_users.run_as(
            A, f"try:\n    open({str(token_file)!r}).read()\nexcept OSError as e:\n    print(e)"
        )
        assert "Permission denied" in read.stdout, read.stdout
        data_sock = str(token_file.parent / "data.sock")
        assert connect_unix(test_users, A, [data_sock]) == {data_sock: "EACCES"}
        code = (
            "from kernel_sandbox.inside import data\n"
            "print('mine', data.ls(''))\n"
            "try:\n"
            f"    data.Client(token={b_token!r}).ls('')\n"
            "    print('B-TOKEN-ACCEPTED')\n"
            "except data.AccessDenied as exc:\n"
            "    print('refused', type(exc).__name__, exc)\n"
        )
        request = start_request(a_id, datasets=[dataset_policy], runtime=runtime)
        script = START_AND_RUN.format(socket=sandbox_service.socket, request=request, code=code)
        output = json.loads(test_users.run_as(A, script, env=env).stdout.strip().splitlines()[-1])
        assert "mine" in output and "demo" in output, output  # A's own token works
        assert "B-TOKEN-ACCEPTED" not in output, output
        assert "refused TokenInvalid" in output, output
    finally:
        try:
            process.communicate("done\n", timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


# -- 5. A cannot approve B's egress ----------------------------------------------------------

# Run as B: start a kernel through the service, make it ask for an unlisted target (through
# its egress proxy, which then waits for a person), report; on a line on stdin, print what the
# request got and clean up.
EGRESS_WAIT = """
import json, sys
from jupyter_client import BlockingKernelClient
from kernel_sandbox.service.protocol import call
request = {request!r}
reply = call({socket!r}, request)
kc = BlockingKernelClient()
kc.load_connection_info(reply["connection_info"])
kc.start_channels(); kc.wait_for_ready(timeout=90)
msg_id = kc.execute({code!r})
print(json.dumps("asked"), flush=True)
sys.stdin.readline()
out = []
while True:
    m = kc.get_iopub_msg(timeout=90)
    if m["parent_header"].get("msg_id") != msg_id:
        continue
    if m["msg_type"] == "stream":
        out.append(m["content"]["text"])
    if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
        break
kc.stop_channels()
call({socket!r}, {{"op": "cleanup", "kernel_id": request["kernel_id"]}})
print(json.dumps("".join(out)))
"""


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback listener of ours: the only place an approved request could go."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.fixture
def egress_kernel_of_b(test_users, sandbox_service, env, listener) -> Iterator[dict]:
    """B's kernel, egress_mode ask, with a request to localhost:<listener> waiting."""
    from kernel_sandbox.egress.control import EgressControl

    sandbox_service.write_policy('[everyone]\negress = ["allowed.test"]\n')
    kernel_id = "iso-egress-b-" + secrets.token_hex(4)
    target = f"localhost:{listener}"  # resolved, if ever approved, to loopback: never out
    code = (  # to the proxy by hand: urllib would bypass it for 127.0.0.1 (no_proxy)
        "import http.client\n"
        "c = http.client.HTTPConnection('127.0.0.1', 3128, timeout=90)\n"
        f"c.request('GET', 'http://{target}/')\n"
        "r = c.getresponse()\n"
        "print('GOT THROUGH' if r.status < 400 else 'refused', r.status, r.read()[:200])\n"
    )
    request = start_request(
        kernel_id,
        network="allowlist",
        egress=["allowed.test"],
        egress_mode="ask",
        egress_ask_timeout=90,
    )
    script = EGRESS_WAIT.format(socket=sandbox_service.socket, request=request, code=code)
    process = popen_as(test_users, B, script, env)
    control = EgressControl(sandbox_service.runtime_root)  # root's view
    try:
        assert process.stdout is not None
        assert process.stdout.readline(), process.stderr.read()[-3000:] if process.stderr else ""
        deadline = time.monotonic() + 30
        while not any(p.target == target for p in control.pending(kernel_id)):
            if time.monotonic() > deadline:
                out, err = process.communicate("done\n", timeout=120)
                log = sandbox_service.log_path.read_text()[-3000:]
                raise AssertionError(f"B's request never waited: {out}\n{err[-2000:]}\n{log}")
            time.sleep(0.2)
        yield {"kernel_id": kernel_id, "target": target, "process": process, "control": control}
    finally:
        try:
            if process.poll() is None:
                control.deny(kernel_id, target)
            process.communicate("done\n", timeout=60)
        except Exception:
            process.kill()
            process.communicate()
        sandbox_service.write_policy("")


def test_a_cannot_approve_bs_egress_through_the_proxy(
    test_users, sandbox_service, egress_kernel_of_b
):
    """The per-kernel egress control socket, in the service's runtime directory, is root's
    alone: A's `kernel-sandbox egress approve` finds nothing, a direct connect is refused,
    and B's request still waits (then B's person denies it, and the kernel is told)."""
    kernel_id, target = egress_kernel_of_b["kernel_id"], egress_kernel_of_b["target"]
    control_sock = runtime_dir({"record": record_of(sandbox_service, kernel_id)}) / "egress-control"
    info = control_sock.lstat()
    assert info.st_uid == 0 and info.st_mode & 0o777 == 0o600, oct(info.st_mode)
    assert connect_unix(test_users, A, [str(control_sock)]) == {str(control_sock): "EACCES"}
    approve = test_users.run_as(
        A,
        "import sys\nfrom kernel_sandbox.cli import main\n"
        "sys.argv = ['kernel-sandbox', 'egress', 'approve', "
        f"{kernel_id!r}, {target!r}, '--runtime-root', {sandbox_service.runtime_root!r}]\n"
        "sys.exit(main())\n",
        check=False,
    )
    assert approve.returncode != 0, approve.stdout + approve.stderr
    code = (
        "from kernel_sandbox.egress.control import EgressControl, _ask\n"
        f"c = EgressControl({sandbox_service.runtime_root!r})\n"
        "try:\n"
        f"    _ask(__import__('pathlib').Path({str(control_sock)!r}),"
        f" {{'op': 'approve', 'target': {target!r}, 'always': True}})\n"
        "    print('APPROVED')\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
    )
    direct = test_users.run_as(A, code)
    assert "APPROVED" not in direct.stdout and "Permission denied" in direct.stdout
    control = egress_kernel_of_b["control"]
    assert [p.target for p in control.pending(kernel_id)] == [target]  # still waiting
    assert control.deny(kernel_id, target) == 1
    process = egress_kernel_of_b["process"]
    out, err = process.communicate("done\n", timeout=90)
    told = json.loads(out.strip().splitlines()[-1])
    assert "refused" in told and "GOT THROUGH" not in told, (told, err[-2000:])


def test_a_cannot_decide_bs_egress_through_the_service(
    test_users, sandbox_service, egress_kernel_of_b
):
    """The service's egress_pending / egress_decide (per-caller views): A sees nothing of B's
    and cannot approve it."""
    kernel_id, target = egress_kernel_of_b["kernel_id"], egress_kernel_of_b["target"]
    pending = ask_as(test_users, A, sandbox_service, {"op": "egress_pending"})
    assert pending["ok"], pending
    assert kernel_id not in json.dumps(pending["reply"]), pending
    decided = ask_as(
        test_users,
        A,
        sandbox_service,
        {"op": "egress_decide", "kernel_id": kernel_id, "target": target, "decision": "approve"},
    )
    assert not decided["ok"], decided
    control = egress_kernel_of_b["control"]
    assert [p.target for p in control.pending(kernel_id)] == [target]  # still waiting

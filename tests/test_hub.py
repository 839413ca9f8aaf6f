"""A class on a real JupyterHub (one hub for all of tests/test_hub*.py, built by
support.hub from docs/examples/jupyterhub/): twenty students at once, what a student's kernel
can reach, what a student's own kernelspec or config can change, and bombs next to a
neighbour. The students' servers run as the students (PAM accounts, no docker group); their
kernels start through the class's own sandbox service, under the operator's policy file.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import pytest
from support import REPO
from support.hub import EXPECTED, GRADEBOOK_SECRET, INSTRUCTOR, STUDENTS, Classroom
from support.hub_run import kernel_memory, run_notebook, server_memory
from support.lockdown import terminal_run
from support.servers import Server, execute

pytestmark = pytest.mark.integration

MB = 1024 * 1024
ARTIFACTS = REPO / "artifacts"


def start_kernel(server: Server, name: str = "course-101") -> str:
    made = server.api("POST", "/api/kernels", json={"name": name})
    assert made.status_code == 201, made.text[:2000]
    return str(made.json()["id"])


def run(server: Server, kernel_id: str, code: str, timeout: float = 120) -> dict:
    ws = server.channels(kernel_id)
    try:
        return execute(ws, code, timeout=timeout)
    finally:
        ws.close()


def stop_kernel(server: Server, kernel_id: str) -> None:
    server.api("DELETE", f"/api/kernels/{kernel_id}")


def as_student(room: Classroom, name: str, path: Path, text: str) -> None:
    """Write ``text`` at ``path`` as the student would (their file, their folders)."""
    account = pwd.getpwnam(name)
    home = Path(account.pw_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    for part in [path, *path.parents]:
        if part == home:
            break
        os.chown(part, account.pw_uid, account.pw_gid)


# -- twenty students at once ----------------------------------------------------------------


@pytest.mark.timeout(900)  # 20 servers on two cores; about 2 minutes on a quiet machine
def test_twenty_students_run_the_course_notebook_at_once(classroom: Classroom) -> None:
    """Each student logs in through the login form (PAM), gets a token, starts their server
    and runs the course notebook, all at once: every cell of every notebook succeeds, the
    answer is written into the student's own folder as the student."""
    figures: dict[str, dict[str, float]] = {}
    barrier = threading.Barrier(len(STUDENTS))

    def one(name: str) -> None:
        barrier.wait()
        t0 = time.monotonic()
        session = classroom.login(name)
        classroom.user_token(name, session)
        t1 = time.monotonic()
        server = classroom.start_server(name)
        t2 = time.monotonic()
        memory: dict[str, int] = {}
        result = run_notebook(
            server,
            "work/week1.ipynb",
            before_close=lambda kid: memory.update(kernel=kernel_memory(kid)),
        )
        t3 = time.monotonic()
        assert result.statuses == ["ok"] * len(EXPECTED), (name, result)
        for out, expected in zip(result.outputs, EXPECTED, strict=True):
            assert expected in out, (name, result.outputs)
        figures[name] = {
            "login_s": t1 - t0,
            "server_start_s": t2 - t1,
            "notebook_s": t3 - t2,
            "total_s": t3 - t0,
            "server_rss_mb": server_memory(name) / MB,
            "kernel_mb": memory["kernel"] / MB,
        }

    wall = time.monotonic()
    with ThreadPoolExecutor(len(STUDENTS)) as pool:
        for future in [pool.submit(one, name) for name in STUDENTS]:
            future.result()
    wall = time.monotonic() - wall

    for name in STUDENTS:  # the kernel wrote as the student, in the student's folder
        answer = classroom.home(name) / "work" / "answer.txt"
        assert answer.read_text() == "55"
        assert answer.stat().st_uid == pwd.getpwnam(name).pw_uid
        saved = json.loads((classroom.home(name) / "work" / "week1.ipynb").read_text())
        assert "total 55" in json.dumps(saved["cells"][2]["outputs"])  # after a markdown cell

    lines = [f"{len(STUDENTS)} students at once: wall {wall:.1f} s"]
    lines.append(f"{'student':9} {'login':>6} {'server':>7} {'notebook':>9} {'total':>6} "
                 f"{'server RSS':>11} {'kernel':>7}")  # fmt: skip
    for name in STUDENTS:
        f = figures[name]
        lines.append(
            f"{name:9} {f['login_s']:6.1f} {f['server_start_s']:7.1f} {f['notebook_s']:9.1f} "
            f"{f['total_s']:6.1f} {f['server_rss_mb']:9.0f}MB {f['kernel_mb']:5.0f}MB"
        )
    for key in ("server_start_s", "notebook_s", "total_s", "server_rss_mb", "kernel_mb"):
        values = sorted(figures[n][key] for n in STUDENTS)
        lines.append(f"{key}: median {values[len(values) // 2]:.1f}, max {values[-1]:.1f}")
    print("\n" + "\n".join(lines))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "hub-class.txt").write_text("\n".join(lines) + "\n")


# -- what a student's kernel reaches ---------------------------------------------------------

PROBE = """
import json, os, socket
def probe(path, write=False):
    try:
        if write:
            open(path, "w").write("x")
            return "written"
        if os.path.isdir(path):
            os.listdir(path)
            return "listed"
        open(path).read(1)
        return "read"
    except OSError as exc:
        return type(exc).__name__
def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__
found = {
    "own": probe(os.path.join(os.getcwd(), "private.txt")),
    "course": probe("/srv/course/week1.csv"),
    "course_write": probe("/srv/course/planted.txt", write=True),
    "other_student": probe(%(other)r),
    "other_student_dir": probe(%(other_dir)r),
    "gradebook": probe(%(gradebook)r),
    "instructor_home": probe(%(instructor_home)r),
    "engine": [p for p in %(sockets)r if os.path.exists(p)],
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "gateway": connect(%(gateway)r, %(port)d),
    "loopback": connect("127.0.0.1", %(port)d),
}
print("FOUND", json.dumps(found))
"""


def bridge_gateway() -> str:
    client = docker.from_env()
    try:
        config = client.api.inspect_network("bridge")["IPAM"]["Config"]
    finally:
        client.close()
    return str(config[0]["Gateway"])


class Listener:
    """A TCP listener on this machine (the bridge gateway and loopback) that counts
    connections: the only target the network probes may try."""

    def __init__(self, hosts: list[str]) -> None:
        self.port = 0
        self.sockets: list[socket.socket] = []
        self.accepted = 0
        for host in hosts:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, self.port))
            self.port = s.getsockname()[1]
            s.listen(8)
            s.settimeout(0.2)
            self.sockets.append(s)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            for s in self.sockets:
                try:
                    s.accept()[0].close()
                    self.accepted += 1
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for s in self.sockets:
            s.close()


def probe_values(room: Classroom, name: str, other: str, port: int, gateway: str) -> str:
    return PROBE % {
        "other": str(room.home(other) / "work" / "private.txt"),
        "other_dir": str(room.home(other) / "work"),
        "gradebook": str(room.home(INSTRUCTOR) / "course-source" / "gradebook.db"),
        "instructor_home": str(room.home(INSTRUCTOR)),
        "sockets": ["/var/run/docker.sock", "/run/docker.sock", room.service.socket,
                    "/run/containerd/containerd.sock", "/run/kernel-sandbox/service.sock"],
        "gateway": gateway,
        "port": port,
    }  # fmt: skip


def test_a_students_kernel_reaches_nothing_of_anyone_else(classroom: Classroom) -> None:
    """From inside a student's kernel: their own folder and the course material (read-only)
    are there; another student's folder, the instructor's gradebook, the engine's and the
    service's sockets and the network (a listener of this test on the bridge gateway and on
    loopback) are not."""
    name, other = STUDENTS[0], STUDENTS[1]
    server = classroom.start_server(name)
    gateway = bridge_gateway()
    listener = Listener([gateway, "127.0.0.1"])
    try:
        body = {"path": "work/probe.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        session = server.api("POST", "/api/sessions", json=body)
        assert session.status_code == 201, session.text
        kernel_id = session.json()["kernel"]["id"]
        try:
            result = run(server, kernel_id, probe_values(classroom, name, other, listener.port,
                                                         gateway))  # fmt: skip
        finally:
            server.api("DELETE", f"/api/sessions/{session.json()['id']}")
    finally:
        listener.close()
    assert result["reply"]["status"] == "ok", result
    found = json.loads(result["stdout"].split("FOUND ", 1)[1])
    print("\nfrom ksts01's kernel:", found)
    assert found["own"] == "read" and found["course"] == "read"  # the probe can succeed
    assert found["course_write"] in ("OSError", "PermissionError")  # read-only mount
    for key in ("other_student", "other_student_dir", "gradebook", "instructor_home"):
        assert found[key] in ("FileNotFoundError", "PermissionError"), (key, found)
    assert found["engine"] == []
    assert found["interfaces"] == ["lo"]
    assert found["gateway"] != "connected" and found["loopback"] != "connected"
    assert listener.accepted == 0
    assert not (classroom.course / "planted.txt").exists()
    assert GRADEBOOK_SECRET not in result["stdout"]


def test_a_students_terminal_reaches_nothing_of_anyone_else(classroom: Classroom) -> None:
    """The same from a student's terminal (a sandboxed shell, through the service)."""
    assert classroom.terminals_on(), (
        "the class example (docs/examples/jupyterhub/singleuser_config.py) must keep "
        'c.SandboxLockdown.terminals = "sandboxed": students get terminals, through the service'
    )
    name, other = STUDENTS[2], STUDENTS[3]
    server = classroom.start_server(name)
    made = server.api("POST", "/api/terminals")
    assert made.status_code == 200, made.text
    terminal = made.json()["name"]
    gateway = bridge_gateway()
    listener = Listener([gateway, "127.0.0.1"])
    try:
        other_file = classroom.home(other) / "work" / "private.txt"
        gradebook = classroom.home(INSTRUCTOR) / "course-source" / "gradebook.db"
        command = (
            f"cat {other_file} {gradebook} 2>/dev/null; echo R$?; "
            f"ls -d /var/run/docker.sock {classroom.service.socket} 2>/dev/null; echo S$?; "
            # interfaces from /proc/net/dev (gVisor has no /sys/class/net)
            "sed -n 's/^ *\\([^:]*\\):.*/\\1/p' /proc/net/dev | tr '\\n' ,; "
            f"(exec 3<>/dev/tcp/{gateway}/{listener.port}) 2>/dev/null; echo N$?; "
            f"(exec 3<>/dev/tcp/127.0.0.1/{listener.port}) 2>/dev/null; echo L$? END"
        )
        out = terminal_run(server, terminal, command, r"L\d+ END")
    finally:
        listener.close()
        server.api("DELETE", f"/api/terminals/{terminal}")
    assert "PRIVATE-" not in out and GRADEBOOK_SECRET not in out
    assert re.search(r"R[1-9]", out) and re.search(r"S[1-9]", out), out
    assert "lo," in out and "eth0" not in out, out
    assert re.search(r"N[1-9]", out) and re.search(r"L[1-9]\d* END", out), out
    assert listener.accepted == 0


# -- what a student's own kernelspec or config can change ------------------------------------

ASKS = {  # a kernelspec of the student's own, asking for more: refused, naming the rule
    "memory": ({"memory_limit": "8g"}, "memory_limit"),
    "pids": ({"pids_limit": 100000}, "pids_limit"),
    "cpu": ({"cpu_limit": 2}, "cpu_limit"),
    "never-idle": ({"idle_timeout": 0}, "idle_timeout"),
    "profile": ({"profile": "analyst"}, "profiles"),
    "egress": ({"network": "allowlist", "egress": ["*.example.test"]}, "egress"),
    "dataset": ({"datasets": ["grades"]}, "datasets"),
    "run-as-root": ({"user": "0:0"}, "decided by the sandbox service's operator"),
    "no-service": ({"service": "off"}, "docker"),
}


def kernelspec(config: dict) -> str:
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mine",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config}
        },
    }
    return json.dumps(spec)


def refused_start(server: Server, name: str) -> str:
    """Open a notebook on kernelspec ``name`` as JupyterLab does (the sessions API, which
    passes the reason on); the start must fail: its message."""
    body = {"path": f"work/{uuid.uuid4().hex[:8]}.ipynb", "type": "notebook",
            "kernel": {"name": name}}  # fmt: skip
    made = server.api("POST", "/api/sessions", json=body)
    if made.status_code == 201:
        server.api("DELETE", f"/api/sessions/{made.json()['id']}")
    assert made.status_code >= 400, (name, made.status_code, made.text[:600])
    return str(made.json().get("message"))


def test_a_students_own_kernelspecs_cannot_raise_the_limits(classroom: Classroom) -> None:
    """Kernelspecs a student installs in ~/.local/share/jupyter/kernels are listed (they are
    sandboxed) but each ask beyond the operator's policy is refused, naming the rule; and
    the per-student kernel count and memory total hold whatever kernelspecs they use."""
    name = STUDENTS[4]
    kernels = classroom.home(name) / ".local" / "share" / "jupyter" / "kernels"
    other = classroom.home(STUDENTS[3]) / "work"
    scratch = classroom.base / f"scratch-{name}"
    scratch.mkdir(exist_ok=True)
    os.chown(scratch, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
    asks = {
        **ASKS,  # and folders: another student's, the course material read-write
        "other-folder": ({"mounts": [f"{other}:/other:rw"]}, str(other)),
        "course-rw": ({"mounts": [f"{classroom.course}:/srv/course:rw"]}, "cannot write"),
        # a folder of theirs the policy does not name
        "scratch": (
            {"mounts": [f"{scratch}:/scratch:rw"]},
            "not at or under a folder they may mount",
        ),
    }
    for key, (config, _) in asks.items():
        as_student(classroom, name, kernels / f"mine-{key}" / "kernel.json", kernelspec(config))
    as_student(classroom, name, kernels / "mine-small" / "kernel.json",
               kernelspec({"memory_limit": "128m"}))  # fmt: skip
    server = classroom.start_server(name)
    listed = server.api("GET", "/api/kernelspecs").json()["kernelspecs"]
    assert {f"mine-{key}" for key in asks} <= set(listed)
    for key, (_, rule) in asks.items():
        made = refused_start(server, f"mine-{key}")
        print(f"\nmine-{key}: {made[:300]}")
        assert rule in made, (key, made[:600])
    # count and memory: 3 x 512m fill max_memory (1536m), then 128m kernels fill max_kernels
    started: list[str] = []
    try:
        started += [start_kernel(server) for _ in range(3)]
        refused = refused_start(server, "course-101")
        assert "max_memory" in refused, refused[:600]
        stop_kernel(server, started.pop())
        started += [start_kernel(server, "mine-small") for _ in range(2)]
        refused = refused_start(server, "mine-small")
        assert "max_kernels" in refused, refused[:600]
        limit = run(server, started[0], "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes')"
                    ".read())")  # fmt: skip
        assert limit["stdout"].strip() == str(512 * MB), limit
    finally:
        for kernel_id in started:
            stop_kernel(server, kernel_id)


STUDENT_CONFIG = """\
open({marker!r}, "w").write("the student's config ran in the server")
c.ServerApp.jpserver_extensions = {{"kernel_sandbox.lockdown": False}}
c.DockerSandboxProvisioner.memory_limit = "8g"
c.DockerSandboxProvisioner.service = "off"
c.SandboxLockdown.on_unsandboxed = "map"
c.SandboxLockdown.map_to = "python3-sandbox"
"""


def test_a_students_own_config_is_not_read(classroom: Classroom) -> None:
    """A Jupyter config file in the student's ~/.jupyter (Python the server would run), and a
    .pth file in their site-packages, are not read by their server: after a restart it is
    still locked down, its kernels sandboxed with the class's limits. (Run by the student's
    Python with the usual environment, the same files do run: the probe can fail.)"""
    name = STUDENTS[5]
    classroom.start_server(name)  # running before the files appear, restarted after
    home = classroom.home(name)
    marker, pth_marker = home / "config-ran", home / "pth-ran"
    as_student(classroom, name, home / ".jupyter" / "jupyter_server_config.py",
               STUDENT_CONFIG.format(marker=str(marker)))  # fmt: skip
    site = home / ".local" / "lib" / "python3.11" / "site-packages"
    pth = f"import pathlib; pathlib.Path({str(pth_marker)!r}).write_text('ran')\n"
    as_student(classroom, name, site / "zz-student.pth", pth)
    check = (
        "import site, sys, traitlets.config as tc\n"
        "loader = tc.PyFileConfigLoader('jupyter_server_config.py', path=sys.argv[1])\n"
        "loader.load_config()\n"
    )
    classroom.users.run_as(name, check.replace("sys.argv[1]", repr(str(home / ".jupyter"))))
    assert marker.exists() and pth_marker.exists()  # both run when read
    marker.unlink()
    pth_marker.unlink()

    classroom.stop_server(name)
    server = classroom.start_server(name)
    assert not marker.exists() and not pth_marker.exists()
    specs = server.api("GET", "/api/kernelspecs").json()
    assert specs["default"] == "course-101"
    for spec in specs["kernelspecs"].values():
        provisioner = spec["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"]
        assert provisioner == "docker-sandbox"
    kernel_id = start_kernel(server, "python3")
    try:
        facts = run(server, kernel_id, "import os, socket\nprint(socket.gethostname(), "
                    "open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip(), "
                    "sorted(os.listdir('/sys/class/net')))")  # fmt: skip
    finally:
        stop_kernel(server, kernel_id)
    assert facts["stdout"].strip() == f"sandbox {512 * MB} ['lo']", facts


# -- bombs next to a neighbour --------------------------------------------------------------

STEADY = (
    "import time, hashlib\n"
    "for i in range(30):\n"
    "    hashlib.sha256(b'x' * 100000).hexdigest()\n"
    "    print('tick', i, flush=True)\n"
    "    time.sleep(0.5)\n"
    "print('steady done')"
)
MEMORY_BOMB = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 1024 * 1024))"
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"


def send_only(server: Server, kernel_id: str, code: str) -> None:
    """Send an execute request and leave (the bomb never answers)."""
    ws = server.channels(kernel_id)
    message = {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "t",
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }  # fmt: skip
    ws.send(json.dumps(message))
    ws.close()


def test_a_bombing_student_does_not_disturb_a_neighbour(classroom: Classroom) -> None:
    """While one student's cell runs (30 ticks), another student sets off a memory bomb and a
    fork bomb in two kernels: the neighbour's cell runs to its end, every tick in order; the
    bomber's memory kernel is ended by its limit, the fork bomb stays under its pids limit."""
    neighbour, bomber = STUDENTS[6], STUDENTS[7]
    calm, loud = classroom.start_server(neighbour), classroom.start_server(bomber)
    steady = start_kernel(calm)
    memory_kernel, fork_kernel = start_kernel(loud), start_kernel(loud)
    result: dict = {}
    try:
        runner = threading.Thread(target=lambda: result.update(run(calm, steady, STEADY, 180)))
        runner.start()
        time.sleep(2)
        send_only(loud, memory_kernel, MEMORY_BOMB)
        send_only(loud, fork_kernel, FORK_BOMB)
        pids_seen = pids_of(fork_kernel, seconds=8)
        runner.join()
    finally:
        for server, kernel_id in ((calm, steady), (loud, memory_kernel), (loud, fork_kernel)):
            stop_kernel(server, kernel_id)
    assert result["reply"]["status"] == "ok", result
    ticks = [int(n) for n in re.findall(r"tick (\d+)", result["stdout"])]
    assert ticks == list(range(30)) and "steady done" in result["stdout"], result["stdout"]
    assert pids_seen and max(pids_seen) <= 128, pids_seen
    print(f"\nfork bomb: at most {max(pids_seen)} processes (pids_limit 128)")


def pids_of(kernel_id: str, seconds: float) -> list[int]:
    """The number of processes in the kernel's container, sampled for ``seconds``."""
    client = docker.from_env()
    try:
        found = client.api.containers(
            filters={"label": f"io.kernel-sandbox.kernel-id={kernel_id}"}, quiet=True
        )
    finally:
        client.close()
    assert found, f"no container for kernel {kernel_id}"
    path = Path(f"/sys/fs/cgroup/pids/docker/{found[0]['Id']}/pids.current")
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            seen.append(int(path.read_text()))
        time.sleep(0.2)
    return seen


# -- the instructor's view ------------------------------------------------------------------

CLI = "import sys\nfrom kernel_sandbox.cli.app import main\nsys.exit(main({argv!r}))\n"


def cli(room: Classroom, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`kernel-sandbox ARGV` run by ``user`` through the class's sandbox service."""
    env = {"KERNEL_SANDBOX_SERVICE": room.service.socket}
    return room.users.run_as(user, CLI.format(argv=list(argv)), env=env, check=False)


def test_the_instructor_sees_and_stops_students_kernels(classroom: Classroom) -> None:
    """`kernel-sandbox ps` through the service: a student sees their own kernels only, an
    instructor (operator in the policy) everyone's; a student cannot stop another's kernel,
    the instructor can, and the student's server forgets it."""
    a, b = STUDENTS[8], STUDENTS[9]
    server_a, server_b = classroom.start_server(a), classroom.start_server(b)
    kernel_a, kernel_b = start_kernel(server_a), start_kernel(server_b)
    try:
        everyone = cli(classroom, INSTRUCTOR, "ps", "--json")
        assert everyone.returncode == 0, everyone.stderr[-2000:]
        assert kernel_a in everyone.stdout and kernel_b in everyone.stdout
        own = cli(classroom, a, "ps", "--json")
        assert own.returncode == 0, own.stderr[-2000:]
        assert kernel_a in own.stdout and kernel_b not in own.stdout
        assert cli(classroom, a, "stop", kernel_b).returncode != 0
        stopped = cli(classroom, INSTRUCTOR, "stop", kernel_a)
        assert stopped.returncode == 0, stopped.stderr[-2000:]
        deadline = time.monotonic() + 60
        while kernel_a in server_a.api("GET", "/api/kernels").text:
            assert time.monotonic() < deadline, "the student's server still lists the kernel"
            time.sleep(0.5)
        assert kernel_b in server_b.api("GET", "/api/kernels").text
    finally:
        stop_kernel(server_a, kernel_a)
        stop_kernel(server_b, kernel_b)

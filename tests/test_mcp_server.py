"""``kernel-sandbox mcp``, driven by the ``mcp`` SDK's own client over both transports.

Real kernels, real containers: the server is started as the operator would
(``python -m kernel_sandbox.cli mcp ...``), spawned by the client over stdio or listening on a
free loopback port over streamable HTTP. Checked: code, errors, images, progress, timeouts
and interrupts, restart, the file tools and their refusals, the policy and egress tools, bad
input as tool errors, an out-of-memory kernel reported then restarted, two concurrent HTTP
sessions in separate sandboxes, every container gone when its session ends, and the attack
battery's key probes run through ``run_code``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from security.battery import PRELUDE, parse_report
from support import unavailable
from support.kernels import make_kernelspec
from support.leaks import Scope
from test_containment import runtime_kernel

from kernel_sandbox.cli.app import main

pytestmark = pytest.mark.integration

TIMEOUT = 240  # seconds for one tool call on a loaded 2-core machine (a cold kernel start)
ACCOUNT_UID = 4242  # owner of a read-write workspace: no account here, outside uid_range
COMMAND = [sys.executable, "-m", "kernel_sandbox.cli", "mcp"]
# a 1x1 PNG
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
    "RU5ErkJggg=="
)


def text_of(result: Any) -> str:
    return "\n".join(getattr(item, "text", "") for item in result.content if hasattr(item, "text"))


async def call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    return await asyncio.wait_for(session.call_tool(tool, arguments), TIMEOUT)


async def ok(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await call(session, tool, **arguments)
    assert not result.is_error, f"{tool}: {text_of(result)}"
    return text_of(result)


async def policy_of(session: ClientSession) -> dict[str, Any]:
    return dict(json.loads(await ok(session, "get_policy")))


@asynccontextmanager
async def stdio_session(log: Path, *flags: str) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=COMMAND[0], args=[*COMMAND[1:], *flags], env=dict(os.environ)
    )
    with open(log, "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await asyncio.wait_for(session.initialize(), TIMEOUT)
                yield session


@asynccontextmanager
async def http_session(url: str, token: str | None = None) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=TIMEOUT) as client:
        async with streamable_http_client(url, http_client=client) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await asyncio.wait_for(session.initialize(), TIMEOUT)
                yield session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def http_server(log: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``kernel-sandbox mcp --transport http`` on a free loopback port, until it answers."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [*COMMAND, "--transport", "http", "--port", str(port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no answer on {port}: {log.read_text()}"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            process.wait(10)
            raise AssertionError(f"the server did not stop on SIGTERM: {log.read_text()}") from exc


def container_state(client: docker.DockerClient, name: str) -> str | None:
    try:
        return str(client.api.inspect_container(name)["State"]["Status"])
    except docker.errors.NotFound:
        return None


def wait_gone(client: docker.DockerClient, name: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while container_state(client, name) is not None:
        assert time.monotonic() < deadline, f"container {name} outlived its session"
        time.sleep(0.5)


# -- one session over stdio: the tools -------------------------------------------------------


def test_stdio_session_runs_code_and_files(
    tmp_path: Path, docker_client: docker.DockerClient, kernel_image: str, leak_check: Scope
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    if os.getuid() == 0:  # a read-write workspace is its owner's; the kernel runs as it
        os.chown(workspace, ACCOUNT_UID, ACCOUNT_UID)
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (workspace / "escape").symlink_to(secret)
    (workspace / "outside").symlink_to(tmp_path)
    log = tmp_path / "mcp.log"
    flags = ("--profile", "analyst", "--workspace", str(workspace), "--max-timeout", "300")

    async def go() -> str:
        async with stdio_session(log, *flags) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == {
                "run_code",
                "interrupt_kernel",
                "restart_kernel",
                "get_policy",
                "list_files",
                "read_file",
                "write_file",
                "list_datasets",
                "request_egress",
            }
            for name in ("get_policy", "list_files", "read_file", "list_datasets"):
                assert tools[name].annotations.read_only_hint is True, name
            for name in ("run_code", "restart_kernel", "write_file"):
                assert tools[name].annotations.read_only_hint is False, name
                assert tools[name].annotations.destructive_hint is True, name
            assert tools["run_code"].annotations.open_world_hint is False  # network none
            assert tools["request_egress"].annotations.destructive_hint is False
            for tool in tools.values():  # the operator's kernelspec and profile, nothing else
                properties = set(tool.input_schema.get("properties", {}))
                assert not properties & {"kernel", "kernelspec", "profile", "policy", "image"}

            out = await ok(session, "run_code", code="x = 6 * 7\nprint('hello')\nx")
            assert out.startswith("status: ok") and "hello" in out and "42" in out

            shown = await call(
                session,
                "run_code",
                code="import base64\nfrom IPython.display import Image, display\n"
                f"display(Image(data=base64.b64decode({PNG!r})))",
            )
            images = [c for c in shown.content if getattr(c, "type", "") == "image"]
            assert not shown.is_error and len(images) == 1, text_of(shown)
            assert images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data) == base64.b64decode(PNG)

            raised = await call(session, "run_code", code="def f():\n    return 1 / 0\nf()")
            text = text_of(raised)
            assert raised.is_error and "status: error" in text
            assert "ZeroDivisionError" in text and "return 1 / 0" in text  # the traceback
            assert "\x1b[" not in text  # no terminal colours

            reports: list[tuple[float, str | None]] = []

            async def on_progress(progress: float, total: float | None, message: str | None):
                reports.append((progress, message))

            slow = await asyncio.wait_for(
                session.call_tool(
                    "run_code",
                    {
                        "code": "import time\nfor i in range(4):\n    print('tick', i, flush=True)"
                        "\n    time.sleep(1.5)"
                    },
                    progress_callback=on_progress,
                ),
                TIMEOUT,
            )
            assert not slow.is_error and "tick 3" in text_of(slow)
            assert reports and all(p > 0 for p, _ in reports), reports
            assert any("tick" in (m or "") for _, m in reports), reports

            started = time.monotonic()
            late = await call(session, "run_code", code="import time; time.sleep(600)", timeout=3)
            assert late.is_error and "status: timeout" in text_of(late)
            assert "KeyboardInterrupt" in text_of(late)
            assert time.monotonic() - started < 60
            assert "42" in await ok(session, "run_code", code="x")  # interrupted, not restarted

            # interrupt_kernel while a call runs (the server serves both at once)
            running = asyncio.Event()

            async def mark(progress: float, total: float | None, message: str | None):
                running.set()

            task = asyncio.ensure_future(
                session.call_tool(
                    "run_code",
                    {"code": "import time; time.sleep(600)", "timeout": 300},
                    progress_callback=mark,
                )
            )
            await asyncio.wait_for(running.wait(), TIMEOUT)
            busy = await call(session, "run_code", code="1")
            assert busy.is_error and "in progress" in text_of(busy)
            await ok(session, "interrupt_kernel")
            stopped = await asyncio.wait_for(task, TIMEOUT)
            assert stopped.is_error and "KeyboardInterrupt" in text_of(stopped)

            # files: what the agent writes the kernel reads, and the other way round
            assert "wrote 5 bytes" in await ok(
                session, "write_file", path="a.txt", content="hi\n!\n"
            )
            assert "hi\n!" in await ok(session, "run_code", code="print(open('a.txt').read())")
            big = "y" * 3_000_000  # one message far beyond asyncio's default line limit
            assert "wrote 3000000 bytes" in await ok(
                session, "write_file", path="big.txt", content=big
            )
            assert "3000000" in await ok(session, "run_code", code="len(open('big.txt').read())")
            await ok(session, "run_code", code="import os; os.remove('big.txt')")
            await ok(session, "run_code", code="open('b.bin', 'wb').write(bytes([255, 254, 0, 1]))")
            assert await ok(session, "read_file", path="a.txt") == "hi\n!\n"
            assert base64.b64encode(bytes([255, 254, 0, 1])).decode() in await ok(
                session, "read_file", path="b.bin"
            )
            listing = json.loads(await ok(session, "list_files"))
            kinds = {e["name"]: e["kind"] for e in listing["entries"]}
            assert kinds == {"a.txt": "file", "b.bin": "file", "escape": "link", "outside": "link"}
            for path, says in (
                ("escape", "symbolic link"),
                ("outside/secret.txt", "symbolic link"),
                ("../secret.txt", "'..'"),
                (str(secret), "relative"),
                ("missing.txt", "does not exist"),
            ):
                refused = await call(session, "read_file", path=path)
                assert refused.is_error and says in text_of(refused), (path, text_of(refused))
                assert "host secret" not in text_of(refused)
            # the kernel plants a link to a host file: the host side does not follow it
            await ok(session, "run_code", code=f"import os; os.symlink({str(secret)!r}, 'planted')")
            planted = await call(session, "read_file", path="planted")
            assert planted.is_error and "symbolic link" in text_of(planted)
            refused = await call(session, "write_file", path="planted", content="x")
            assert refused.is_error and secret.read_text() == "host secret"
            refused = await call(session, "write_file", path="no/such/dir.txt", content="x")
            assert refused.is_error and "does not exist" in text_of(refused)

            policy = await policy_of(session)
            assert policy["network"] == "none" and policy["workspace"]["mode"] == "rw"
            assert policy["kernel"]["running"] is True
            container = policy["kernel"]["container"]
            assert container_state(docker_client, container) == "running"

            assert "restarted" in await ok(session, "restart_kernel")
            gone = await call(session, "run_code", code="x")
            assert gone.is_error and "NameError" in text_of(gone)
            return str((await policy_of(session))["kernel"]["container"])

    container = asyncio.run(go())
    wait_gone(docker_client, container)  # the session ended with the client


def test_policy_refusals_and_bad_input(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    """Under ``ci`` (workspace ro) the agent may read but not write; no --workspace, nothing;
    egress is only recorded; bad arguments are tool errors and the server carries on."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "data.csv").write_text("a,b\n1,2\n")

    async def go() -> None:
        async with stdio_session(
            tmp_path / "ro.log", "--profile", "ci", "--workspace", str(workspace)
        ) as session:
            assert (await ok(session, "read_file", path="data.csv")) == "a,b\n1,2\n"
            refused = await call(session, "write_file", path="data.csv", content="x")
            assert refused.is_error and "read-only" in text_of(refused)
            assert (workspace / "data.csv").read_text() == "a,b\n1,2\n"

            asked = json.loads(
                await ok(session, "request_egress", host="pypi.org", port=443, reason="pip")
            )
            assert asked["status"] == "awaiting a person" and "no network" in asked["message"]
            policy = await policy_of(session)
            assert policy["workspace"]["mode"] == "ro" and policy["network"] == "none"
            assert [r["target"] for r in policy["egress_requests"]] == ["pypi.org:443"]
            assert policy["kernel"]["id"] is None  # nothing started a kernel

            for tool, arguments, says in (
                ("run_code", {"code": 123}, "code"),
                ("run_code", {"code": "1", "timeout": -1}, "timeout"),
                ("read_file", {}, "path"),
                ("request_egress", {"host": "a b", "port": 80, "reason": ""}, "host"),
                ("request_egress", {"host": "x.test", "port": 70000, "reason": ""}, "port"),
                ("no_such_tool", {}, "no_such_tool"),
            ):
                result = await call(session, tool, **arguments)
                assert result.is_error and says in text_of(result), (tool, text_of(result))
            assert "2" in await ok(session, "run_code", code="1 + 1")  # still serving

        async with stdio_session(tmp_path / "none.log") as session:
            for tool, arguments in (("list_files", {}), ("read_file", {"path": "x"})):
                refused = await call(session, tool, **arguments)
                assert refused.is_error and "without --workspace" in text_of(refused)

    asyncio.run(go())


def test_an_out_of_memory_kernel_is_reported_then_restarted(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    name = make_kernelspec(f"mcp-oom-{uuid.uuid4().hex[:6]}", {"memory_limit": "160m"})
    leak_check.spec(name)
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))"

    async def go() -> None:
        async with stdio_session(tmp_path / "mcp.log", "--kernelspec", name) as session:
            died = await call(session, "run_code", code=hog, timeout=200)
            text = text_of(died)
            assert died.is_error and "status: died" in text, text
            assert "out of memory" in text and "restart_kernel" in text
            dead = await call(session, "run_code", code="1")
            assert dead.is_error and "not running" in text_of(dead)
            assert (await policy_of(session))["kernel"]["running"] is False
            await ok(session, "restart_kernel")
            assert "4" in await ok(session, "run_code", code="2 + 2")

    asyncio.run(go())


def test_an_unsandboxed_kernelspec_is_refused(tmp_path: Path) -> None:
    """The operator cannot hand agents a host kernel by mistake: one line, exit 2."""
    done = subprocess.run(
        [*COMMAND, "--kernelspec", "python3-local"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "does not start sandboxes" in lines[0] and not done.stdout


def test_a_workspace_no_kernel_could_write_is_refused_before_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.getuid() != 0:
        unavailable("without root the kernel runs as you: any folder you own will do")
    workspace = tmp_path / "ws"
    workspace.mkdir()  # root's: a read-write workspace no sandbox may run in
    assert main(["mcp", "--profile", "analyst", "--workspace", str(workspace)]) == 2
    assert "owned by root" in capsys.readouterr().err


def test_egress_requests_and_datasets_under_an_allowlist(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    """``egress_mode: ask``: a listed target is allowed already, another waits for a person
    (the answer says what they decided); datasets: names, never paths."""
    sales = tmp_path / "sales"
    sales.mkdir()
    (sales / "2024.csv").write_text("region,total\nnorth,1\n")
    for path in (tmp_path, sales):
        path.chmod(0o755)
    name = make_kernelspec(
        f"mcp-ask-{uuid.uuid4().hex[:6]}",
        {
            "network": "allowlist",
            "egress": ["allowed.test"],
            "egress_mode": "ask",
            "egress_ask_timeout": 3,
            "datasets": {"sales": f"{sales}:read"},
        },
    )
    leak_check.spec(name)

    async def go() -> None:
        async with stdio_session(tmp_path / "mcp.log", "--kernelspec", name) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert tools["run_code"].annotations.open_world_hint is True  # egress possible
            listed = json.loads(await ok(session, "list_datasets"))["datasets"]
            assert [(d["name"], d["access"]) for d in listed] == [("sales", "read")]
            assert str(sales) not in json.dumps(listed)
            code = "from kernel_sandbox import data\nprint(data.ls('sales'))"
            assert "sales/2024.csv" in await ok(session, "run_code", code=code)

            allowed = json.loads(
                await ok(session, "request_egress", host="allowed.test", port=443, reason="x")
            )
            assert allowed["status"] == "allowed"
            asked = json.loads(
                await ok(session, "request_egress", host="other.test", port=443, reason="docs")
            )
            kernel_id = (await policy_of(session))["kernel"]["id"]
            # a client without URL elicitation: the page's address is printed (and given);
            # nobody decides within the 3 s, which denies (tests/test_approvals_mcp.py: a person)
            assert asked["status"] == "no decision" and asked["kernel"] == kernel_id, asked
            assert asked["asked_by"] == "printed URL"
            assert asked["approval_page"] in (tmp_path / "mcp.log").read_text()

    asyncio.run(go())


# -- HTTP: a sandbox per session ------------------------------------------------------------


def test_http_sessions_get_separate_sandboxes(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    log = tmp_path / "mcp-http.log"
    with http_server(log) as (url, process):
        leak_check.pids.add(process.pid)

        async def go() -> tuple[list[str], str]:
            async with http_session(url) as a, http_session(url) as b:

                async def setup(session: ClientSession, mark: str) -> None:
                    await ok(session, "run_code", code=f"mine = {mark!r}")

                await asyncio.gather(setup(a, "A"), setup(b, "B"))
                assert "'A'" in await ok(a, "run_code", code="mine")
                assert "'B'" in await ok(b, "run_code", code="mine")
                names = [(await policy_of(s))["kernel"]["container"] for s in (a, b)]
                assert names[0] != names[1]
                assert all(container_state(docker_client, n) == "running" for n in names)
                kernel_ids = [(await policy_of(s))["kernel"]["id"] for s in (a, b)]
                assert kernel_ids[0] != kernel_ids[1]
            return names, url

        names, _ = asyncio.run(go())
        for name in names:  # the sessions ended (DELETE): their kernels go, the server stays
            wait_gone(docker_client, name)
        assert process.poll() is None

        async def again() -> str:
            async with http_session(url) as c:
                assert "NameError" in text_of(await call(c, "run_code", code="mine"))
                return str((await policy_of(c))["kernel"]["container"])

        third = asyncio.run(again())
        assert third not in names
        wait_gone(docker_client, third)
    assert process.returncode == 143, log.read_text()  # SIGTERM: exit 143, all shut down


def test_http_bearer_token(
    tmp_path: Path,
    kernel_image: str,
    docker_client: docker.DockerClient,
    leak_check: Scope,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x" * 8 + "\n")
    token_file.chmod(0o644)
    for says in ("others may read it", "shorter than 16"):
        argv = ["mcp", "--transport", "http", "--token-file", str(token_file)]
        assert main(argv) == 2
        assert says in capsys.readouterr().err
        token_file.chmod(0o600)
    token = "t0ken-" + uuid.uuid4().hex
    token_file.write_text(token + "\n")
    with http_server(tmp_path / "mcp-http.log", "--token-file", str(token_file)) as (url, proc):
        leak_check.pids.add(proc.pid)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            refused = httpx2.post(url, headers=headers, json={}, timeout=60)
            assert refused.status_code == 401, (headers, refused.text)

        async def go() -> str:
            async with http_session(url, token) as session:
                return await ok(session, "run_code", code="6 * 7")

        assert "42" in asyncio.run(go())


def test_http_server_stopped_mid_session_removes_its_kernel(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    log = tmp_path / "mcp-http.log"
    names: list[str] = []
    with http_server(log) as (url, process):
        leak_check.pids.add(process.pid)

        async def go() -> None:
            async with http_session(url) as session:
                await ok(session, "run_code", code="1")
                names.append((await policy_of(session))["kernel"]["container"])
                process.send_signal(signal.SIGTERM)
                process.wait(90)

        try:
            asyncio.run(go())
        except Exception:
            pass  # the client's session ends with an error: the server went away
    assert names and process.returncode == 143, log.read_text()
    assert container_state(docker_client, names[0]) is None


def child_server_pid() -> int:
    """The ``kernel-sandbox mcp`` process this process spawned (the stdio client's)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parent == os.getpid() and b"kernel_sandbox.cli" in argv:
            return int(entry)
    raise AssertionError("no kernel-sandbox mcp child process")


def test_stdio_server_stopped_mid_session_removes_its_kernel(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    names: list[str] = []

    async def go() -> None:
        async with stdio_session(tmp_path / "mcp.log") as session:
            await ok(session, "run_code", code="1")
            names.append((await policy_of(session))["kernel"]["container"])
            pid = child_server_pid()
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 90
            while Path(f"/proc/{pid}").exists() and b"Z" not in _state(pid):
                assert time.monotonic() < deadline, "the server did not stop on SIGTERM"
                await asyncio.sleep(0.1)

    try:
        asyncio.run(go())
    except Exception:
        pass  # the client's session ends with an error: the server went away
    assert names and container_state(docker_client, names[0]) is None


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"


# -- the attack battery's key probes, through run_code --------------------------------------


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_key_probes_through_the_run_tool(
    tmp_path: Path,
    runtime: str,
    kernel_image: str,
    docker_client: docker.DockerClient,
    leak_check: Scope,
) -> None:
    if runtime not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the engine has no {runtime} runtime (setup.sh registers it)")
    kernel = runtime_kernel(runtime)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    (workspace / "link").symlink_to(secret)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    probe = (
        PRELUDE
        + f"""
import socket
s = socket.socket(); s.settimeout(5)
report(interfaces=[n for _, n in socket.if_nameindex()],
       tcp_loopback=attempt(s.connect, ('127.0.0.1', {port})),
       secret=attempt(open, {str(secret)!r}), link=attempt(open, 'link'),
       uid=_os.getuid(), cap_eff=status('CapEff'), cap_bnd=status('CapBnd'),
       no_new_privs=_libc.prctl(39, 0, 0, 0, 0), setuid0=attempt(_os.setuid, 0),
       docker_sock=_os.path.exists('/var/run/docker.sock'))
"""
    )

    async def go() -> dict[str, Any]:
        async with stdio_session(
            tmp_path / "mcp.log", "--kernelspec", kernel, "--workspace", str(workspace)
        ) as session:
            return parse_report(await ok(session, "run_code", code=probe, timeout=120))

    try:
        got = asyncio.run(go())
        try:
            accepted = listener.accept()
            accepted[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    finally:
        listener.close()
    assert got["interfaces"] == ["lo"], got
    assert got["tcp_loopback"] != "ok" and not reached, got  # its own loopback, not ours
    assert got["secret"] == "ENOENT" and got["link"] == "ENOENT", got
    assert got["uid"] != 0 and got["setuid0"] == "EPERM", got
    assert int(got["cap_eff"], 16) == 0 and int(got["cap_bnd"], 16) == 0, got
    assert got["no_new_privs"] == 1 and got["docker_sock"] is False, got

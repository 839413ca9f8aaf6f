"""Agents through MCP, contained: jupyter-mcp-server 2.2.4 against a locked-down Jupyter
Server, driven by the ``mcp`` SDK's client, in both of its modes.

- stdio: ``jupyter-mcp-server`` as its own process, pointed at the server with
  ``JUPYTER_URL``/``JUPYTER_TOKEN`` (its kernel client asks for ``python3``);
- extension: the server's own ``/mcp`` endpoint (streamable HTTP), which calls the server's
  kernel manager.

Every path an agent has to run code: ``execute_code``, ``insert_execute_code_cell``,
``execute_cell``, ``restart_notebook`` and ``use_notebook(kernel_id="NEW")``; each prints
where it runs, and each must be in a sandbox. The first test runs the stdio mode against a
server without lockdown, to show the probe sees the host kernel the issue reported.

jupyter-mcp-server pulls in jupyter-collaboration, which enables real-time collaboration in
every Jupyter Server of the environment it is installed in: so it lives in a virtual
environment of its own (``python -m venv --system-site-packages VENV && VENV/bin/pip install
jupyter-mcp-server==2.2.4``) and these tests run with that interpreter
(``VENV/bin/python -m pytest tests/test_lockdown_mcp.py``, as ``.ci/run`` does with
``KS_REQUIRE_MCP=1``, under which a missing jupyter-mcp-server fails instead of skipping).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import pytest
from support.leaks import Scope
from support.lockdown import ENABLE, FACTS, REFUSE, SANDBOXED_FACTS, sandbox_containers
from support.servers import Server, jupyter_server

pytestmark = pytest.mark.integration

if not os.environ.get("KS_REQUIRE_MCP"):
    pytest.importorskip("jupyter_mcp_server", reason="needs jupyter-mcp-server (own venv)")
import httpx2  # noqa: E402
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

MCP_SERVER = shutil.which("jupyter-mcp-server", path=os.path.dirname(sys.executable))
TIMEOUT = 180


def text_of(result: Any) -> str:
    """All text an MCP tool result carries."""
    parts = [getattr(item, "text", "") for item in result.content]
    return "\n".join(p for p in parts if p)


async def call(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await asyncio.wait_for(session.call_tool(tool, arguments), TIMEOUT)
    text = text_of(result)
    assert not result.is_error, f"{tool}: {text}"
    return text


def facts_in(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("FACTS ")]


async def every_path(session: ClientSession) -> dict[str, list[str]]:
    """Run FACTS through every tool that executes code; what each printed."""
    await asyncio.wait_for(session.initialize(), TIMEOUT)
    seen: dict[str, list[str]] = {}
    await call(session, "use_notebook", notebook_name="nb1", notebook_path="a.ipynb", mode="create")
    seen["execute_code"] = facts_in(await call(session, "execute_code", code=FACTS, timeout=120))
    seen["insert_execute_code_cell"] = facts_in(
        await call(session, "insert_execute_code_cell", cell_index=-1, cell_source=FACTS)
    )
    # cell 0 of a notebook it creates is its markdown title; 1 is the cell inserted above
    seen["execute_cell"] = facts_in(await call(session, "execute_cell", cell_index=1))
    await call(session, "restart_notebook", notebook_name="nb1")
    seen["restart, execute_code"] = facts_in(
        await call(session, "execute_code", code=FACTS, timeout=120)
    )
    await call(
        session,
        "use_notebook",
        notebook_name="nb2",
        notebook_path="b.ipynb",
        mode="create",
        kernel_id="NEW",
    )
    seen["kernel_id=NEW, execute_code"] = facts_in(
        await call(session, "execute_code", code=FACTS, timeout=120)
    )
    return seen


@asynccontextmanager
async def stdio_session(server: Server) -> AsyncIterator[ClientSession]:
    assert MCP_SERVER, "jupyter-mcp-server is not installed next to this interpreter"
    params = StdioServerParameters(
        command=MCP_SERVER,
        args=[],
        env={
            **os.environ,
            "JUPYTER_URL": server.url,
            "JUPYTER_TOKEN": server.token,
            "TRANSPORT": "stdio",
        },
    )
    with open(os.devnull, "w") as quiet:
        async with stdio_client(params, errlog=quiet) as (read, write):
            async with ClientSession(read, write) as session:
                yield session


@asynccontextmanager
async def extension_session(server: Server) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"token {server.token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=TIMEOUT) as client:
        async with streamable_http_client(f"{server.url}/mcp", http_client=client) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                yield session


def run_paths(server: Server, mode: str) -> dict[str, list[str]]:
    async def go() -> dict[str, list[str]]:
        opener = stdio_session if mode == "stdio" else extension_session
        async with opener(server) as session:
            return await every_path(session)

    return asyncio.run(go())


def test_stdio_without_lockdown_runs_on_the_host(tmp_path: Path, kernel_image: str) -> None:
    """The probe can fail: the issue's finding, jupyter-mcp-server's python3 is a host kernel."""
    with jupyter_server(tmp_path, tmp_path / "server.log") as server:

        async def go() -> list[str]:
            async with stdio_session(server) as session:
                await asyncio.wait_for(session.initialize(), TIMEOUT)
                await call(
                    session,
                    "use_notebook",
                    notebook_name="nb",
                    notebook_path="a.ipynb",
                    mode="create",
                )
                return facts_in(await call(session, "execute_code", code=FACTS, timeout=120))

        facts = asyncio.run(go())
    assert facts and facts[0].startswith(f"FACTS {socket.gethostname()} ")


@pytest.mark.parametrize("mode", ["stdio", "extension"])
def test_every_mcp_path_runs_contained(
    tmp_path: Path,
    kernel_image: str,
    docker_client: docker.DockerClient,
    mode: str,
    leak_check: Scope,
) -> None:
    with jupyter_server(tmp_path, tmp_path / "server.log", ENABLE) as server:
        leak_check.pids.add(server.process.pid)
        seen = run_paths(server, mode)
        kernels = server.api("GET", "/api/kernels").json()
        pid = server.process.pid
    assert set(seen) == {
        "execute_code",
        "insert_execute_code_cell",
        "execute_cell",
        "restart, execute_code",
        "kernel_id=NEW, execute_code",
    }
    for path, facts in seen.items():
        assert facts and all(line == SANDBOXED_FACTS for line in facts), (path, facts)
    assert kernels and {k["name"] for k in kernels} == {"python3-sandbox"}
    deadline = time.monotonic() + 30
    while left := sandbox_containers(docker_client, pid):
        assert time.monotonic() < deadline, f"left after shutdown: {left}"
        time.sleep(0.5)


def test_stdio_in_refuse_mode_fails_loudly(
    tmp_path: Path, kernel_image: str, leak_check: Scope
) -> None:
    """refuse mode: the agent's python3 gets a 403 it can report, and nothing starts."""
    with jupyter_server(tmp_path, tmp_path / "server.log", ENABLE, REFUSE) as server:
        leak_check.pids.add(server.process.pid)

        async def go() -> list[tuple[bool, str]]:
            async with stdio_session(server) as session:
                await asyncio.wait_for(session.initialize(), TIMEOUT)
                results = []
                create = {"notebook_name": "nb", "notebook_path": "a.ipynb", "mode": "create"}
                for tool, arguments in (
                    ("use_notebook", create),
                    ("execute_code", {"code": FACTS, "timeout": 60}),
                ):
                    result = await asyncio.wait_for(session.call_tool(tool, arguments), TIMEOUT)
                    results.append((bool(result.is_error), text_of(result)))
                return results

        results = asyncio.run(go())
        kernels = server.api("GET", "/api/kernels").json()
    for is_error, text in results:
        assert is_error and "403" in text and "Kernel not sandboxed" in text, text
    assert kernels == []

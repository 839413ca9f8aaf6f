"""JupyterLab under lockdown, in a real browser: a terminal opened from the launcher is a
shell in a sandbox container, and closing it removes the container.

Debian's Chromium driven by Playwright as in ``test_browser.py`` (only loopback traffic).
The terminal draws on a canvas, so what it shows is read back from the server: terminado
replays a terminal's recent output to every client that connects. A screenshot goes to
``artifacts/lockdown-terminal.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import docker
import pytest
from support import IN_CI
from support.leaks import Scope
from support.lockdown import (
    ENABLE,
    SANDBOXED_SHELL,
    SHELL_FACTS,
    sandbox_containers,
    terminal_screen,
)
from support.servers import Server
from test_browser import ARTIFACTS, WAIT, jupyterlab, lab_page, require_chromium, wait_for

pytestmark = pytest.mark.integration

if not IN_CI:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402


def terminals_of(client: docker.DockerClient, pid: int) -> list[str]:
    return [name for name in sandbox_containers(client, pid) if name.startswith("ks-term-")]


def test_jupyterlab_terminal_is_sandboxed(
    tmp_path: Path, kernel_image: str, docker_client: docker.DockerClient, leak_check: Scope
) -> None:
    require_chromium()
    root = tmp_path / "root"
    root.mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with jupyterlab(root, tmp_path / "lab-state", tmp_path / "lab.log", ENABLE) as (url, lab):
        leak_check.pids.add(lab.pid)
        base, token = url.split("?")
        server = Server(base, token.removeprefix("token="), lab)
        with sync_playwright() as pw:
            browser, page = lab_page(pw, base, outside)
            try:
                page.goto(f"{base}/lab?{token}")
                page.locator(".jp-LauncherCard", has_text="Terminal").first.click()
                expect(page.locator(".jp-Terminal .xterm")).to_be_visible(timeout=WAIT)
                started = wait_for(
                    lambda: terminals_of(docker_client, lab.pid), "the terminal's container"
                )
                assert len(started) == 1
                names = wait_for(lambda: server.api("GET", "/api/terminals").json(), "terminal")
                name = names[0]["name"]
                wait_for(lambda: "$ " in terminal_screen(server, name), "the shell's prompt")
                page.locator(".jp-Terminal .xterm").click()
                page.keyboard.type(SHELL_FACTS)
                page.keyboard.press("Enter")
                wait_for(
                    lambda: SANDBOXED_SHELL in terminal_screen(server, name),
                    "the sandbox's facts in the terminal",
                )
                page.screenshot(path=str(ARTIFACTS / "lockdown-terminal.png"))

                # the shell exits: its container goes, and the terminal with it
                page.locator(".jp-Terminal .xterm").click()
                page.keyboard.type("exit")
                page.keyboard.press("Enter")
                wait_for(
                    lambda: not terminals_of(docker_client, lab.pid),
                    "the terminal's container to go",
                    timeout=30,
                )
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "lockdown-terminal-failure.png"))
                raise
            finally:
                browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    deadline = time.monotonic() + 30
    while left := sandbox_containers(docker_client, lab.pid):
        assert time.monotonic() < deadline, f"left after shutdown: {left}"
        time.sleep(0.5)
    assert (ARTIFACTS / "lockdown-terminal.png").stat().st_size > 10_000

"""JupyterLab in a real browser: a person picks "Python 3 (sandboxed)" and works as usual.

A real JupyterLab server on 127.0.0.1 and Debian's headless Chromium driven by Playwright
(``executable_path=/usr/bin/chromium``: browsers cannot be downloaded here). Through the UI
only: choose the kernel in the kernel selection dialog, run a cell whose output only a
contained kernel can print, interrupt a long cell from the toolbar, restart from the Kernel
menu (confirming the dialog), run a typed cell in the new kernel, shut the kernel down from
the menu. The page may only talk to the server: every other request is aborted and fails
the test. A screenshot is saved to ``artifacts/jupyterlab.png``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import nbformat
import pytest
import requests
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from support import IN_CI, REPO
from support.kernels import SANDBOX_UID_PATTERN
from support.leaks import LABEL
from support.servers import free_port

if not IN_CI:  # in CI a missing Playwright is an error, not a skip
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# No sandbox (we run as root), and none of Chromium's own traffic to outside hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-extensions",
]
ARTIFACTS = REPO / "artifacts"
WAIT = 90_000  # ms: kernel starts and page loads on a busy two-core machine


def require_chromium() -> None:
    """Skip without Debian's chromium (fail in CI, where setup.sh installs it)."""
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium (setup.sh does)"
        pytest.fail(message) if IN_CI else pytest.skip(message)


def lab_page(
    pw: Playwright, base: str, outside: list[str], height: int = 900
) -> tuple[Browser, Page]:
    """Headless Chromium with one page that may reach only the server at ``base``: any other
    request is recorded in ``outside`` and aborted (the UI must not need the internet)."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    page = browser.new_page(viewport={"width": 1400, "height": height})

    def only_loopback(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith((base + "/", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.set_default_timeout(WAIT)
    return browser, page


FACTS = (
    "import os\n"
    "print('NET', sorted(os.listdir('/sys/class/net')), 'UID', os.getuid(),"
    " 'SANDBOX', os.environ.get('KERNEL_SANDBOX'))"
)
AFTER_RESTART = (
    "import os\n"
    "print('fresh kernel:', 'time' not in globals(), sorted(os.listdir('/sys/class/net')),"
    " os.getuid())"
)


@contextmanager
def jupyterlab(
    root: Path, state: Path, log_path: Path, *extra: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`jupyter lab` on 127.0.0.1 with a token, its own settings, nothing fetched from outside
    (``extra``: more command-line options)."""
    port, token = free_port(), uuid.uuid4().hex
    news = state / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # and no "get notified about Jupyter news?" question
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log = open(log_path, "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--allow-root",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            # no news, update checks or extension listings from the internet
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            # a clean workspace and settings, untouched by whoever ran JupyterLab here before
            f"--LabApp.workspaces_dir={state / 'workspaces'}",
            f"--LabApp.user_settings_dir={state / 'settings'}",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/api/status", params={"token": token}, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield f"{url}?token={token}", process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def kernel_containers(client: docker.DockerClient, server_pid: int) -> list[str]:
    """The running sandbox containers whose owner is this test's Jupyter server."""
    labels = [
        LABEL,
        f"io.kernel-sandbox.owner-pid={server_pid}",
        "io.kernel-sandbox.kernelspec=python3-sandbox",
    ]
    # one listing call (containers.list() fails when one goes between listing and inspecting)
    return [c["Id"] for c in client.api.containers(filters={"label": labels})]


def wait_for(condition, what: str, timeout: float = 90):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def menu(page: Page, top: str, item: str) -> None:
    """Click ``top`` in JupyterLab's menu bar, then the item labelled exactly ``item``."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(top)}$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
    label.click()


def run_cell(page: Page, index: int, text: str | None = None) -> None:
    """Click into cell ``index`` (typing ``text`` there if given) and run it with Ctrl+Enter."""
    editor = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".cm-content")
    editor.click()
    if text is not None:
        page.keyboard.insert_text(text)
    page.keyboard.press("Control+Enter")


def output(page: Page, index: int):  # type: ignore[no-untyped-def]
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea-output")


def status(page: Page):  # type: ignore[no-untyped-def]
    return page.locator(".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator")


def test_jupyterlab_with_the_sandboxed_kernel(tmp_path, leak_check, docker_client):
    require_chromium()
    root = tmp_path / "root"
    root.mkdir()
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Sandboxed, from a browser"),
            new_code_cell(FACTS),
            new_code_cell("import time\nprint('asleep', 6 * 7)\ntime.sleep(600)"),
            new_code_cell(""),
        ]
    )  # no kernelspec metadata: JupyterLab asks which kernel to start
    nbformat.write(nb, root / "sandbox.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []

    with jupyterlab(root, tmp_path / "lab-state", tmp_path / "jupyterlab.log") as (url, server):
        base, token = url.split("?")
        with sync_playwright() as pw:
            browser, page = lab_page(pw, base, outside)
            try:
                page.goto(f"{base}/lab/tree/sandbox.ipynb?{token}")

                # 1. the kernel selection dialog: choose "Python 3 (sandboxed)"
                dialog = page.locator(".jp-Dialog")
                expect(dialog).to_contain_text("Select Kernel", timeout=WAIT)
                dialog.locator("select").select_option(label="Python 3 (sandboxed)")
                dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
                expect(
                    page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                ).to_have_text("Python 3 (sandboxed)", timeout=WAIT)
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                first = wait_for(
                    lambda: kernel_containers(docker_client, server.pid), "the kernel's container"
                )
                assert len(first) == 1

                # 2. a cell only a contained kernel answers this way
                run_cell(page, 1)
                expect(output(page, 1)).to_contain_text(
                    re.compile(rf"NET \['lo'\] UID {SANDBOX_UID_PATTERN} SANDBOX 1"), timeout=WAIT
                )

                # 3. a long cell, interrupted from the toolbar
                run_cell(page, 2)
                expect(
                    page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".jp-InputPrompt")
                ).to_contain_text("[*]", timeout=WAIT)
                expect(status(page)).to_have_attribute("data-status", "busy", timeout=WAIT)
                # the cell's own output: the kernel is past it and inside time.sleep now
                expect(output(page, 2).first).to_contain_text("asleep 42", timeout=WAIT)
                page.locator(
                    ".jp-NotebookPanel-toolbar jp-button[data-command='notebook:interrupt-kernel']"
                ).click()
                expect(output(page, 2).last).to_contain_text("KeyboardInterrupt", timeout=WAIT)
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                assert kernel_containers(docker_client, server.pid) == first  # not restarted

                # 4. restart from the Kernel menu, confirm, and work in the new kernel
                menu(page, "Kernel", "Restart Kernel…")
                confirm = page.locator(".jp-Dialog")
                expect(confirm).to_contain_text("Restart Kernel?", timeout=WAIT)
                confirm.locator(".jp-Dialog-button.jp-mod-accept").click()
                second = wait_for(
                    lambda: [
                        c for c in kernel_containers(docker_client, server.pid) if c not in first
                    ],
                    "a new container after the restart",
                )
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                run_cell(page, 3, AFTER_RESTART)
                expect(output(page, 3)).to_contain_text(
                    re.compile(rf"fresh kernel: True \['lo'\] {SANDBOX_UID_PATTERN}"), timeout=WAIT
                )
                assert kernel_containers(docker_client, server.pid) == second
                page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"), full_page=True)

                # 5. shut the kernel down from the menu: its container goes
                menu(page, "Kernel", "Shut Down Kernel")
                wait_for(
                    lambda: not kernel_containers(docker_client, server.pid),
                    "the container to go after shutdown",
                    timeout=60,
                )
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    # nothing left by this server (other sessions may share the engine: look by owner)
    owner = [LABEL, f"io.kernel-sandbox.owner-pid={server.pid}"]
    assert docker_client.containers.list(all=True, filters={"label": owner}) == []
    assert (ARTIFACTS / "jupyterlab.png").stat().st_size > 10_000

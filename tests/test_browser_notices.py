"""JupyterLab in a real browser: the sandbox's notices are where the user looks.

A notebook on a sandboxed kernel with a small memory limit, driven through the UI: a network
attempt shows the no-network note under its traceback, ``%pip install`` says nothing was
installed, and a cell that fills the memory shows, in that cell, that the kernel hit its
memory limit (JupyterLab then says the kernel restarts). Screenshot:
``artifacts/jupyterlab-notices.png``.
"""

from __future__ import annotations

import uuid

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from support import IN_CI
from support.kernels import make_kernelspec
from support.leaks import LABEL
from test_browser import (
    ARTIFACTS,
    WAIT,
    jupyterlab,
    lab_page,
    output,
    require_chromium,
    run_cell,
    status,
    wait_for,
)

if not IN_CI:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.integration


def running(docker_client, server_pid: int) -> list[str]:
    labels = [LABEL, f"io.kernel-sandbox.owner-pid={server_pid}"]
    return [c["Id"] for c in docker_client.api.containers(filters={"label": labels})]


HOG = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))"


def test_jupyterlab_shows_the_notices(tmp_path, jupyter_path, leak_check, docker_client):
    require_chromium()
    name = make_kernelspec(f"notices-{uuid.uuid4().hex[:6]}", {"memory_limit": "256m"})
    leak_check.spec(name)
    root = tmp_path / "root"
    root.mkdir()
    nb = new_notebook(
        cells=[
            new_code_cell(
                "import urllib.request\nurllib.request.urlopen('http://sandbox-test.invalid/')"
            ),
            new_code_cell("%pip install surely-not-a-package"),
            new_code_cell(HOG),
        ],
        metadata={
            "kernelspec": {"name": name, "display_name": f"test {name}", "language": "python"}
        },
    )
    nbformat.write(nb, root / "notices.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with jupyterlab(root, tmp_path / "lab-state", tmp_path / "jupyterlab.log") as (url, server):
        leak_check.pids.add(server.pid)
        base, token = url.split("?")
        with sync_playwright() as pw:
            browser, page = lab_page(pw, base, outside, height=1000)
            try:
                page.goto(f"{base}/lab/tree/notices.ipynb?{token}")
                expect(
                    page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                ).to_have_text(f"test {name}", timeout=WAIT)
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                page.wait_for_timeout(1000)  # the kernel's first idle, then its connection

                run_cell(page, 0)
                expect(output(page, 0).last).to_contain_text(
                    "this kernel has no network by policy (network: none)", timeout=WAIT
                )
                run_cell(page, 1)
                expect(output(page, 1).last).to_contain_text("nothing was installed", timeout=WAIT)
                run_cell(page, 2)
                expect(output(page, 2).last).to_contain_text("memory limit (256m)", timeout=WAIT)
                expect(output(page, 2).last).to_contain_text(
                    "c.DockerSandboxProvisioner.memory_limit", timeout=WAIT
                )
                dialog = page.locator(".jp-Dialog")
                expect(dialog).to_contain_text("Kernel Restarting", timeout=WAIT)
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-oom-dialog.png"))
                dialog.locator(".jp-Dialog-button").first.click()
                expect(dialog).to_have_count(0)
                # the notice stays in the cell (whether JupyterLab reconnects to the restarted
                # kernel is not this test's business: main's code shows the same there)
                expect(output(page, 2).last).to_contain_text("memory limit (256m)")
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-notices.png"), full_page=True)
                # let the auto-restart finish before the server stops (jupyter_client fails
                # to shut down a kernel in the middle of a restart)
                wait_for(lambda: running(docker_client, server.pid), "the restarted kernel")
                page.wait_for_timeout(2000)
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-notices-failure.png"))
                raise
            finally:
                browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    assert (ARTIFACTS / "jupyterlab-notices.png").stat().st_size > 10_000

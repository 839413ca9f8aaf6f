"""JupyterLab in Chromium: a kernel the sandbox service culls for idleness says why.

JupyterLab, whose kernels go through the service, opens a notebook and leaves it idle; when
the kernel's ``idle_timeout`` ends it, JupyterLab shows the sandbox's reason in a dialog
(JupyterLab titles it "Error Starting Kernel"; the body is the reason), instead of only "No
Kernel". Screenshot: ``artifacts/jupyterlab-idle-cull.png``.
"""

from __future__ import annotations

import uuid

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from support import IN_CI
from support.kernels import make_kernelspec
from test_browser import ARTIFACTS, WAIT, jupyterlab, lab_page, require_chromium, status

if not IN_CI:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.integration

IDLE = 20  # seconds: time for the page to load and connect first on a busy machine


def test_jupyterlab_shows_why_the_service_culled_the_kernel(
    tmp_path, jupyter_path, sandbox_service, monkeypatch
):
    require_chromium()
    monkeypatch.setenv("KERNEL_SANDBOX_SERVICE", sandbox_service.socket)
    name = make_kernelspec(f"idle-{uuid.uuid4().hex[:6]}", {"idle_timeout": IDLE})
    root = tmp_path / "root"
    root.mkdir()
    nb = new_notebook(
        cells=[new_code_cell("print('working')")],
        metadata={
            "kernelspec": {"name": name, "display_name": f"test {name}", "language": "python"}
        },
    )
    nbformat.write(nb, root / "idle.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with jupyterlab(root, tmp_path / "lab-state", tmp_path / "jupyterlab.log") as (url, _server):
        base, token = url.split("?")
        with sync_playwright() as pw:
            browser, page = lab_page(pw, base, outside, height=1000)
            try:
                page.goto(f"{base}/lab/tree/idle.ipynb?{token}")
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                dialog = page.locator(".jp-Dialog")
                expect(dialog).to_contain_text(
                    f"this kernel was shut down: idle for {IDLE}s", timeout=IDLE * 1000 + WAIT
                )
                expect(dialog).to_contain_text("Its variables are gone")
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-idle-cull.png"))
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-idle-cull-failure.png"))
                raise
            finally:
                browser.close()
    log = (tmp_path / "jupyterlab.log").read_text()
    assert f"idle for {IDLE}s" in log and "restarting kernel" not in log.lower()
    assert not outside, f"the page tried to reach other hosts: {outside}"

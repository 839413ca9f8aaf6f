"""The approvals' JupyterLab extension in a real browser: a waiting egress request is a dialog.

JupyterLab (with the extension as installed by ``pip install -e .``, or else this checkout's
build) and Debian's Chromium driven by Playwright. A notebook on an ask-mode sandboxed kernel
fetches from a listener this test starts on 127.0.0.1 (a ``.test`` name that egress_hosts maps
there). The dialog shows the exact host and port, the kernel and the notebook; "Approve once"
lets the cell get its data, "Deny" makes the next cell fail with a clear error. Screenshots:
``artifacts/approvals-dialog.png``, ``artifacts/approvals-notebook.png``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import nbformat
import pytest
import requests
from nbformat.v4 import new_code_cell, new_notebook
from support import IN_CI, REPO, unavailable
from support.approvals import FETCH, NAME, ask_kernelspec, listener
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

LABEXTENSION = "kernel-sandbox-approvals"
BUILT = REPO / "kernel_sandbox" / "approvals" / "labextension"


def installed_labextensions() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "jupyterlab.labextensions", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_the_labextension_is_installed_with_the_package():
    """What ``pip install -e .`` (CI) puts where JupyterLab looks: listed, enabled, OK."""
    listing = installed_labextensions()
    line = next((ln for ln in listing.splitlines() if LABEXTENSION in ln), None)
    if line is None:
        unavailable(f"{LABEXTENSION} is not installed: pip install -e . (got:\n{listing})")
    assert "enabled" in line and "OK" in line and "kernel-sandbox" in line, line
    assert (BUILT / "package.json").is_file()
    built = json.loads((BUILT / "package.json").read_text())
    assert built["jupyterlab"]["_build"]["load"].startswith("static/remoteEntry.")


def lab_options(tmp_path) -> list[str]:
    options = ["--ServerApp.jpserver_extensions={'kernel_sandbox.approvals': True}"]
    if LABEXTENSION not in installed_labextensions():
        # this checkout's build (a worktree not pip-installed): JupyterLab reads it from here
        extra = tmp_path / "labextensions"
        extra.mkdir()
        (extra / LABEXTENSION).symlink_to(BUILT)
        options.append(f"--LabApp.extra_labextensions_path={extra}")
    return options


def test_approve_and_deny_in_jupyterlab(tmp_path, jupyter_path, kernel_image, leak_check):
    require_chromium()
    name = ask_kernelspec(f"approvals-lab-{uuid.uuid4().hex[:6]}", kernel_image, timeout=120)
    leak_check.spec(name)
    root = tmp_path / "root"
    root.mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with listener() as port:
        target = f"{NAME}:{port}"
        nb = new_notebook(
            cells=[
                new_code_cell(FETCH + f"\nprint(fetch('http://{target}/approved.csv'))"),
                new_code_cell(
                    "print(urllib.request.urlopen("
                    f"'http://{target}/denied.csv', timeout=150).read().decode())"
                ),
            ],
            metadata={
                "kernelspec": {"name": name, "display_name": f"test {name}", "language": "python"}
            },
        )
        nbformat.write(nb, root / "approvals.ipynb")
        with jupyterlab(
            root, tmp_path / "lab-state", tmp_path / "jupyterlab.log", *lab_options(tmp_path)
        ) as (url, server):
            leak_check.pids.add(server.pid)
            base, token = url.split("?")
            with sync_playwright() as pw:
                browser, page = lab_page(pw, base, outside, height=1000)
                try:
                    page.goto(f"{base}/lab/tree/approvals.ipynb?{token}")
                    expect(
                        page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                    ).to_have_text(f"test {name}", timeout=WAIT)
                    expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                    page.wait_for_timeout(1000)
                    sessions = wait_for(
                        lambda: requests.get(f"{base}/api/sessions?{token}", timeout=30).json(),
                        "the notebook's session",
                    )
                    kernel_id = sessions[0]["kernel"]["id"]

                    # the first request: the dialog names host, port, kernel, notebook
                    run_cell(page, 0)
                    dialog = page.locator(".ks-approval-dialog")
                    expect(dialog).to_be_visible(timeout=WAIT)
                    expect(dialog).to_contain_text(f"Allow network access to {target}?")
                    facts = dialog.locator(".ks-approval")
                    expect(facts.locator("[data-field=host]")).to_have_text(NAME)
                    expect(facts.locator("[data-field=port]")).to_have_text(str(port))
                    expect(facts.locator("[data-field=kernel]")).to_contain_text(kernel_id)
                    expect(facts.locator("[data-field=notebook]")).to_have_text("approvals.ipynb")
                    page.screenshot(path=str(ARTIFACTS / "approvals-dialog.png"))
                    dialog.get_by_role("button", name="Approve once").click()
                    expect(output(page, 0).last).to_contain_text(
                        "(200, 'the data behind /approved.csv')", timeout=WAIT
                    )
                    expect(dialog).to_have_count(0)

                    # the second: denied, and the cell fails saying so
                    run_cell(page, 1)
                    expect(dialog).to_be_visible(timeout=WAIT)
                    expect(dialog.locator("[data-field=port]")).to_have_text(str(port))
                    dialog.get_by_role("button", name="Deny").click()
                    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
                    expect(cell.locator(".jp-OutputArea-output").last).to_contain_text(
                        "HTTPError", timeout=WAIT
                    )
                    expect(cell).to_contain_text(f"egress to {target} denied: denied by a person")
                    expect(dialog).to_have_count(0)
                    page.screenshot(path=str(ARTIFACTS / "approvals-notebook.png"), full_page=True)
                except BaseException:
                    page.screenshot(path=str(ARTIFACTS / "approvals-failure.png"))
                    raise
                finally:
                    browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"

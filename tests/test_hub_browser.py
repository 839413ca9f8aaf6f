"""A student's day on the class hub, in Chromium: log in at the hub's login form, open the
course notebook in JupyterLab, run it, leave it idle, and find in the notebook why the kernel
is gone (the policy gives this student a 20 s ``idle_timeout``). Screenshots:
``artifacts/hub-notebook.png``, ``artifacts/hub-culled.png``.
"""

from __future__ import annotations

import pwd
import time

import docker
import pytest
from support import IN_CI
from support.hub import CULL_SECONDS, CULLED_STUDENT, Classroom
from test_browser import (
    ARTIFACTS,
    WAIT,
    lab_page,
    menu,
    output,
    require_chromium,
    status,
    wait_for,
)
from test_hub import as_student

if not IN_CI:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.integration


def containers(classroom: Classroom, name: str) -> list[str]:
    """The sandbox containers (any state) the class's service started for ``name``."""
    client = docker.from_env()
    try:
        uid = pwd.getpwnam(name).pw_uid
        labels = ["io.kernel-sandbox.managed=true", f"io.kernel-sandbox.caller-uid={uid}"]
        listed = client.api.containers(all=True, filters={"label": labels})
    finally:
        client.close()
    root = classroom.service.runtime_root + "/"
    return [
        c["Id"] for c in listed
        if c["Labels"].get("io.kernel-sandbox.runtime-dir", "").startswith(root)
    ]  # fmt: skip


NEWS = "@jupyterlab/apputils-extension/notification.jupyterlab-settings"
CULLED = f"this kernel was shut down: idle for {CULL_SECONDS}s"


def test_a_student_logs_in_runs_the_course_notebook_and_sees_why_it_was_culled(
    classroom: Classroom,
) -> None:
    require_chromium()
    name = CULLED_STUDENT
    settings = classroom.home(name) / ".jupyter" / "lab" / "user-settings" / NEWS
    as_student(classroom, name, settings, '{"fetchNews": "false"}')  # no news question
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with sync_playwright() as pw:
        browser, page = lab_page(pw, classroom.url, outside, height=1000)
        try:
            page.goto(f"{classroom.url}/hub/login")
            page.fill("#username_input", name)
            page.fill("#password_input", classroom.passwords[name])
            page.click("#login_submit")
            page.wait_for_url(f"**/user/{name}/lab**", timeout=WAIT * 2)  # spawned if needed
            page.goto(f"{classroom.url}/user/{name}/lab/tree/work/week1.ipynb")
            expect(page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")).to_have_text(
                "Course 101 (sandboxed)", timeout=WAIT
            )
            expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
            page.wait_for_timeout(1000)  # the kernel's first idle, then its connection
            menu(page, "Run", "Run All Cells")
            expect(output(page, 1).last).to_contain_text("course rows 11", timeout=WAIT)
            expect(output(page, 2).last).to_contain_text("total 55", timeout=WAIT)
            expect(output(page, 3).last).to_contain_text("census rows 4", timeout=WAIT)
            expect(output(page, 4).last).to_contain_text("saved", timeout=WAIT)
            page.screenshot(path=str(ARTIFACTS / "hub-notebook.png"))
            # idle now: the service ends the kernel after idle_timeout, and says why
            expect(output(page, 4).last).to_contain_text(CULLED, timeout=CULL_SECONDS * 1000 + WAIT)
            page.screenshot(path=str(ARTIFACTS / "hub-culled.png"), full_page=True)
            # and the culled kernel is gone: from the student's server, and its container
            server = classroom.server(name)
            wait_for(lambda: server.api("GET", "/api/kernels").json() == [], "the kernel gone")
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "hub-browser-failure.png"))
            raise
        finally:
            browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    deadline = time.monotonic() + 30
    while containers(classroom, name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not containers(classroom, name), "the culled kernel's container remains"

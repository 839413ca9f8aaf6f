"""JupyterLab in Chromium with a warm pool: a new notebook, a restart, both through the UI.

A real JupyterLab (``--DockerSandboxProvisioner.pool_size=1``) and Debian's headless Chromium,
with the helpers of ``test_browser``. A person opens a new "Python 3 (sandboxed)" notebook
from the launcher and runs a cell, then restarts the kernel from the Kernel menu (confirming
the dialog) and runs a cell again: it works, the variable from before is gone, and the kernel
now runs in a different container, the pooled one that waited for it.

The lab's first start of a kernelspec is cold (its pool starts filling then); the test takes
either for the first start, waits for the pool to refill and asserts the restart was served
from it. A pooled container shows in the engine before its waiter is ready: a restart in
between is cold, is checked the same way, and the test restarts again. On the host a pooled
container is named ``ks-pool-...``, labelled ``io.kernel-sandbox.pooled=true``, owned by the
lab's pid, and names its kernel in the host-only ``<runtime_dir>/kernel-id``. `kernel-sandbox
stop` of the claimed kernel ends it through the lab, which forgets it. When the lab ends,
nothing of it is left, waiting pooled sandboxes included.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import requests
from support.kernels import SANDBOX_UID_PATTERN
from support.leaks import assert_nothing_left
from support.pools import COLD, POOL_WAITER, WHO_RUNS, of_kernel, sandboxes_of, waiting_of
from test_browser import (
    ARTIFACTS,
    WAIT,
    Page,
    expect,
    jupyterlab,
    lab_page,
    menu,
    output,
    require_chromium,
    run_cell,
    status,
    sync_playwright,
    wait_for,
)

FIRST = (
    "x = 6 * 7\n"
    f"{WHO_RUNS}\n"
    "print('NET', sorted(os.listdir('/sys/class/net')), 'UID', os.getuid(), 'X', x,"
    " open('marker.txt').read())"
)
AFTER_RESTART = f"{WHO_RUNS}\nprint('fresh kernel:', 'x' not in globals(), os.getuid())"
POOLED = "io.kernel-sandbox.pooled"
KERNEL_ID = "io.kernel-sandbox.kernel-id"
MARKER = "next-to-the-notebook"  # in marker.txt, next to the notebook
INSERT_BELOW = ".jp-NotebookPanel-toolbar jp-button[data-command='notebook:insert-cell-below']"


def restart(page: Page) -> None:
    """Kernel menu, Restart Kernel..., confirm."""
    menu(page, "Kernel", "Restart Kernel…")
    confirm = page.locator(".jp-Dialog")
    expect(confirm).to_contain_text("Restart Kernel?", timeout=WAIT)
    confirm.locator(".jp-Dialog-button.jp-mod-accept").click()


def kernels(url: str) -> list[str]:
    """The ids of the lab's kernels (REST)."""
    base, token = url.split("?token=")
    found = requests.get(f"{base}/api/kernels", params={"token": token}, timeout=10).json()
    return [str(k["id"]) for k in found]


def the_kernel(url: str) -> str:
    """The id of the lab's one kernel."""
    found = kernels(url)
    assert len(found) == 1, found
    return found[0]


def test_jupyterlab_new_notebook_and_restart_served_by_the_pool(
    tmp_path, leak_check, docker_client
):
    require_chromium()
    root = tmp_path / "root"
    root.mkdir()
    (root / "marker.txt").write_text(MARKER)
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    pool_flag = "--DockerSandboxProvisioner.pool_size=1"

    with jupyterlab(root, tmp_path / "lab-state", tmp_path / "lab.log", pool_flag) as (
        url,
        server,
    ):
        base, token = url.split("?")
        with sync_playwright() as pw:
            browser, page = lab_page(pw, base, outside)
            try:
                page.goto(f"{base}/lab?{token}")

                # 1. a new notebook from the launcher's "Python 3 (sandboxed)" card
                card = page.locator(
                    ".jp-LauncherCard[data-category='Notebook'][title='Python 3 (sandboxed)']"
                )
                card.click()
                expect(
                    page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                ).to_have_text("Python 3 (sandboxed)", timeout=WAIT)
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                kernel = the_kernel(url)
                first = wait_for(
                    lambda: of_kernel(docker_client, server.pid, kernel), "the kernel's container"
                )
                assert len(first) == 1
                first_pooled = first[0].pooled

                # 2. a cell, in a contained kernel, in the notebook's folder
                run_cell(page, 0, FIRST)
                expect(output(page, 0).last).to_contain_text(
                    re.compile(rf"NET \['lo'\] UID {SANDBOX_UID_PATTERN} X 42 {MARKER}"),
                    timeout=WAIT,
                )
                expect(output(page, 0).first).to_contain_text(POOL_WAITER if first_pooled else COLD)

                # 3. once the pool has refilled, restart from the Kernel menu: the kernel
                # claims the sandbox that waited. A pooled container shows in the engine before
                # its waiter is ready; a restart in between starts cold (checked the same way),
                # then the test waits for the next refill and restarts again.
                current, claimed = first[0].container, None
                for attempt in range(1, 4):
                    ready = wait_for(
                        lambda: waiting_of(docker_client, server.pid, "python3-sandbox"),
                        "the pool to refill",
                    )
                    waiting = ready[0].container
                    assert waiting.startswith("ks-pool-") and waiting != current
                    time.sleep(1.0)  # its waiter is ready well within this, mostly
                    restart(page)
                    (new,) = wait_for(
                        lambda: [  # noqa: B023 (the loop waits for it here)
                            s
                            for s in of_kernel(docker_client, server.pid, kernel)
                            if s.container != current  # noqa: B023
                        ],
                        "the kernel's container after the restart",
                    )
                    expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                    assert the_kernel(url) == kernel  # the same kernel, as after any restart

                    # 4. the new kernel works and knows nothing of the old one
                    page.locator(INSERT_BELOW).click()
                    run_cell(page, attempt, AFTER_RESTART)
                    expect(output(page, attempt).last).to_contain_text(
                        re.compile(rf"fresh kernel: True {SANDBOX_UID_PATTERN}"), timeout=WAIT
                    )
                    # the previous container went at the restart
                    assert [s.container for s in of_kernel(docker_client, server.pid, kernel)] == [
                        new.container
                    ]
                    if new.container != waiting:  # cold: the waiter was not ready yet
                        assert not new.pooled
                        expect(output(page, attempt).first).to_contain_text(COLD)
                        current = new.container
                        continue
                    # 5. it runs in the pooled container that waited for it
                    expect(output(page, attempt).first).to_contain_text(POOL_WAITER)
                    labels = docker_client.api.inspect_container(waiting)["Config"]["Labels"]
                    assert labels[POOLED] == "true" and labels[KERNEL_ID] == ""
                    assert labels["io.kernel-sandbox.owner-pid"] == str(server.pid)
                    claimed = new
                    break
                assert claimed is not None, "no restart was served from the pool"
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-pool.png"), full_page=True)

                # 6. `kernel-sandbox stop KERNEL_ID` ends the claimed kernel through the lab,
                # which forgets it (no automatic restart) and says so in the notebook's status
                stop = subprocess.run(
                    [sys.executable, "-m", "kernel_sandbox.cli", "stop", "--direct", kernel],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert stop.returncode == 0, stop.stderr
                assert f"container {claimed.container}): shut down by its owner" in stop.stderr
                wait_for(
                    lambda: not of_kernel(docker_client, server.pid, kernel),
                    "the container to go after the stop",
                    timeout=60,
                )
                wait_for(lambda: kernels(url) == [], "the lab to forget the kernel", timeout=60)
                expect(status(page)).not_to_have_attribute("data-status", "idle", timeout=WAIT)
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-pool-failure.png"))
                raise
            finally:
                browser.close()
        # the pool keeps one waiting until the lab ends
        assert all(s.waiting for s in sandboxes_of(docker_client, server.pid))
    assert not outside, f"the page tried to reach other hosts: {outside}"
    assert_nothing_left(server.pid, "the JupyterLab server", docker_client)

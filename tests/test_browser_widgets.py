"""JupyterLab in a real browser: an ipywidgets slider redraws an inline matplotlib plot.

The analyst's everyday interactive cell, on the sandboxed kernel and the default image:
``ipywidgets.interact`` with a slider over a function that plots with matplotlib. Through the
UI only: run the cell, see the slider and the plot (a PNG from the inline backend), move the
slider with the keyboard as a user can, and see the plot redrawn for the new value. Widgets
need the host's JupyterLab to have the widget manager (``jupyterlab_widgets``, in the test
extra) and the kernel a matching ``ipywidgets``; comm messages cross the sandbox like any
other. Helpers come from ``test_browser``. Screenshot: ``artifacts/jupyterlab-widgets.png``.

The kernel is ``python3-sandbox`` (the default image), or, when ``KS_TEST_KERNEL_IMAGE``
names another tag (a new default image tried out before it becomes :latest), a kernelspec
like it that runs that image.
"""

from __future__ import annotations

import re
import uuid

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from support import IMAGE, IN_CI
from support.kernels import SANDBOX, make_kernelspec
from test_browser import (
    ARTIFACTS,
    WAIT,
    jupyterlab,
    lab_page,
    require_chromium,
    run_cell,
    status,
)
from test_browser_notices import running
from test_image import ANALYST_IMAGE

if not IN_CI:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    pytest.importorskip("jupyterlab_widgets", reason="pip install jupyterlab_widgets (test extra)")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.integration

PLOT = """\
import matplotlib.pyplot as plt
import numpy as np
from ipywidgets import interact

@interact(freq=(1, 5))
def plot(freq=1):
    x = np.linspace(0, 2 * np.pi, 200)
    plt.figure(figsize=(4, 2.5))
    plt.plot(x, np.sin(freq * x))
    plt.title(f"sin({freq}x)")
    plt.show()
    print(f"drawn with freq={freq}")
"""


def test_a_slider_redraws_an_inline_plot(tmp_path, jupyter_path, leak_check, docker_client):
    require_chromium()
    if ANALYST_IMAGE == IMAGE:
        name, display = SANDBOX, "Python 3 (sandboxed)"
    else:
        name = make_kernelspec(f"widgets-{uuid.uuid4().hex[:6]}", {"image": ANALYST_IMAGE})
        display = f"test {name}"
    leak_check.spec(name)
    root = tmp_path / "root"
    root.mkdir()
    nb = new_notebook(
        cells=[new_code_cell(PLOT)],
        metadata={"kernelspec": {"name": name, "display_name": display, "language": "python"}},
    )
    nbformat.write(nb, root / "widgets.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with jupyterlab(root, tmp_path / "lab-state", tmp_path / "jupyterlab.log") as (url, server):
        leak_check.pids.add(server.pid)
        base, token = url.split("?")
        with sync_playwright() as pw:
            browser, page = lab_page(pw, base, outside, height=1000)
            try:
                page.goto(f"{base}/lab/tree/widgets.ipynb?{token}")
                expect(
                    page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")
                ).to_have_text(display, timeout=WAIT)
                expect(status(page)).to_have_attribute("data-status", "idle", timeout=WAIT)
                assert running(docker_client, server.pid), "no sandbox container for the kernel"

                run_cell(page, 0)
                cell = page.locator(".jp-Notebook .jp-Cell").nth(0)
                # the widget manager rendered the slider (not "Loading widget..." or a repr)
                slider = cell.locator(".widget-slider")
                expect(slider).to_be_visible(timeout=WAIT)
                expect(cell.locator(".widget-readout")).to_have_text("1", timeout=WAIT)
                plot = cell.locator(".jp-OutputArea-output img")
                expect(plot).to_have_count(1, timeout=WAIT)
                expect(plot).to_have_attribute("src", re.compile("^data:image/png;base64,"))
                expect(cell).to_contain_text("drawn with freq=1", timeout=WAIT)
                first = plot.get_attribute("src")

                # move the slider as a user can: focus its handle, two steps right
                slider.locator(".noUi-handle").focus()
                page.keyboard.press("ArrowRight")
                page.keyboard.press("ArrowRight")
                expect(cell.locator(".widget-readout")).to_have_text("3", timeout=WAIT)
                expect(cell).to_contain_text("drawn with freq=3", timeout=WAIT)
                expect(cell).not_to_contain_text("drawn with freq=1")
                expect(plot).to_have_count(1, timeout=WAIT)  # redrawn, not appended
                expect(plot).to_have_attribute("src", re.compile("^data:image/png;base64,"))
                assert plot.get_attribute("src") != first, "the plot was not redrawn"
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-widgets.png"), full_page=True)
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-widgets-failure.png"))
                raise
            finally:
                browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    assert (ARTIFACTS / "jupyterlab-widgets.png").stat().st_size > 10_000

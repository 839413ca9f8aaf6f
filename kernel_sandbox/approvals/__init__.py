"""Approvals a person makes where they are: one view of the egress requests that wait.

:mod:`.store` lists and decides the waiting requests of a set of kernels (direct or through
the sandbox service); :mod:`.events` turns changes into Jupyter Events; :mod:`.extension` is
the Jupyter Server extension ``kernel_sandbox.approvals`` (REST, the page, the events; enabled
by installing the package), :mod:`.page` the plain HTML page, :mod:`.mcp` what
``kernel-sandbox mcp`` needs (its own approval page and URL elicitation). The JupyterLab
extension that shows a dialog per request is built from ``labextension/`` into
``kernel_sandbox/approvals/labextension`` and installed with the package.

Importing this package imports nothing of Jupyter Server.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXTENSION"]

EXTENSION = "kernel_sandbox.approvals"
LABEXTENSION = "kernel-sandbox-approvals"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": EXTENSION}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": LABEXTENSION}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from kernel_sandbox.approvals.extension import load

    load(serverapp)


async def _start_jupyter_server_extension(serverapp: Any) -> None:
    from kernel_sandbox.approvals.extension import start

    await start(serverapp)

"""The lockdown: a Jupyter Server extension after which every kernel and terminal the server
starts is sandboxed, whatever a client asks for.

Enable it with ``kernel-sandbox lockdown enable`` (``jupyter server extension list`` then
shows ``kernel_sandbox.lockdown``); configure it with ``c.SandboxLockdown.*``
(:mod:`.config`). :mod:`.kernels` guards the kernel and kernelspec managers,
:mod:`.terminals` runs each terminal's shell in its own container, :mod:`.extension` links
and loads them and refuses to start the server when lockdown cannot hold, :mod:`.report`
tells ``kernel-sandbox doctor`` what a server config leaves open.

Importing this package imports nothing of Jupyter Server: the extension's hooks import it
when the server calls them.
"""

from __future__ import annotations

from typing import Any

from kernel_sandbox.lockdown.config import EXTENSION, SandboxLockdown

__all__ = ["EXTENSION", "SandboxLockdown"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": EXTENSION}]


def _link_jupyter_server_extension(serverapp: Any) -> None:
    from kernel_sandbox.lockdown.extension import link

    link(serverapp)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from kernel_sandbox.lockdown.extension import load

    load(serverapp)

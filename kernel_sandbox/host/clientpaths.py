"""Where clients connect, on the runtime directory's current layout (an interim module).

jupyter_client names every channel's socket ``<ip>-<port>`` from one prefix, so the IOPub
relay's host-only socket and the other channels need one directory: ``<id>/c-<port>`` in the
host-only ``<root>/<id>/``. IOPub's is a hard link to the relay's socket ``<id>/r-<port>``;
every other channel's is a symbolic link to the kernel's socket ``s/k-<port>``. jupyter_client
removes the ``c-`` paths on every restart, so they are made again on every start. Interim: the
runtime directory's layout work replaces the symbolic links with hard links checked at launch
(and this module with it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kernel_sandbox.host.rundir import CHANNELS, RuntimeDir
from kernel_sandbox.inside.contract import SHARED_SUBDIR, SOCKET_PREFIX

__all__ = ["CLIENT_PREFIX", "RELAYED", "client_prefix", "link_channels", "relay_path"]

CLIENT_PREFIX = "c"
RELAY_PREFIX = "r"
RELAYED = ("iopub_port",)  # channels a host-side relay serves at the client path


def client_prefix(runtime_dir: RuntimeDir) -> str:
    """The ``ip`` of the connection info clients get."""
    return str(runtime_dir.path / CLIENT_PREFIX)


def relay_path(runtime_dir: RuntimeDir, port: int) -> str:
    """Where the IOPub relay binds (host-only, never removed by jupyter_client)."""
    return str(runtime_dir.path / f"{RELAY_PREFIX}-{port}")


def link_channels(runtime_dir: RuntimeDir, info: Mapping[str, Any]) -> None:
    """Point every channel but the relayed ones from the client prefix at the kernel's socket
    (dangling until the kernel binds; kept across restarts)."""
    for name in CHANNELS:
        if name in RELAYED:
            continue
        path = Path(f"{info['ip']}-{info[name]}")
        if not path.is_symlink():
            path.unlink(missing_ok=True)
            os.symlink(f"{SHARED_SUBDIR}/{SOCKET_PREFIX}-{info[name]}", path)

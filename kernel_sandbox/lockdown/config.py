"""The lockdown's settings: ``c.SandboxLockdown.*`` in a Jupyter Server config file.

One configurable read once when the extension links to the server; the kernel managers and
the terminal manager get this same instance, so the server has one answer to "what may start".
"""

from __future__ import annotations

from traitlets import Enum, List, Unicode
from traitlets.config import LoggingConfigurable

__all__ = ["EXTENSION", "SandboxLockdown"]

# The import name Jupyter Server enables (`jupyter server extension list` shows it).
EXTENSION = "kernel_sandbox.lockdown"


class SandboxLockdown(LoggingConfigurable):
    """What a locked-down Jupyter Server does with requests for unsandboxed kernels and with
    terminals. Only kernelspecs whose provisioner is ``docker-sandbox`` are listed or started."""

    on_unsandboxed = Enum(
        ["map", "refuse"],
        default_value="map",
        config=True,
        help="A request for a kernel name that is not a sandboxed kernelspec (python3, an "
        "unknown name): 'map' starts the kernelspec named by map_to instead (clients that "
        "hard-code python3 work unchanged); 'refuse' answers 403 (404 for an unknown name), "
        "naming the kernels this server starts.",
    )
    map_to = Unicode(
        "python3-sandbox",
        config=True,
        help="The sandboxed kernelspec started for unsandboxed names (on_unsandboxed 'map'), "
        "for requests that name no kernel, and whose policy terminals get. It must exist and "
        "use the docker-sandbox provisioner, or the server refuses to start.",
    )
    terminals = Enum(
        ["sandboxed", "off"],
        default_value="sandboxed",
        config=True,
        help="'sandboxed': each terminal's shell runs in its own ephemeral container under "
        "map_to's policy (no network, read-only root, the workspace as the policy mounts it, "
        "the same limits and image), removed when the terminal closes; 'off': no terminals.",
    )
    terminal_shell = List(
        Unicode(),
        default_value=["/bin/bash", "-l"],
        config=True,
        help="The shell a sandboxed terminal runs, inside its container (a client's "
        "shell_command is ignored).",
    )
    docker_command = Unicode(
        "docker",
        config=True,
        help="The docker CLI a sandboxed terminal's pty runs (`docker start --attach "
        "--interactive CONTAINER`); it must be on PATH, or the server refuses to start.",
    )

"""The host/container boundary, defined once: both sides import these names from here.

Standard library only (it is copied into the kernel image with the rest of ``inside/``).
Changing a value here changes the contract between the host and every kernel image built
before: rebuild the image (``kernel-sandbox image build``) after changing one.
"""

from __future__ import annotations

__all__ = [
    "CLAIM_SOCKET",
    "CONNECTION_FILE",
    "DATA_SOCKET",
    "DATA_TOKEN",
    "EGRESS_BRIDGE_MODULE",
    "EGRESS_CA_BUNDLE",
    "EGRESS_CONTROL_SOCKET",
    "EGRESS_NOTICE_SOCKET",
    "EGRESS_SOCKET",
    "EXIT_KILLED",
    "HINTS_MODULE",
    "HOST_SOCKETS_MOUNT",
    "HOST_SUBDIR",
    "IMAGE_KIND_KERNEL",
    "KERNEL_UID",
    "LABEL_PREFIX",
    "LIFELINE",
    "NETWORK_ENV",
    "POOL_WAITER_MODULE",
    "RUNTIME_MOUNT",
    "SANDBOX_HOME",
    "SHARED_SUBDIR",
    "SOCKET_PREFIX",
    "WATCHDOG_MODULE",
    "WORKSPACE_FALLBACK",
    "WORKSPACE_NOTE_ENV",
    "label",
]

# -- paths inside the container -------------------------------------------------------------
RUNTIME_MOUNT = "/run/kernel-sandbox"  # the kernel's writable part of its runtime dir
HOST_SOCKETS_MOUNT = "/run/kernel-sandbox-host"  # host-served sockets and files, read-only
SANDBOX_HOME = "/home/sandbox"  # HOME (a size-capped tmpfs)
WORKSPACE_FALLBACK = "/workspace"  # where a workspace goes when its host path cannot be kept
KERNEL_UID = 1000  # the image's default user (uid and gid)

# -- names in a kernel's runtime directory -----------------------------------------------------
# <id>/t/s/ = RUNTIME_MOUNT (read-write): the kernel's ipc sockets and whatever it writes;
# <id>/h/ = HOST_SOCKETS_MOUNT (read-only): what the host serves or gives it (the rest below).
# Images built before the host part existed look for DATA_SOCKET and DATA_TOKEN under
# RUNTIME_MOUNT: the host leaves links there (to HOST_SOCKETS_MOUNT) for them.
SHARED_SUBDIR = "s"  # the kernel's writable part (under the host-only <id>/t/)
HOST_SUBDIR = "h"  # the host-served part of <root>/<id>/
SOCKET_PREFIX = "k"  # ipc sockets are <SOCKET_PREFIX>-<port>
CONNECTION_FILE = "connection.json"  # the container's connection file (container paths)
LIFELINE = "lifeline"  # unix socket the owner serves; the watchdog holds it
DATA_SOCKET = "data.sock"  # the data broker, for this kernel
DATA_TOKEN = "data-token"  # the kernel's data token (a file)
EGRESS_SOCKET = "egress"  # the kernel's egress proxy
EGRESS_NOTICE_SOCKET = "egress-notices"  # denial notices, read by the kernel's extension
EGRESS_CONTROL_SOCKET = "egress-control"  # approvals (host side only, never mounted)
EGRESS_CA_BUNDLE = "egress-ca.pem"  # trust store with the kernel's own CA (egress_secrets)
CLAIM_SOCKET = "claim"  # a pooled sandbox waits here for its claim (kernel_sandbox.host.pool)

# -- in-container entry points the host starts (python -m MODULE ...) ---------------------------
WATCHDOG_MODULE = "kernel_sandbox.inside.watchdog"
EGRESS_BRIDGE_MODULE = "kernel_sandbox.inside.egress_bridge"  # also an IPython extension
POOL_WAITER_MODULE = "kernel_sandbox.inside.pool_waiter"  # a warm pool's sandboxes
HINTS_MODULE = "kernel_sandbox.inside.hints"  # an IPython extension (images built since issue 13)

# -- environment the host sets for the kernel ---------------------------------------------------
NETWORK_ENV = "KERNEL_SANDBOX_NETWORK"  # the policy's network mode, for the hints extension
# Set only when the workspace could not keep its host path: the line the hints extension shows
# in the first cell run (images built before it ignore it).
WORKSPACE_NOTE_ENV = "KERNEL_SANDBOX_WORKSPACE_NOTE"

# -- labels on containers and images ----------------------------------------------------------
LABEL_PREFIX = "io.kernel-sandbox."
IMAGE_KIND_KERNEL = "kernel"  # value of label("image") on images built by `image build`


def label(name: str) -> str:
    """The full label name: ``label("kernel-id") == "io.kernel-sandbox.kernel-id"``."""
    return LABEL_PREFIX + name


# -- exit codes ---------------------------------------------------------------------------------
EXIT_KILLED = 137  # a container killed by SIGKILL, the OOM killer among them (128 + 9)

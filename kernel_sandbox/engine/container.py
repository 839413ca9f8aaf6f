"""One kernel container as the engine sees it: the request, its hardened options, its state.

:class:`ContainerRequest` is everything the provisioner decided; :func:`container_options`
maps it to ``docker.containers.create`` arguments (no network, read-only root, no
capabilities, the seccomp profile, limits from the policy); :class:`ContainerState` is what
the engine says back, and :func:`start_error` words a container that ended while its kernel
started.
No engine calls here: :mod:`kernel_sandbox.engine.backend` makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import docker

from kernel_sandbox.engine.seccomp import security_options
from kernel_sandbox.errors import KernelStartError
from kernel_sandbox.inside.contract import (
    HOST_SOCKETS_MOUNT,
    RUNTIME_MOUNT,
    SANDBOX_HOME,
    WORKSPACE_FALLBACK,
)
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = [
    "RESERVED_PATHS",
    "ContainerRequest",
    "ContainerState",
    "container_options",
    "start_error",
    "workspace_target",
]

# Paths inside the image a workspace must not be mounted over.
RESERVED_PATHS = (
    "/tmp",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/opt",
    "/etc",
    "/run",
    "/var",
    "/proc",
    "/sys",
    "/dev",
    SANDBOX_HOME,
)


def workspace_target(host_path: str) -> str:
    """Where the notebook's directory appears inside: the same path, unless that is reserved."""
    for reserved in RESERVED_PATHS:
        if host_path == reserved or host_path.startswith(reserved + "/"):
            return WORKSPACE_FALLBACK
    return host_path


@dataclass(frozen=True)
class ContainerRequest:
    """Everything needed to start one kernel container, already decided by the provisioner."""

    name: str
    policy: SandboxPolicy
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    runtime_dir: str  # the kernel's writable part (RUNTIME_MOUNT)
    user: str
    workspace: str | None = None
    # Where the workspace appears inside when it differs from ``workspace`` (the sandbox
    # service mounts a staged bind of the caller's folder at the caller's own path).
    workspace_path: str | None = None
    host_dir: str | None = None  # the host-served sockets and files (HOST_SOCKETS_MOUNT, ro)
    # A terminal's shell: a TTY with stdin kept open (for `docker start --attach
    # --interactive`), removed by the engine when the shell ends.
    terminal: bool = False

    @property
    def workdir(self) -> str:
        if self.workspace and self.policy.workspace != "none":
            return workspace_target(self.workspace_path or self.workspace)
        return SANDBOX_HOME


@dataclass(frozen=True)
class ContainerState:
    """What the engine says about a container: running or ended, and how it ended."""

    running: bool
    exit_code: int | None
    oom_killed: bool = False
    error: str = ""


def container_options(request: ContainerRequest) -> dict[str, Any]:
    """Map a request to ``docker.containers.create`` keyword arguments (the hardened defaults)."""
    policy = request.policy
    uid, gid = request.user.split(":")
    tmpfs_opts = f"rw,nosuid,nodev,size={policy.tmpfs_size}"
    volumes: dict[str, dict[str, str]] = {
        request.runtime_dir: {"bind": RUNTIME_MOUNT, "mode": "rw"},
    }
    if request.host_dir:
        # read-only: the kernel may connect to the host's sockets but never unlink, replace or
        # add one (a lifeline of its own would outlive its owner)
        volumes[request.host_dir] = {"bind": HOST_SOCKETS_MOUNT, "mode": "ro"}
    if request.workspace and policy.workspace != "none":
        volumes[request.workspace] = {"bind": request.workdir, "mode": policy.workspace}
    for mount in policy.mounts:
        volumes[mount.source] = {"bind": mount.target, "mode": "ro" if mount.read_only else "rw"}
    options: dict[str, Any] = {
        "image": policy.image,
        "command": request.command,
        "name": request.name,
        "labels": request.labels,
        "environment": request.env,
        "user": request.user,
        "working_dir": request.workdir,
        "hostname": "sandbox",
        "network_mode": "none",
        # Docker would copy in the host's nameservers: their addresses are nobody's business
        # inside, and nothing inside could reach them anyway. Names resolve only on the host.
        "dns": ["127.0.0.1"],
        "read_only": True,
        "cap_drop": ["ALL"],
        # no-new-privileges, and the system call filter (applied by runc; runsc serves the
        # calls itself, see kernel_sandbox/engine/seccomp.py).
        "security_opt": security_options(policy.seccomp),
        "ipc_mode": "private",
        "init": True,
        "pids_limit": policy.pids_limit,
        "mem_limit": policy.memory_limit,
        "memswap_limit": policy.memory_limit,
        "nano_cpus": int(policy.cpu_limit * 1e9),
        "tmpfs": {
            "/tmp": tmpfs_opts,
            SANDBOX_HOME: f"{tmpfs_opts},uid={uid},gid={gid},mode=0700",
        },
        "volumes": volumes,
        "ulimits": [
            docker.types.Ulimit(name="core", soft=0, hard=0),
            # with pids_limit, a bound on the host's file table (pids x nofile handles)
            docker.types.Ulimit(name="nofile", soft=policy.nofile_limit, hard=policy.nofile_limit),
        ],
    }
    if policy.runtime != "runc":
        options["runtime"] = policy.runtime
    if request.terminal:
        options.update(tty=True, stdin_open=True, auto_remove=True)
    return options


def start_error(name: str, image: str, state: ContainerState, logs: str) -> KernelStartError:
    """Build the message for a kernel container that ended while starting."""
    how = (
        "was killed: out of memory" if state.oom_killed else f"exited with status {state.exit_code}"
    )
    tail = "\n".join(logs.splitlines()[-10:]) or "(it printed nothing)"
    return KernelStartError(
        f"kernel container {name} (image {image}) {how} during start. Last log lines:\n{tail}"
    )

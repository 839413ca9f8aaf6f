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
    WORKSPACE_NOTE_ENV,
)
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = [
    "RESERVED_PATHS",
    "ContainerRequest",
    "ContainerState",
    "container_options",
    "start_error",
    "reserved_for",
    "workspace_note",
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


# The size-capped tmpfs of every sandbox: a folder strictly under one keeps its own path (the
# engine makes the mount point in that tmpfs); the other reserved paths are the image's own.
SCRATCH_PATHS = ("/tmp", SANDBOX_HOME)


def reserved_for(host_path: str) -> str | None:
    """The reserved path ``host_path`` is or lies under, if it cannot keep its path inside."""
    for reserved in RESERVED_PATHS:
        if host_path == reserved:
            return reserved
        if host_path.startswith(reserved + "/") and reserved not in SCRATCH_PATHS:
            return reserved
    return None


def workspace_target(host_path: str) -> str:
    """Where the notebook's directory appears inside: the same path (a folder under /tmp
    too, mounted in the sandbox's own /tmp), unless that path is the image's own."""
    return WORKSPACE_FALLBACK if reserved_for(host_path) else host_path


def workspace_note(host_path: str) -> str | None:
    """One line saying why the workspace does not keep its host path inside (None: it does);
    for the kernel's log, ``policy show`` and the notebook (the hints extension)."""
    reserved = reserved_for(host_path)
    if reserved is None:
        return None
    return (
        f"kernel-sandbox: this notebook's folder {host_path} is {WORKSPACE_FALLBACK} inside the "
        f"sandbox ({reserved} is the sandbox's own there), so absolute paths differ: use paths "
        f"relative to the notebook, or keep notebooks outside {reserved}."
    )


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
        "environment": _environment(request),
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


def _environment(request: ContainerRequest) -> dict[str, str]:
    """The request's environment, and the workspace's note when its path cannot be kept."""
    note = None
    if request.workspace and request.policy.workspace != "none":
        note = workspace_note(request.workspace_path or request.workspace)
    return {**request.env, WORKSPACE_NOTE_ENV: note} if note else request.env


# gVisor's sentry runs in the container's cgroup: its own threads count against pids_limit,
# and below about 80 (measured on 2 CPUs; more CPUs, more threads) it cannot boot at all
GVISOR_PIDS_FLOOR = 128


def start_error(
    name: str, image: str, state: ContainerState, logs: str, policy: SandboxPolicy | None = None
) -> KernelStartError:
    """Build the message for a kernel container that ended while starting."""
    how = (
        "was killed: out of memory" if state.oom_killed else f"exited with status {state.exit_code}"
    )
    tail = "\n".join(logs.splitlines()[-10:]) or "(it printed nothing)"
    hint = ""
    if (
        policy is not None
        and policy.runtime == "runsc"
        and not logs.strip()
        and policy.pids_limit < GVISOR_PIDS_FLOOR
    ):
        hint = (
            f"\nUnder runsc, gVisor's own threads count against pids_limit ({policy.pids_limit}"
            f" here) and it cannot start with too few: give pids_limit at least "
            f"{GVISOR_PIDS_FLOOR}"
        )
    return KernelStartError(
        f"kernel container {name} (image {image}) {how} during start. Last log lines:\n{tail}"
        + hint
    )

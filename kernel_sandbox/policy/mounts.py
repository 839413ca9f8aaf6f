"""Mount safety: which host paths a sandbox may see, and where inside it they may go.

Used by every key that exposes a host path (``mounts``, the workspace, local ``datasets``):
a path that would hand the host to the sandbox (the engine's socket, ``/``, ``/etc``, the
home directory as a whole, ...) is refused, after symbolic links are resolved.

Host paths in a policy (a mount's or a local dataset's) are absolute or start with ``~`` (the
host user's home), alike (:func:`host_path`): a kernelspec or config file is read by servers
whatever their working directory, so a relative path there would mean a different folder to
each. On the command line (``install --mount``, ``--dataset``) a relative path is taken from
the current directory and stored absolute.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.inside.contract import HOST_SOCKETS_MOUNT, RUNTIME_MOUNT, SANDBOX_HOME

__all__ = [
    "FORBIDDEN_MOUNTS",
    "FORBIDDEN_TREES",
    "RESERVED_TARGETS",
    "RESERVED_TARGET_TREES",
    "Mount",
    "check_mount_source",
    "check_mount_target",
    "host_path",
    "parse_mount",
    "parse_mounts",
    "resolve_workspace",
    "writable_parent",
]

# Host paths no mount (nor the workspace) may expose as a whole, nor any directory above
# them: they hand over the host. Their subdirectories are fine (except in FORBIDDEN_TREES).
FORBIDDEN_MOUNTS = ("/", "/proc", "/sys", "/dev", "/etc", "/boot", "/root", "/home")
# Host trees nothing inside of which may be mounted: the kernel's interfaces and the engine's state.
FORBIDDEN_TREES = ("/proc", "/sys", "/dev", "/var/lib/docker", "/var/lib/containerd")
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
# Container engine sockets, refused by name wherever they are (rootless engines, podman).
ENGINE_SOCKET_NAMES = ("docker.sock", "containerd.sock", "podman.sock", "dockershim.sock")
# Paths inside the sandbox a mount may not cover, or sit inside: the runtime directory
# (the backend's RUNTIME_MOUNT), the writable tmpfs (/tmp, the backend's SANDBOX_HOME) and
# the kernel's interfaces.
RESERVED_TARGETS = (RUNTIME_MOUNT, HOST_SOCKETS_MOUNT, "/tmp", SANDBOX_HOME)
RESERVED_TARGET_TREES = ("/proc", "/sys", "/dev", RUNTIME_MOUNT, HOST_SOCKETS_MOUNT)


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the sandbox, read-only unless ``read_only`` is False."""

    source: str
    target: str
    read_only: bool = True

    def __str__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        if self.source == self.target:
            return f"{self.source}:{mode}"
        return f"{self.source}:{self.target}:{mode}"


def _within(path: str, tree: str) -> bool:
    """Whether ``path`` is ``tree`` or lies below it (both absolute and normalised)."""
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _engine_sockets() -> list[str]:
    """Where container engine sockets live on this host (DOCKER_HOST's too, read now)."""
    sockets = [os.path.realpath(path) for path in DOCKER_SOCKETS]
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host.startswith("unix://"):
        sockets.append(os.path.realpath(docker_host[len("unix://") :]))
    return sockets


def check_mount_source(key: str, source: str) -> None:
    """Refuse host paths that would hand the host to the sandbox.

    Refused: an engine socket or any directory holding one; ``/``, ``/proc``, ``/sys``,
    ``/dev``, ``/etc``, ``/boot``, ``/root``, ``/home`` and the user's home directory as a
    whole, or any directory above them; anything inside ``/proc``, ``/sys``, ``/dev`` or the
    engine's state. Symbolic links are resolved first.

    Raises:
        PolicyError: naming ``key``, the path and what to do instead.
    """
    try:
        resolved = os.path.realpath(source)
    except OSError as exc:  # e.g. /proc/1/root without the right to follow it
        resolved = os.path.normpath(os.path.abspath(source))
        if not any(_within(resolved, tree) for tree in FORBIDDEN_TREES):
            raise PolicyError(f"{key}: cannot resolve {source}: {exc.strerror}") from None
    for tree in FORBIDDEN_TREES:
        if _within(resolved, tree):
            raise PolicyError(
                f"{key}: refusing to mount {source}: nothing under {tree} may be mounted"
            )
    home = os.path.expanduser("~")
    wholes = [*FORBIDDEN_MOUNTS, *([os.path.realpath(home)] if os.path.isabs(home) else [])]
    for whole in wholes:
        if _within(whole, resolved):
            what = "your home directory" if whole not in FORBIDDEN_MOUNTS else whole
            raise PolicyError(
                f"{key}: refusing to mount {source}: it exposes {what} as a whole; "
                "mount a subdirectory instead"
            )
    if os.path.basename(resolved) in ENGINE_SOCKET_NAMES or any(
        _within(sock, resolved) for sock in _engine_sockets()
    ):
        raise PolicyError(
            f"{key}: refusing to mount {source}: it would hand the sandbox the Docker socket "
            "(the container engine), and with it the host"
        )


def host_path(key: str, path: str, given: object = None) -> str:
    """A host path of a policy, ``~`` expanded and normalised; a relative one is refused.

    Raises:
        PolicyError: naming ``key``, the path and ``given`` (the value it came from).
    """
    expanded = os.path.expanduser(path.strip())
    if not os.path.isabs(expanded):
        within = f" in {given!r}" if given not in (None, path) else ""
        raise PolicyError(
            f"{key}: the host path must be absolute (an absolute path or ~/...), got "
            f"{path!r}{within} "
            "(on the command line a relative path is taken from the current directory)"
        )
    return os.path.normpath(expanded)


def check_mount_target(key: str, target: str) -> str:
    """Normalise a path inside the sandbox; refuse the ones the sandbox itself needs."""
    if not os.path.isabs(target):
        raise PolicyError(f"{key}: the path inside must be absolute, got {target!r}")
    target = os.path.normpath(target)
    for tree in RESERVED_TARGET_TREES:
        if _within(target, tree):
            raise PolicyError(f"{key}: cannot mount at {target}: {tree} belongs to the sandbox")
    for reserved in RESERVED_TARGETS:
        if _within(reserved, target):
            raise PolicyError(
                f"{key}: cannot mount at {target}: it would cover {reserved}, which the sandbox "
                "needs; choose another path inside (e.g. /data/NAME)"
            )
    return target


def parse_mount(value: Any) -> Mount:
    """Parse ``HOST[:TARGET][:ro|rw]`` (or a mapping with source/target/mode) into a Mount.

    HOST may start with ``~`` (the host user's home); TARGET defaults to HOST; the mode
    defaults to ``ro``.

    Raises:
        PolicyError: malformed, relative, forbidden (see check_mount_source) or missing path.
    """
    if isinstance(value, Mount):
        source, target, mode = value.source, value.target, "ro" if value.read_only else "rw"
    elif isinstance(value, Mapping):
        unknown = set(value) - {"source", "target", "mode"}
        if unknown or "source" not in value:
            raise PolicyError(f"mounts: expected keys source, target, mode; got {dict(value)!r}")
        source, mode = str(value["source"]), value.get("mode", "ro")
        target = str(value.get("target") or os.path.expanduser(source))
    elif isinstance(value, str) and value:
        parts = value.split(":")
        if len(parts) > 3:
            raise PolicyError(f"mounts: expected 'HOST[:TARGET][:ro|rw]', got {value!r}")
        mode = "ro"
        if len(parts) == 3 or (len(parts) == 2 and not parts[1].startswith("/")):
            mode = parts.pop()
        source = parts[0]
        target = parts[1] if len(parts) == 2 else os.path.expanduser(source)
    else:
        raise PolicyError(f"mounts: expected 'HOST[:TARGET][:ro|rw]', got {value!r}")
    if mode not in ("ro", "rw"):
        raise PolicyError(f"mounts: the mode must be 'ro' or 'rw', got {mode!r} in {value!r}")
    source = host_path("mounts", source, value)
    check_mount_source("mounts", source)
    if not os.path.exists(source):
        raise PolicyError(f"mounts: host path {source} does not exist")
    # The engine mounts what was checked: symbolic links resolved now, not at start.
    return Mount(os.path.realpath(source), check_mount_target("mounts", target), mode == "ro")


def parse_mounts(value: Any) -> tuple[Mount, ...]:
    """A list of mounts; no two may share a host path or a path inside."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PolicyError(f"mounts: expected a list of 'HOST[:TARGET][:ro|rw]', got {value!r}")
    mounts = tuple(parse_mount(v) for v in value)
    for attribute in ("source", "target"):
        seen = [getattr(m, attribute) for m in mounts]
        twice = sorted({path for path in seen if seen.count(path) > 1})
        if twice:
            raise PolicyError(f"mounts: {', '.join(twice)} appears in more than one mount")
    return mounts


def resolve_workspace(cwd: str | os.PathLike[str] | None) -> str | None:
    """The notebook directory to mount, or None when it is a path no sandbox may see."""
    if cwd is None:
        return None
    path = str(Path(cwd).resolve())
    try:
        check_mount_source("workspace", path)
    except PolicyError:
        return None
    return path


def writable_parent(given: str, resolved: str, writable: list[str]) -> str | None:
    """The kernel-writable folder (one of ``writable``) in which a folder on the path to a
    dataset's root lies, or None.

    A folder the kernel can write is one where it can rename an entry and put a link in its
    place: the dataset's root, or any folder above it, must not be such an entry. Checked:
    every folder on the path as written (``given``, each resolved as it is now, so a link
    into a writable folder counts) and above the resolved root. The root may BE a writable
    folder (a mount point cannot be renamed from inside) or contain one (links inside a
    dataset are never followed out of it).
    """
    trees = [os.path.realpath(w) for w in writable]
    parents: list[str] = []
    for path in (given, resolved):
        if not path or not os.path.isabs(path):
            continue
        names = [p for p in os.path.normpath(path).split("/") if p]
        parents += ["/" + "/".join(names[:i]) for i in range(len(names))]
    for parent in parents:
        real = os.path.realpath(parent)
        for tree in trees:
            if _within(real, tree):
                return tree
    return None

"""What a sandbox may do: one typed, validated, immutable policy, and the named profiles.

A policy is data only. The provisioner builds it (defaults < profile < Jupyter config <
kernelspec config), the backend turns it into container options, and nothing inside the
sandbox can reach it. Every key name here is a public interface: users write them in
config files and kernelspecs (docs/configuration.md is their reference).

Adding a key takes four small steps, and tests/test_policy.py fails until all are done:
a field on SandboxPolicy (its default is the strict one), a branch in ``validate`` that
parses user input into the typed value and raises PolicyError naming the key and the
accepted values, a trait on the provisioner (``_policy_trait``) so Jupyter config can set
it, and a row in docs/configuration.md. Add it to CEILING_KEYS if operators should cap it,
to MERGED_KEYS if it is a mapping merged across layers, and give it a CLI flag in
kernel_sandbox/cli.py (POLICY_FLAGS) if `kernel-sandbox install` should write it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.inside.contract import RUNTIME_MOUNT, SANDBOX_HOME

__all__ = [
    "DEFAULT_IMAGE",
    "Dataset",
    "PROFILES",
    "Mount",
    "SandboxPolicy",
    "parse_dataset",
    "apply_ceilings",
    "display_value",
    "format_size",
    "layer_policy",
    "parse_mount",
    "parse_size",
    "profile_values",
    "validate",
]

DEFAULT_IMAGE = "kernel-sandbox/python:latest"
WORKSPACE_MODES = ("none", "ro", "rw")
NETWORK_MODES = ("none", "allowlist")
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
RESERVED_TARGETS = (RUNTIME_MOUNT, "/tmp", SANDBOX_HOME)
RESERVED_TARGET_TREES = ("/proc", "/sys", "/dev", RUNTIME_MOUNT)
# Below these a Python kernel cannot start; the engine would fail with a less clear message.
MINIMUMS = {
    "memory_limit": 32 * 1024**2,
    "tmpfs_size": 1024**2,
    "pids_limit": 16,
    "cpu_limit": 0.01,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(key: str, value: Any) -> int:
    """Turn "2g", "512m", "64MiB" or a byte count into bytes; name the key when it is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PolicyError(f"{key}: expected a size such as '512m' or '2g', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise PolicyError(f"{key}: expected a size such as '512m' or '2g', got {value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise PolicyError(f"{key}: must be larger than zero, got {value!r}")
    minimum = MINIMUMS.get(key)
    if minimum is not None and size < minimum:
        raise PolicyError(f"{key}: at least {format_size(minimum)} is needed, got {value!r}")
    return size


def format_size(size: int) -> str:
    """Bytes in the form users write: 1073741824 -> "1g", 314572800 -> "300m"."""
    for unit in ("t", "g", "m", "k"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


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
    source = os.path.expanduser(source)
    if not os.path.isabs(source):
        raise PolicyError(f"mounts: the host path must be absolute, got {source!r} in {value!r}")
    source = os.path.normpath(source)
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


def _parse_user(value: Any) -> str | None:
    if value in (None, ""):
        return None
    match = re.fullmatch(r"(\d+)(?::(\d+))?", str(value))
    if not match:
        raise PolicyError(
            f"user: expected 'UID:GID' with numbers (e.g. '1000:1000'), got {value!r}"
        )
    uid, gid = match.group(1), match.group(2) or match.group(1)
    if uid == "0" or gid == "0":
        raise PolicyError(
            "user: the kernel must not run as root (uid or gid 0); use e.g. 1000:1000"
        )
    return f"{uid}:{gid}"


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PolicyError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _positive(key: str, value: Any, kind: type) -> Any:
    what = "a positive whole number" if kind is int else "a positive number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PolicyError(f"{key}: expected {what}, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{key}: expected {what}, got {value!r}") from None
    if not math.isfinite(number) or number <= 0 or (kind is int and number != float(value)):
        raise PolicyError(f"{key}: expected {what}, got {value!r}")
    minimum = MINIMUMS.get(key)
    if minimum is not None and number < minimum:
        raise PolicyError(f"{key}: at least {minimum} is needed, got {value!r}")
    return number


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"env: expected a mapping of NAME to value, got {value!r}")
    for name, text in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise PolicyError(f"env: {name!r} is not a valid environment variable name")
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise PolicyError(f"env: the value of {name} must be text, got {text!r}")
    return {str(k): str(v) for k, v in value.items()}


def _names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PolicyError(f"{key}: expected a list of variable names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise PolicyError(f"{key}: {name!r} is not a valid environment variable name")
    return tuple(dict.fromkeys(value))


def _image(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[\w][\w.:/@+-]*", value.strip()):
        raise PolicyError(f"image: expected an image name such as {DEFAULT_IMAGE!r}, got {value!r}")
    return value.strip()


def _idle_timeout(value: Any) -> int:
    """Seconds (or "30m", "2h") of idleness after which the sandbox ends the kernel; 0: never."""
    if value in (0, "0"):
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        match = None
    else:
        match = _DURATION.match(str(value))
    if match is None:
        raise PolicyError(
            f"idle_timeout: expected seconds or a duration such as '30m' or '2h' (0 disables), "
            f"got {value!r}"
        )
    return int(float(match.group(1)) * _SECONDS[match.group(2).lower()])


# -- datasets served by the data broker (kernel_sandbox.broker), and their tokens' lifetime --

DATASET_ACCESS = ("read", "read-write")
DEFAULT_TOKEN_TTL = 8 * 3600
MAX_TOKEN_TTL = 30 * 24 * 3600
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Dataset:
    """A dataset a kernel may use through the data broker: a local directory or an fsspec
    URL, read-only or read-write. Credentials for a URL stay on the host (never here)."""

    name: str
    source: str
    access: str = "read"

    def __str__(self) -> str:
        return f"{self.name}={self.source}:{self.access}"


def _dataset_source(name: str, source: Any) -> str:
    if not isinstance(source, str) or not source.strip():
        raise PolicyError(
            f"datasets: {name!r}: expected a directory or an fsspec URL, got {source!r}"
        )
    source = source.strip()
    if source.startswith("file://"):
        source = source[len("file://") :]
    if _URL_SCHEME.match(source):
        authority = source.split("://", 1)[1].split("/", 1)[0]
        if "@" in authority or "?" in source:
            raise PolicyError(
                f"datasets: {name!r}: the URL carries credentials or a query; credentials "
                "belong in the host's credentials file or keyring, never in a policy "
                "(see docs/data.md)"
            )
        return source.rstrip("/")
    if not os.path.isabs(source):
        raise PolicyError(
            f"datasets: {name!r}: a local source must be an absolute path, got {source!r}"
        )
    check_mount_source(f"datasets: {name!r}", source)
    if not os.path.isdir(source):
        raise PolicyError(f"datasets: {name!r}: {source} is not a directory on this host")
    return os.path.realpath(source)


def parse_dataset(name: str, value: Any) -> Dataset:
    """One dataset: ``"SOURCE[:read|:read-write]"`` or ``{"source": ..., "access": ...}``."""
    if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name):
        raise PolicyError(
            f"datasets: {name!r} is not a valid dataset name (letters, digits, '_', '.', '-'; "
            "at most 64, not starting with '.', '_' or '-')"
        )
    if isinstance(value, Dataset):
        value = {"source": value.source, "access": value.access}
    if isinstance(value, Mapping):
        unknown = set(value) - {"source", "access"}
        if unknown or "source" not in value:
            raise PolicyError(
                f"datasets: {name!r}: expected keys source and access, got {dict(value)!r}"
            )
        source, access = value["source"], value.get("access", "read")
    elif isinstance(value, str):
        source, access = value, "read"
        head, sep, tail = value.rpartition(":")
        if sep and tail in DATASET_ACCESS:
            source, access = head, tail
        elif sep and head and re.fullmatch(r"[A-Za-z-]+", tail):
            access = tail  # "SOURCE:write": a wrong access, not a path with a colon
    else:
        raise PolicyError(
            f"datasets: {name!r}: expected 'SOURCE[:read|:read-write]', got {value!r}"
        )
    if access not in DATASET_ACCESS:
        raise PolicyError(
            f"datasets: {name!r}: access must be 'read' or 'read-write', got {access!r}"
        )
    return Dataset(name, _dataset_source(name, source), access)


def parse_datasets(value: Any) -> tuple[Dataset, ...]:
    """``{NAME: SOURCE[:access]}``, or a list of ``"NAME=SOURCE[:access]"`` (the CLI's form)."""
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        items: list[tuple[Any, Any]] = []
        for item in value:
            if isinstance(item, Dataset):
                items.append((item.name, item))
            elif isinstance(item, str) and "=" in item:
                items.append(tuple(item.split("=", 1)))  # type: ignore[arg-type]
            else:
                raise PolicyError(
                    f"datasets: expected 'NAME=SOURCE[:read|:read-write]', got {item!r}"
                )
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise PolicyError(
            f"datasets: expected a mapping of NAME to 'SOURCE[:access]', got {value!r}"
        )
    names = [name for name, _ in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PolicyError(f"datasets: {', '.join(map(repr, duplicates))} given more than once")
    return tuple(parse_dataset(name, spec) for name, spec in items)


def parse_duration(key: str, value: Any) -> int:
    """Seconds from 3600, "90s", "15m", "8h" or "1d"; positive and at most 30 days."""
    wrong = PolicyError(
        f"{key}: expected a duration such as 3600, '15m', '8h' or '1d', got {value!r}"
    )
    match = None if isinstance(value, bool) else _DURATION.match(str(value))
    if match is None or not isinstance(value, (int, float, str)):
        raise wrong
    seconds = int(float(match.group(1)) * _SECONDS[match.group(2).lower()])
    if not 0 < seconds <= MAX_TOKEN_TTL:
        raise PolicyError(f"{key}: must be between 1 second and 30 days, got {value!r}")
    return seconds


# -- egress (kernel_sandbox.egress): the host-side proxy decides; this only validates ---------

EGRESS_MODES = ("deny", "ask")
MAX_ASK_TIMEOUT = 3600.0


def _egress_rules(value: Any) -> tuple[str, ...]:
    """Host patterns (``api.corp.test``, ``*.corp.test``, ``data.corp.test:8443``), normalised."""
    from kernel_sandbox.egress.rules import TargetError, parse_rule

    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PolicyError(
            "egress: expected a list of host patterns such as ['api.corp.test', "
            f"'*.corp.test', 'data.corp.test:8443'], got {value!r}"
        )
    try:
        return tuple(dict.fromkeys(str(parse_rule(item)) for item in value))
    except TargetError as exc:
        raise PolicyError(f"egress: {exc}") from None


def _egress_hosts(value: Any) -> dict[str, str]:
    """Names the proxy resolves to fixed addresses: ``{NAME: ADDRESS}`` or ``["NAME=ADDRESS"]``."""
    from kernel_sandbox.egress.rules import TargetError, parse_host_map

    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, str) and "=" in item for item in value):
            raise PolicyError(f"egress_hosts: expected 'NAME=ADDRESS' items, got {value!r}")
        value = dict(item.split("=", 1) for item in value)
    if not isinstance(value, Mapping):
        raise PolicyError(f"egress_hosts: expected a mapping of NAME to IP address, got {value!r}")
    try:
        return parse_host_map(dict(value))
    except TargetError as exc:
        raise PolicyError(f"egress_hosts: {exc}") from None


def _ask_timeout(value: Any) -> float:
    seconds = _positive("egress_ask_timeout", value, float)
    if seconds > MAX_ASK_TIMEOUT:
        raise PolicyError(
            f"egress_ask_timeout: at most {MAX_ASK_TIMEOUT:.0f} seconds, got {value!r}"
        )
    return float(seconds)


@dataclass(frozen=True)
class SandboxPolicy:
    """The whole perimeter of one sandboxed kernel. Defaults are the strict ones."""

    image: str = DEFAULT_IMAGE
    memory_limit: int = 1024**3
    cpu_limit: float = 1.0
    pids_limit: int = 256
    tmpfs_size: int = 256 * 1024**2
    workspace: str = "ro"
    mounts: tuple[Mount, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    env_passthrough: tuple[str, ...] = ()
    runtime: str = "runc"
    network: str = "none"
    egress: tuple[str, ...] = ()
    egress_mode: str = "deny"
    egress_hosts: dict[str, str] = field(default_factory=dict)
    egress_ask_timeout: float = 60.0
    idle_timeout: int = 0
    user: str | None = None
    datasets: tuple[Dataset, ...] = ()
    token_ttl: int = DEFAULT_TOKEN_TTL

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: SandboxPolicy | None = None
    ) -> SandboxPolicy:
        """Validate ``values`` (user input) on top of ``base``; unknown keys are errors."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise PolicyError(
                f"unknown policy key {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(cls.keys())}"
            )
        return dataclasses.replace(base or cls(), **{k: validate(k, v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON-able values, in the same form users write."""
        out = dataclasses.asdict(self)
        out["memory_limit"] = format_size(self.memory_limit)
        out["tmpfs_size"] = format_size(self.tmpfs_size)
        out["mounts"] = [str(m) for m in self.mounts]
        out["env_passthrough"] = list(self.env_passthrough)
        out["datasets"] = {d.name: f"{d.source}:{d.access}" for d in self.datasets}
        return out


def validate(key: str, value: Any) -> Any:
    """Check one user-supplied policy value and return it in its typed form."""
    if key == "image":
        return _image(value)
    if key in ("memory_limit", "tmpfs_size"):
        return parse_size(key, value)
    if key == "cpu_limit":
        return _positive(key, value, float)
    if key == "pids_limit":
        return _positive(key, value, int)
    if key == "idle_timeout":
        return _idle_timeout(value)
    if key == "workspace":
        return _choice(key, value, WORKSPACE_MODES)
    if key == "network":
        return _choice(key, value, NETWORK_MODES)
    if key == "egress":
        return _egress_rules(value)
    if key == "egress_mode":
        return _choice(key, value, EGRESS_MODES)
    if key == "egress_hosts":
        return _egress_hosts(value)
    if key == "egress_ask_timeout":
        return _ask_timeout(value)
    if key == "runtime":
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value):
            raise PolicyError(
                f"runtime: expected an OCI runtime name such as runc or runsc, got {value!r}"
            )
        return value
    if key == "mounts":
        return parse_mounts(value)
    if key == "env":
        return _env(value)
    if key == "env_passthrough":
        return _names(key, value)
    if key == "user":
        return _parse_user(value)
    if key == "datasets":
        return parse_datasets(value)
    if key == "token_ttl":
        return parse_duration(key, value)
    raise PolicyError(f"unknown policy key {key!r}")  # pragma: no cover - guarded by callers


# Named profiles: each is a set of policy values over the strict defaults; "extends" names
# the profile to start from instead. Operators add their own with
# ``c.DockerSandboxProvisioner.profiles`` (built-in names cannot be redefined).
PROFILES: dict[str, dict[str, Any]] = {
    "strict": {},
    "analyst": {
        "workspace": "rw",
        "memory_limit": "4g",
        "cpu_limit": 2.0,
        "pids_limit": 512,
        "tmpfs_size": "1g",
    },
    "educator": {
        "workspace": "rw",
        "memory_limit": "512m",
        "cpu_limit": 0.5,
        "pids_limit": 128,
        "tmpfs_size": "128m",
        "idle_timeout": 3600,
    },
    "ci": {
        "workspace": "ro",
        "memory_limit": "2g",
        "cpu_limit": 1.0,
        "env": {
            "PYTHONHASHSEED": "0",
            "TZ": "UTC",
            "SOURCE_DATE_EPOCH": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        },
    },
    "untrusted": {"extends": "strict", "runtime": "runsc", "workspace": "none"},
}
# Keys whose mapping is merged name by name across layers instead of replaced.
MERGED_KEYS = ("env",)


def profile_values(
    name: str, profiles: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """A profile's own policy values, with the chain of ``extends`` resolved.

    ``profiles`` are the operator's extra profiles, or all of them (built-ins included).

    Raises:
        PolicyError: unknown profile, a redefined built-in, a malformed or circular profile.
    """
    table = {**PROFILES, **(profiles or {})}
    for user_name, values in (profiles or {}).items():
        if user_name in PROFILES and values != PROFILES[user_name]:
            raise PolicyError(
                f"profiles: {user_name!r} is a built-in profile and cannot be redefined; "
                "give yours another name and select it with `profile`"
            )
    chain: list[str] = []
    while True:
        if name not in table:
            raise PolicyError(f"profile: unknown profile {name!r}; known: {', '.join(table)}")
        if name in chain:
            raise PolicyError(f"profiles: {' -> '.join([*chain, name])} extends itself")
        values = table[name]
        if not isinstance(values, Mapping):
            raise PolicyError(
                f"profiles: {name!r} must be a mapping of policy keys, got {values!r}"
            )
        chain.append(name)
        parent = values.get("extends")
        if parent is None:
            break
        name = str(parent)
    merged: dict[str, Any] = {}
    for link in reversed(chain):
        own = {k: v for k, v in table[link].items() if k != "extends"}
        for key in MERGED_KEYS:
            below = merged.get(key)
            if isinstance(own.get(key), Mapping) and isinstance(below, Mapping):
                own[key] = {**below, **own[key]}
        merged.update(own)
    return merged


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


# Keys an operator may cap, and how their values are ordered (a larger rank is looser).
# ``runtime`` is pinned rather than capped: the policy must use exactly that runtime.
CEILING_KEYS = (
    "memory_limit",
    "cpu_limit",
    "pids_limit",
    "tmpfs_size",
    "idle_timeout",
    "workspace",
    "runtime",
)


def _rank(key: str, value: Any) -> Any:
    if key == "workspace":
        return WORKSPACE_MODES.index(value)
    if key == "idle_timeout":
        return math.inf if value == 0 else value  # 0 means "never ends", the loosest
    return value


def _over(key: str, value: Any, cap: Any) -> bool:
    if key == "runtime":
        return bool(value != cap)
    return bool(_rank(key, value) > _rank(key, cap))


def display_value(key: str, value: Any) -> str:
    """One policy value as a person would write it (sizes as "1g", lists comma-separated)."""
    if key in ("memory_limit", "tmpfs_size") and isinstance(value, int):
        return format_size(value)
    if key == "idle_timeout":
        return "0 (never)" if value == 0 else f"{value}s"
    if value is None:
        return "(unset)"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def layer_policy(
    profile: str,
    profiles: Mapping[str, Mapping[str, Any]],
    config_values: Mapping[str, Any],
    spec_values: Mapping[str, Any],
    ceilings: Mapping[str, Any] | None = None,
) -> tuple[SandboxPolicy, dict[str, str]]:
    """Build the effective policy and say where each value came from.

    Precedence, lowest first: built-in defaults < profile < Jupyter config < kernelspec.
    Each layer replaces a key's value, except the keys in MERGED_KEYS (``env``), which are
    merged name by name. ``ceilings`` (operator config only) cap CEILING_KEYS: a value that
    only a default or profile chose is lowered to the ceiling; a value someone set explicitly
    (Jupyter config, kernelspec) above it is an error, so nothing exceeds the operator's cap.

    Raises:
        PolicyError: unknown profile, unknown key, bad value, or a value over its ceiling.
    """
    sources = {key: "default" for key in SandboxPolicy.keys()}
    policy = SandboxPolicy()
    for origin, values in (
        (f"profile {profile}", profile_values(profile, profiles)),
        ("jupyter config", config_values),
        ("kernelspec", spec_values),
    ):
        layer = SandboxPolicy.from_mapping(values, base=policy)
        for key in values:
            below = getattr(policy, key)
            if key in MERGED_KEYS and below:
                layer = dataclasses.replace(layer, **{key: {**below, **getattr(layer, key)}})
                sources[key] = f"{sources[key]} + {origin}"
            else:
                sources[key] = origin
        policy = layer
    return apply_ceilings(policy, sources, ceilings or {})


def apply_ceilings(
    policy: SandboxPolicy, sources: dict[str, str], ceilings: Mapping[str, Any]
) -> tuple[SandboxPolicy, dict[str, str]]:
    """Hold ``policy`` under the operator's ``ceilings`` (see layer_policy)."""
    sources = dict(sources)
    for key, limit in ceilings.items():
        if key not in CEILING_KEYS:
            raise PolicyError(
                f"ceilings: {key!r} cannot be capped; cappable: {', '.join(CEILING_KEYS)}"
            )
        cap = validate(key, limit)
        value = getattr(policy, key)
        if not _over(key, value, cap):
            continue
        origin = sources[key]
        if origin == "default" or origin.startswith("profile "):
            policy = dataclasses.replace(policy, **{key: cap})
            sources[key] = f"ceiling (the {origin} value was {display_value(key, value)})"
            continue
        verb = (
            "differs from the operator's required"
            if key == "runtime"
            else "exceeds the operator's ceiling of"
        )
        raise PolicyError(
            f"{key}: {display_value(key, value)} (from {origin}) {verb} "
            f"{display_value(key, cap)}; lower it or ask the operator to change "
            "c.DockerSandboxProvisioner.ceilings"
        )
    return policy, sources

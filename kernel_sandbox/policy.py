"""What a sandbox may do: one typed, validated, immutable policy, and the named profiles.

A policy is data only. The provisioner builds it (defaults < profile < Jupyter config <
kernelspec config), the backend turns it into container options, and nothing inside the
sandbox can reach it. Every key name here is a public interface: users write them in
config files and kernelspecs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyError

__all__ = [
    "DEFAULT_IMAGE",
    "PROFILES",
    "Mount",
    "SandboxPolicy",
    "parse_mount",
    "parse_size",
]

DEFAULT_IMAGE = "kernel-sandbox/python:latest"
WORKSPACE_MODES = ("none", "ro", "rw")
NETWORK_MODES = ("none", "allowlist")
# Host paths that no mount may expose as a whole: they hand over the host.
FORBIDDEN_MOUNTS = ("/", "/proc", "/sys", "/dev", "/etc", "/boot", "/root", "/home")
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(key: str, value: Any) -> int:
    """Turn "2g", "512m", "64MiB" or a byte count into bytes; name the key when it is wrong."""
    if isinstance(value, bool):
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
    return size


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


def check_mount_source(key: str, source: str) -> None:
    """Refuse host paths that would hand the host to the sandbox."""
    resolved = os.path.realpath(source)
    home = os.path.realpath(os.path.expanduser("~"))
    if resolved in DOCKER_SOCKETS or resolved.endswith("/docker.sock"):
        raise PolicyError(f"{key}: mounting the Docker socket ({source}) would hand over the host")
    if resolved in FORBIDDEN_MOUNTS or resolved == home:
        raise PolicyError(
            f"{key}: refusing to mount {source} as a whole; mount a subdirectory instead"
        )


def parse_mount(value: Any) -> Mount:
    """Parse ``HOST[:TARGET][:ro|rw]`` (or a mapping with source/target/mode) into a Mount."""
    if isinstance(value, Mount):
        mount = value
    elif isinstance(value, Mapping):
        unknown = set(value) - {"source", "target", "mode"}
        if unknown or "source" not in value:
            raise PolicyError(f"mounts: expected keys source, target, mode; got {dict(value)!r}")
        mode = value.get("mode", "ro")
        if mode not in ("ro", "rw"):
            raise PolicyError(f"mounts: mode must be 'ro' or 'rw', got {mode!r}")
        source = str(value["source"])
        mount = Mount(source, str(value.get("target", source)), mode == "ro")
    elif isinstance(value, str):
        parts = value.split(":")
        mode = "ro"
        if parts[-1] in ("ro", "rw") and len(parts) > 1:
            mode = parts.pop()
        if len(parts) > 2 or not parts[0]:
            raise PolicyError(f"mounts: expected HOST[:TARGET][:ro|rw], got {value!r}")
        mount = Mount(parts[0], parts[-1], mode == "ro")
    else:
        raise PolicyError(f"mounts: expected 'HOST[:TARGET][:ro|rw]', got {value!r}")
    for path in (mount.source, mount.target):
        if not os.path.isabs(path):
            raise PolicyError(f"mounts: paths must be absolute, got {path!r} in {value!r}")
    check_mount_source("mounts", mount.source)
    if not os.path.exists(mount.source):
        raise PolicyError(f"mounts: host path {mount.source} does not exist")
    return mount


def _parse_user(value: Any) -> str | None:
    if value in (None, ""):
        return None
    match = re.fullmatch(r"(\d+)(?::(\d+))?", str(value))
    if not match:
        raise PolicyError(f"user: expected 'UID:GID' with numbers (e.g. '1000:1000'), got {value!r}")
    uid, gid = match.group(1), match.group(2) or match.group(1)
    if uid == "0" or gid == "0":
        raise PolicyError("user: the kernel must not run as root (uid or gid 0); use e.g. 1000:1000")
    return f"{uid}:{gid}"


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PolicyError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _positive(key: str, value: Any, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{key}: expected a positive number, got {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise PolicyError(f"{key}: expected a positive number, got {value!r}")
    return number


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise PolicyError(f"env: expected a mapping of NAME to value, got {value!r}")
    for name in value:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise PolicyError(f"env: {name!r} is not a valid environment variable name")
    return {str(k): str(v) for k, v in value.items()}


def _names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PolicyError(f"{key}: expected a list of variable names, got {value!r}")
    return tuple(str(v) for v in value)


# -- egress (kernel_sandbox.egress): the host-side proxy decides; this only validates ---------

EGRESS_MODES = ("deny", "ask")
MAX_ASK_TIMEOUT = 3600.0


def _egress_rules(value: Any) -> tuple[str, ...]:
    """Host patterns (``api.corp.test``, ``*.corp.test``, ``data.corp.test:8443``), normalised."""
    from .egress.rules import TargetError, parse_rule

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
    from .egress.rules import TargetError, parse_host_map

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
        raise PolicyError(f"egress_ask_timeout: at most {MAX_ASK_TIMEOUT:.0f} seconds, got {value!r}")
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

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: SandboxPolicy | None = None) -> SandboxPolicy:
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
        out["mounts"] = [str(m) for m in self.mounts]
        out["env_passthrough"] = list(self.env_passthrough)
        return out


def validate(key: str, value: Any) -> Any:
    """Check one user-supplied policy value and return it in its typed form."""
    if key == "image":
        if not isinstance(value, str) or not value.strip():
            raise PolicyError(f"image: expected an image name such as {DEFAULT_IMAGE!r}, got {value!r}")
        return value.strip()
    if key in ("memory_limit", "tmpfs_size"):
        return parse_size(key, value)
    if key == "cpu_limit":
        return _positive(key, value, float)
    if key == "pids_limit":
        return _positive(key, value, int)
    if key == "idle_timeout":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise PolicyError(f"idle_timeout: expected seconds (0 disables), got {value!r}")
        try:
            seconds = int(value)
        except ValueError:
            raise PolicyError(f"idle_timeout: expected seconds (0 disables), got {value!r}") from None
        if seconds < 0:
            raise PolicyError(f"idle_timeout: expected seconds (0 disables), got {value!r}")
        return seconds
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
            raise PolicyError(f"runtime: expected an OCI runtime name such as runc or runsc, got {value!r}")
        return value
    if key == "mounts":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise PolicyError(f"mounts: expected a list of 'HOST[:TARGET][:ro|rw]', got {value!r}")
        return tuple(parse_mount(v) for v in value)
    if key == "env":
        return _env(value)
    if key == "env_passthrough":
        return _names(key, value)
    if key == "user":
        return _parse_user(value)
    raise PolicyError(f"unknown policy key {key!r}")  # pragma: no cover - guarded by callers


# Named profiles: each is only a set of policy values over the strict defaults.
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
        "env": {"PYTHONHASHSEED": "0", "TZ": "UTC", "SOURCE_DATE_EPOCH": "0"},
    },
    "untrusted": {
        "workspace": "none",
        "runtime": "runsc",
        "memory_limit": "512m",
        "cpu_limit": 1.0,
        "pids_limit": 128,
        "tmpfs_size": "128m",
    },
}


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


CEILING_KEYS = ("memory_limit", "cpu_limit", "pids_limit", "tmpfs_size")


def layer_policy(
    profile: str,
    profiles: Mapping[str, Mapping[str, Any]],
    config_values: Mapping[str, Any],
    spec_values: Mapping[str, Any],
    ceilings: Mapping[str, Any] | None = None,
) -> tuple[SandboxPolicy, dict[str, str]]:
    """Build the effective policy and say where each value came from.

    Precedence, lowest first: built-in defaults < profile < Jupyter config < kernelspec.
    ``ceilings`` (operator config only) cap the numeric limits: a higher value is an error,
    so a kernelspec cannot quietly exceed what the operator allows.

    Raises:
        PolicyError: unknown profile, unknown key, bad value, or a value over its ceiling.
    """
    if profile not in profiles:
        raise PolicyError(f"profile: unknown profile {profile!r}; known: {', '.join(profiles)}")
    sources = {key: "default" for key in SandboxPolicy.keys()}
    policy = SandboxPolicy()
    for origin, values in (
        (f"profile {profile}", profiles[profile]),
        ("jupyter config", config_values),
        ("kernelspec", spec_values),
    ):
        policy = SandboxPolicy.from_mapping(values, base=policy)
        sources.update({key: origin for key in values})
    for key, limit in (ceilings or {}).items():
        if key not in CEILING_KEYS:
            raise PolicyError(f"ceilings: {key!r} cannot be capped; cappable: {', '.join(CEILING_KEYS)}")
        cap = validate(key, limit)
        if getattr(policy, key) > cap:
            raise PolicyError(
                f"{key}: {getattr(policy, key)} (from {sources[key]}) exceeds the operator's "
                f"ceiling of {limit}; lower it or ask the operator to raise the ceiling"
            )
    return policy, sources

"""Policy values: user input (``"2g"``, ``"30m"``, ``"NAME=SOURCE:read"``) into typed values.

Each parser takes what a person writes in a config file, a kernelspec or on the command line
and returns the typed value, or raises PolicyError naming the key and what it accepts. Which
parser serves which key is decided in :mod:`kernel_sandbox.policy.keys`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy.mounts import check_mount_source, host_path

DEFAULT_IMAGE = "kernel-sandbox/python:latest"
WORKSPACE_MODES = ("none", "ro", "rw")
NETWORK_MODES = ("none", "allowlist")
BACKENDS = ("docker", "kubernetes")  # where a sandbox runs (docs/kubernetes.md)
SECCOMP_PROFILES = ("kernel-sandbox", "docker-default")  # or an absolute path to a JSON file

# Below these a Python kernel cannot start; the engine would fail with a less clear message.
MINIMUMS: dict[str, float] = {
    "memory_limit": 32 * 1024**2,
    "tmpfs_size": 1024**2,
    "pids_limit": 16,
    "nofile_limit": 64,
    "cpu_limit": 0.01,
}
# Above these the engine's own arithmetic overflows (CPUs become nanoseconds in an int64).
MAXIMUMS: dict[str, float] = {"cpu_limit": 1_000_000.0, "pids_limit": 2**31 - 1}
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
        raise PolicyError(f"{key}: at least {format_size(int(minimum))} is needed, got {value!r}")
    return size


def format_size(size: int) -> str:
    """Bytes in the form users write: 1073741824 -> "1g", 314572800 -> "300m"."""
    for unit in ("t", "g", "m", "k"):
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def parse_user(value: Any) -> str | None:
    """``UID[:GID]`` (never 0) as ``"UID:GID"``; None or "" leave it unset."""
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


def parse_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``, exactly."""
    if value not in choices:
        raise PolicyError(f"{key}: expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def parse_positive(key: str, value: Any, kind: type) -> Any:
    """A finite number above zero (and above the key's minimum), as ``kind`` (int or float)."""
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
    maximum = MAXIMUMS.get(key)
    if maximum is not None and number > maximum:
        raise PolicyError(f"{key}: at most {maximum:g}, got {value!r}")
    return number


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(value: Any) -> dict[str, str]:
    """A mapping of valid variable names to text (numbers are turned into text)."""
    if not isinstance(value, Mapping):
        raise PolicyError(f"env: expected a mapping of NAME to value, got {value!r}")
    for name, text in value.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise PolicyError(f"env: {name!r} is not a valid environment variable name")
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise PolicyError(f"env: the value of {name} must be text, got {text!r}")
    return {str(k): str(v) for k, v in value.items()}


def parse_names(key: str, value: Any) -> tuple[str, ...]:
    """A list of valid variable names, without repeats, in order."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PolicyError(f"{key}: expected a list of variable names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise PolicyError(f"{key}: {name!r} is not a valid environment variable name")
    return tuple(dict.fromkeys(value))


def parse_image(value: Any) -> str:
    """An image reference (``name[:tag][@digest]``), stripped."""
    if not isinstance(value, str) or not re.fullmatch(r"[\w][\w.:/@+-]*", value.strip()):
        raise PolicyError(f"image: expected an image name such as {DEFAULT_IMAGE!r}, got {value!r}")
    return value.strip()


MAX_POOL_SIZE = 64


def parse_pool_size(value: Any) -> int:
    """How many sandboxes a warm pool keeps started: 0 (off) to MAX_POOL_SIZE."""
    wrong = PolicyError(
        f"pool_size: expected a whole number from 0 (no pool) to {MAX_POOL_SIZE}, got {value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise wrong
    try:
        number = int(str(value).strip())
    except ValueError:
        raise wrong from None
    if not 0 <= number <= MAX_POOL_SIZE:
        raise wrong
    return number


def parse_idle_timeout(value: Any) -> int:
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
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Dataset:
    """A dataset a kernel may use through the data broker: a local directory or an fsspec
    URL, read-only or read-write. Credentials for a URL stay on the host (never here)."""

    name: str
    source: str
    access: str = "read"
    # a local source as written (normalised, links not resolved): the kernel-writable check
    # (policy.mounts.writable_parent) looks at the folders on that path too
    given: str = field(default="", compare=False, repr=False)

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
    if URL_SCHEME.match(source):
        authority = source.split("://", 1)[1].split("/", 1)[0]
        if "@" in authority or "?" in source:
            raise PolicyError(
                f"datasets: {name!r}: the URL carries credentials or a query; credentials "
                "belong in the host's credentials file or keyring, never in a policy "
                "(see docs/data.md)"
            )
        return source.rstrip("/")
    source = host_path(f"datasets: {name!r}", source)
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
    given = ""
    if isinstance(value, Dataset):
        given = value.given
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
    resolved = _dataset_source(name, source)
    if not given and "://" not in resolved:
        given = host_path("datasets", str(source).strip().removeprefix("file://"), value)
    return Dataset(name, resolved, access, given if "://" not in resolved else "")


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


def parse_egress_rules(value: Any) -> tuple[str, ...]:
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


def parse_egress_hosts(value: Any) -> dict[str, str]:
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


def parse_egress_secrets(value: Any) -> dict[str, str]:
    """Host pattern -> ``SOURCE[:HOW]`` (references to credentials on the host, never values):
    ``{PATTERN: SOURCE}`` or ``["PATTERN=SOURCE"]``. Normalised to ``SOURCE:HOW``."""
    from kernel_sandbox.egress.rules import TargetError
    from kernel_sandbox.egress.secrets import parse_secret, parse_secret_item

    try:
        if isinstance(value, (list, tuple)):
            if not all(isinstance(item, str) for item in value):
                raise PolicyError("egress_secrets: expected 'HOST=SOURCE[:HOW]' items")
            value = dict(parse_secret_item(item) for item in value)
        if not isinstance(value, Mapping):
            raise PolicyError(
                "egress_secrets: expected a mapping of host pattern to SOURCE[:HOW], e.g. "
                "{'api.corp.test': 'env:CORP_API_KEY'}"
            )
        specs = [parse_secret(str(pattern), source) for pattern, source in value.items()]
    except TargetError as exc:
        raise PolicyError(f"egress_secrets: {exc}") from None
    return {str(spec.rule): spec.value_text for spec in specs}


def parse_ask_timeout(value: Any) -> float:
    """Seconds above zero, at most MAX_ASK_TIMEOUT."""
    seconds = parse_positive("egress_ask_timeout", value, float)
    if seconds > MAX_ASK_TIMEOUT:
        raise PolicyError(
            f"egress_ask_timeout: at most {MAX_ASK_TIMEOUT:.0f} seconds, got {value!r}"
        )
    return float(seconds)


def parse_runtime(value: Any) -> str:
    """An OCI runtime name (runc, runsc, kata-runtime, ...); whether the engine has it is
    checked at start."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value):
        raise PolicyError(
            f"runtime: expected an OCI runtime name such as runc or runsc, got {value!r}"
        )
    return value


def parse_seccomp(value: Any) -> str:
    """A seccomp profile: ``kernel-sandbox`` (the shipped one), ``docker-default`` (the
    engine's own) or the absolute path of a profile in Docker's JSON format (read at start)."""
    if isinstance(value, str) and (value in SECCOMP_PROFILES or os.path.isabs(value)):
        return value
    raise PolicyError(
        f"seccomp: expected {' or '.join(SECCOMP_PROFILES)} or the absolute path of a JSON "
        f"seccomp profile, got {value!r}"
    )

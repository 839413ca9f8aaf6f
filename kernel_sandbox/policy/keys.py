"""The policy table: every policy key, once, with everything the rest of the code needs.

Adding a key is one :class:`PolicyKey` entry in :data:`POLICY_KEYS` (and a typed field on
:class:`~kernel_sandbox.policy.model.SandboxPolicy`, which a test ties to this table, plus a
row in docs/configuration.md, which a test checks). From the table come:

- validation (:func:`validate`: the key's parser, raising PolicyError that names the key),
- the provisioner's traits (``c.DockerSandboxProvisioner.KEY``, :mod:`~.policy.traits`),
- the ``kernel-sandbox install``/``wrap`` flags (``POLICY_FLAGS`` in kernel_sandbox/cli/policy.py),
- which keys an operator may cap (:data:`CEILING_KEYS`) and which are merged across layers
  (:data:`MERGED_KEYS`), and how a value is shown (:func:`display_value`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy.mounts import Mount, parse_mounts
from kernel_sandbox.policy.values import (
    BACKENDS,
    DEFAULT_IMAGE,
    DEFAULT_TOKEN_TTL,
    EGRESS_MODES,
    NETWORK_MODES,
    WORKSPACE_MODES,
    Dataset,
    format_size,
    parse_ask_timeout,
    parse_choice,
    parse_datasets,
    parse_duration,
    parse_egress_hosts,
    parse_egress_rules,
    parse_egress_secrets,
    parse_env,
    parse_idle_timeout,
    parse_image,
    parse_names,
    parse_pool_size,
    parse_positive,
    parse_runtime,
    parse_seccomp,
    parse_size,
    parse_user,
)

__all__ = [
    "CEILING_KEYS",
    "KEYS",
    "MERGED_KEYS",
    "POLICY_KEYS",
    "Ceiling",
    "Flag",
    "PolicyKey",
    "display_value",
    "validate",
]


@dataclass(frozen=True)
class Flag:
    """The ``kernel-sandbox install``/``wrap`` flag that sets a key (``dest`` ``policy_KEY``)."""

    spelling: str
    metavar: str
    help: str
    repeat: bool = False  # given once per item, collected into a list
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Ceiling:
    """How an operator's ceiling binds a key: a cap on an ordered value, or a pin."""

    rank: Callable[[Any], Any] = lambda value: value  # a larger rank is looser
    pinned: bool = False  # the value must equal the ceiling (``runtime``)

    def exceeded(self, value: Any, cap: Any) -> bool:
        if self.pinned:
            return bool(value != cap)
        return bool(self.rank(value) > self.rank(cap))


CAP = Ceiling()
PIN = Ceiling(pinned=True)


@dataclass(frozen=True)
class PolicyKey:
    """One policy key: its typed form, parser, strict default, ceiling rule, help and flag."""

    name: str
    type: Any  # the typed value's annotation; SandboxPolicy's field has the same
    parse: Callable[[Any], Any]  # user input -> typed value; PolicyError naming the key
    default: Any  # the strict default, typed
    help: str  # the trait's help (``jupyter ... --help-all``)
    ceiling: Ceiling | None = None  # None: operators cannot cap it
    merged: bool = False  # a mapping merged name by name across layers, not replaced
    flag: Flag | None = None  # the generic install/wrap flag, if any
    # A flag another CLI module adds for it (the egress and dataset flags), for the record.
    other_flag: str | None = None
    plain: Callable[[Any], Any] | None = None  # typed -> the form users write (to_dict)
    show: Callable[[Any], str] | None = None  # typed -> what `policy show` prints


def _show_any(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def _show_idle(value: Any) -> str:
    return "0 (never)" if value == 0 else f"{value}s"


def _show_size(value: Any) -> str:
    return format_size(value) if isinstance(value, int) else _show_any(value)


def _workspace_rank(value: Any) -> int:
    return WORKSPACE_MODES.index(value)


def _idle_rank(value: Any) -> float:
    return float("inf") if value == 0 else float(value)  # 0 means "never ends", the loosest


def _mounts_plain(value: tuple[Mount, ...]) -> list[str]:
    return [str(m) for m in value]


def _datasets_plain(value: tuple[Dataset, ...]) -> dict[str, str]:
    return {d.name: f"{d.source}:{d.access}" for d in value}


POLICY_KEYS: tuple[PolicyKey, ...] = (
    PolicyKey(
        "image",
        str,
        parse_image,
        DEFAULT_IMAGE,
        "Kernel image (default kernel-sandbox/python:latest).",
        flag=Flag("--image", "IMAGE", "kernel image (default kernel-sandbox/python:latest)"),
    ),
    PolicyKey(
        "memory_limit",
        int,
        lambda value: parse_size("memory_limit", value),
        1024**3,
        "Memory limit, e.g. '2g'; swap is not allowed beyond it.",
        ceiling=CAP,
        flag=Flag("--memory-limit", "SIZE", "memory limit, e.g. 512m or 4g"),
        plain=format_size,
        show=_show_size,
    ),
    PolicyKey(
        "cpu_limit",
        float,
        lambda value: parse_positive("cpu_limit", value, float),
        1.0,
        "CPUs the kernel may use, e.g. 1.5.",
        ceiling=CAP,
        flag=Flag("--cpu-limit", "CPUS", "CPUs the kernel may use, e.g. 1.5"),
    ),
    PolicyKey(
        "pids_limit",
        int,
        lambda value: parse_positive("pids_limit", value, int),
        256,
        "Maximum number of processes and threads in the sandbox.",
        ceiling=CAP,
        flag=Flag("--pids-limit", "N", "most processes and threads in the sandbox"),
    ),
    PolicyKey(
        "nofile_limit",
        int,
        lambda value: parse_positive("nofile_limit", value, int),
        1024,
        "Open files per process in the sandbox (RLIMIT_NOFILE, soft = hard); with pids_limit "
        "it bounds the host's file handles a kernel can hold (pids_limit x nofile_limit).",
        ceiling=CAP,
        flag=Flag("--nofile-limit", "N", "open files per process in the sandbox"),
    ),
    PolicyKey(
        "tmpfs_size",
        int,
        lambda value: parse_size("tmpfs_size", value),
        256 * 1024**2,
        "Size cap of each writable tmpfs (/tmp and the home directory).",
        ceiling=CAP,
        flag=Flag("--tmpfs-size", "SIZE", "size of the writable /tmp and home, e.g. 256m"),
        plain=format_size,
        show=_show_size,
    ),
    PolicyKey(
        "workspace",
        str,
        lambda value: parse_choice("workspace", value, WORKSPACE_MODES),
        "ro",
        "How the notebook's directory is mounted: none, ro or rw.",
        ceiling=Ceiling(rank=_workspace_rank),
        flag=Flag(
            "--workspace",
            "MODE",
            "how the notebook's directory is mounted: none, ro or rw",
            choices=WORKSPACE_MODES,
        ),
    ),
    PolicyKey(
        "mounts",
        tuple[Mount, ...],
        parse_mounts,
        (),
        "Extra host paths, 'HOST[:TARGET][:ro|rw]' (read-only by default).",
        flag=Flag(
            "--mount",
            "HOST[:TARGET][:ro|rw]",
            "extra host directory, read-only unless :rw (repeatable)",
            repeat=True,
        ),
        plain=_mounts_plain,
    ),
    PolicyKey(
        "env",
        dict[str, str],
        parse_env,
        {},
        "Environment variables to set inside the sandbox.",
        merged=True,
        flag=Flag("--env", "NAME=VALUE", "variable set inside (repeatable)", repeat=True),
    ),
    PolicyKey(
        "env_passthrough",
        tuple[str, ...],
        lambda value: parse_names("env_passthrough", value),
        (),
        "Names of host environment variables allowed in.",
        flag=Flag(
            "--env-passthrough",
            "NAME",
            "host variable allowed in, if set where Jupyter runs (repeatable)",
            repeat=True,
        ),
        plain=list,
    ),
    PolicyKey(
        "runtime",
        str,
        parse_runtime,
        "runc",
        "OCI runtime: runc (default), runsc (gVisor), kata, ...",
        ceiling=PIN,
        flag=Flag("--runtime", "RUNTIME", "OCI runtime: runc (default), runsc (gVisor), ..."),
    ),
    PolicyKey(
        "seccomp",
        str,
        parse_seccomp,
        "kernel-sandbox",
        "System call filter under runc: 'kernel-sandbox' (Docker's default without io_uring, "
        "ptrace, bpf, perf_event_open, ...), 'docker-default', or the absolute path of a JSON "
        "profile in Docker's format.",
        ceiling=PIN,
        flag=Flag(
            "--seccomp",
            "PROFILE",
            "system call filter under runc: kernel-sandbox (default), docker-default or a "
            "JSON file's absolute path",
        ),
    ),
    PolicyKey(
        "network",
        str,
        lambda value: parse_choice("network", value, NETWORK_MODES),
        "none",
        "Network access: 'none' (no interface but loopback) or 'allowlist' (still only "
        "loopback; a host-side proxy lets the egress patterns out).",
        other_flag="--network",
    ),
    PolicyKey(
        "egress",
        tuple[str, ...],
        parse_egress_rules,
        (),
        "With network 'allowlist': host patterns the kernel may reach, e.g. 'api.corp.test', "
        "'*.corp.test', 'data.corp.test:8443' (ports 80 and 443 unless given).",
        other_flag="--egress",
    ),
    PolicyKey(
        "egress_mode",
        str,
        lambda value: parse_choice("egress_mode", value, EGRESS_MODES),
        "deny",
        "Unlisted egress targets: 'deny' (default) or 'ask' a person "
        "(`kernel-sandbox egress pending|approve|deny`).",
        other_flag="--egress-mode",
    ),
    PolicyKey(
        "egress_hosts",
        dict[str, str],
        parse_egress_hosts,
        {},
        "Names the host-side proxy resolves to fixed addresses (NAME -> IP), like a hosts file.",
        other_flag="--egress-host",
    ),
    PolicyKey(
        "egress_ask_timeout",
        float,
        parse_ask_timeout,
        60.0,
        "Seconds an 'ask' request waits for a person before it is denied (default 60).",
        other_flag="--egress-ask-timeout",
    ),
    PolicyKey(
        "egress_secrets",
        dict[str, str],
        parse_egress_secrets,
        {},
        "With network 'allowlist': credentials the host-side proxy adds to requests to a host, "
        "HOST -> 'SOURCE[:HOW]' (SOURCE env:NAME, file:/PATH or keyring:SERVICE/USER on the "
        "host; HOW bearer, basic, header:NAME or query:NAME). The kernel never sees the value.",
        other_flag="--egress-secret",
    ),
    PolicyKey(
        "idle_timeout",
        int,
        parse_idle_timeout,
        0,
        "Seconds (or '30m', '2h') the kernel may sit idle, with no execution and no output, "
        "before the sandbox shuts it down; 0 never.",
        ceiling=Ceiling(rank=_idle_rank),
        flag=Flag(
            "--idle-timeout",
            "SECONDS",
            "shut an idle kernel down after this long, e.g. 3600 or 1h (0 never)",
        ),
        show=_show_idle,
    ),
    PolicyKey(
        "user",
        str | None,
        parse_user,
        None,
        "uid:gid inside the sandbox (default: yours; as root, a uid of its own from "
        "uid_range, or the owner of a read-write workspace).",
        flag=Flag(
            "--run-as",
            "UID:GID",
            "uid:gid inside (default: yours; as root, its own or the rw workspace's owner)",
        ),
    ),
    PolicyKey(
        "datasets",
        tuple[Dataset, ...],
        parse_datasets,
        (),
        "Datasets served by the data broker, NAME -> 'SOURCE[:read|:read-write]' (a host "
        "directory or an fsspec URL; credentials stay on the host, see data_credentials).",
        other_flag="--dataset",
        plain=_datasets_plain,
    ),
    PolicyKey(
        "token_ttl",
        int,
        lambda value: parse_duration("token_ttl", value),
        DEFAULT_TOKEN_TTL,
        "Lifetime of a kernel's data token: seconds, or e.g. '15m', '8h'.",
    ),
    PolicyKey(
        "pool_size",
        int,
        parse_pool_size,
        0,
        "Sandboxes kept started ahead of time for kernels of this policy (a warm pool, "
        "docs/pool.md); 0 turns the pool off.",
        flag=Flag("--pool-size", "N", "keep N sandboxes started ahead (a warm pool; 0 off)"),
    ),
    PolicyKey(
        "pool_max_idle",
        int,
        lambda value: parse_duration("pool_max_idle", value),
        1800,
        "How long a pooled sandbox may wait for a kernel start, and a pool nobody claims "
        "from is kept filled: seconds, or e.g. '30m'.",
        flag=Flag("--pool-max-idle", "SECONDS", "how long pooled sandboxes wait unclaimed"),
    ),
    PolicyKey(
        "backend",
        str,
        lambda value: parse_choice("backend", value, BACKENDS),
        "docker",
        "Where the sandbox runs: 'docker' (a container on this host's engine) or "
        "'kubernetes' (a pod in the namespace the kube_* settings name, docs/kubernetes.md).",
        ceiling=PIN,
        flag=Flag(
            "--backend",
            "BACKEND",
            "where the sandbox runs: docker (default) or kubernetes",
            choices=("docker", "kubernetes"),
        ),
    ),
)

KEYS: dict[str, PolicyKey] = {key.name: key for key in POLICY_KEYS}
# Keys that shape no container (a warm pool's own settings): not part of a pool's recipe.
POOL_KEYS = ("pool_size", "pool_max_idle")
# Keys an operator may cap (``runtime`` is pinned rather than capped).
CEILING_KEYS = tuple(key.name for key in POLICY_KEYS if key.ceiling is not None)
# Keys whose mapping is merged name by name across layers instead of replaced.
MERGED_KEYS = tuple(key.name for key in POLICY_KEYS if key.merged)


def validate(key: str, value: Any) -> Any:
    """Check one user-supplied policy value and return it in its typed form.

    Raises:
        PolicyError: a bad value (naming the key and what it accepts), or an unknown key.
    """
    entry = KEYS.get(key)
    if entry is None:
        raise PolicyError(f"unknown policy key {key!r}")
    return entry.parse(value)


def display_value(key: str, value: Any) -> str:
    """One policy value as a person would write it (sizes as "1g", lists comma-separated)."""
    entry = KEYS.get(key)
    if entry is not None and entry.show is not None:
        return entry.show(value)
    return _show_any(value)

"""The operator's policy file: what each caller of the sandbox service may do.

The service (``kernel-sandbox serve``) reads one TOML file, :data:`DEFAULT_RULES_PATH` unless
told otherwise, and asks it, for each :class:`~kernel_sandbox.service.callers.Caller`, which
profiles, kernelspecs, ceilings, mounts, datasets and egress targets are theirs::

    [everyone]        every local user; starts from the built-in defaults (BUILTIN_DEFAULTS)
    [group.NAME]      members of group NAME (primary or supplementary)
    [user.NAME]       the account NAME
    [datasets]        the datasets the operator defines, NAME = "SOURCE[:read|:read-write]"

How the sections that match a caller combine: the lists (profiles, kernelspecs, mounts,
datasets, egress) are the union of [everyone] and the caller's groups and user section; a
value (a ceiling, max_kernels, max_memory, operator) comes from the most specific section that
sets it: user, else the caller's groups (the most permissive of them; for the pinned runtime
and seccomp, the group whose name sorts first), else [everyone], else the built-in default.
A missing file at the default path means the built-in defaults; anywhere else it is an error.
docs/service.md ("The policy file") is the operator's reference.

API::

    rules = ServiceRules.load(path)          # PolicyError naming the file, section and key
    allowed = rules.for_caller(caller)       # CallerRules: what this caller may do
    allowed.check_profile("analyst")         # each check_* raises ServiceRefused naming
    allowed.check_mount(resolved, "rw")      #   the rule that refused (.rule)
    policy, sources = allowed.apply_ceilings(policy, sources)
    RulesFile(path).current()                # reloaded when the file changes; a malformed
                                             #   new version keeps the last good rules

Pure: no Docker, no sockets; the files it reads are the policy file and, for local datasets
and mount rules, the paths they name.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.egress.rules import parse_rule
from kernel_sandbox.errors import KernelspecError, PolicyError, ServiceRefused
from kernel_sandbox.kernelspec import check_kernel_name
from kernel_sandbox.policy.keys import CEILING_KEYS, KEYS, display_value, validate
from kernel_sandbox.policy.layering import PROFILES
from kernel_sandbox.policy.layering import apply_ceilings as _apply_ceilings
from kernel_sandbox.policy.model import SandboxPolicy
from kernel_sandbox.policy.values import (
    Dataset,
    format_size,
    parse_datasets,
    parse_egress_rules,
    parse_size,
)
from kernel_sandbox.service.callers import Caller

__all__ = [
    "BUILTIN_DEFAULTS",
    "DEFAULT_RULES_PATH",
    "CallerRules",
    "MountRule",
    "RulesFile",
    "ServiceRules",
]

DEFAULT_RULES_PATH = "/etc/kernel-sandbox/service.toml"

# What [everyone] starts from; the file's [everyone] replaces any of these it sets. Ceilings
# not named here are not capped. They leave every built-in profile usable as it is.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "profiles": sorted(PROFILES),
    "kernelspecs": ["*"],
    "mounts": [{"path": "/", "mode": "rw"}],  # anywhere the caller can itself read (write)
    "datasets": [],
    "egress": [],
    "operator": False,
    "max_kernels": 10,
    "max_memory": "16g",
    "memory_limit": "8g",
    "cpu_limit": 2,
    "pids_limit": 1024,
    "nofile_limit": 4096,
    "tmpfs_size": "2g",
}
LIST_KEYS = ("profiles", "kernelspecs", "mounts", "datasets", "egress")
VALUE_KEYS = ("max_kernels", "max_memory", "operator", *CEILING_KEYS)
SECTION_KEYS = (*LIST_KEYS, *VALUE_KEYS)
PLACEHOLDERS = ("home", "user")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_BUILTIN = "built-in defaults"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountRule:
    """A host folder (placeholders expanded, resolved, absolute) a caller may mount, and how."""

    path: str
    mode: str  # "ro" or "rw"
    section: str  # the rule as the file has it: "FILE [group.x] mounts {...}", or built-in
    written: str = field(default="", compare=False)  # the path as written ("{home}")

    def allows(self, path: str, mode: str) -> bool:
        return _within(path, self.path) and (mode == "ro" or self.mode == "rw")


@dataclass(frozen=True)
class _Section:
    label: str  # "[everyone]", "[group.students]", "[user.alice]", or _BUILTIN
    values: dict[str, Any]  # typed
    written: dict[str, Any]  # as written, for messages


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _toml(value: Any) -> str:
    """A value as TOML would write it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


# -- loading: one section at a time, every error naming the file, section and key -------------


def _names(key: str, value: Any, datasets: Mapping[str, Dataset], profiles: set[str]) -> Any:
    """profiles, kernelspecs or datasets: names that must exist, or "*" for any."""
    if isinstance(value, str) or not isinstance(value, list):
        raise PolicyError(f'{key}: expected a list of names (or ["*"]), got {_toml(value)}')
    for name in value:
        if not isinstance(name, str):
            raise PolicyError(f"{key}: expected names, got {_toml(name)}")
        if name == "*":
            continue
        if key == "kernelspecs":
            try:
                check_kernel_name(name)
            except KernelspecError as exc:
                raise PolicyError(f"{key}: {exc}") from None
        known = profiles if key == "profiles" else datasets
        if key != "kernelspecs" and name not in known:
            raise PolicyError(
                f"{key}: {name!r} is not "
                + ("a known profile" if key == "profiles" else "defined in [datasets]")
                + f"; known: {', '.join(sorted(known)) or '(none)'}"
            )
    return tuple(dict.fromkeys(value))


def _mount_rule(value: Any) -> tuple[str, str]:
    if not isinstance(value, Mapping) or set(value) - {"path", "mode"} or "path" not in value:
        raise PolicyError(
            f'mounts: expected tables such as {{ path = "{{home}}", mode = "rw" }}, '
            f"got {_toml(value)}"
        )
    path, mode = value["path"], value.get("mode", "ro")
    if mode not in ("ro", "rw"):
        raise PolicyError(f'mounts: mode must be "ro" or "rw", got {_toml(mode)}')
    if not isinstance(path, str):
        raise PolicyError(f"mounts: path must be text, got {_toml(path)}")
    unknown = [name for name in _PLACEHOLDER.findall(path) if name not in PLACEHOLDERS]
    if unknown or "{" in _PLACEHOLDER.sub("", path) or "}" in _PLACEHOLDER.sub("", path):
        raise PolicyError(
            f"mounts: {_toml(path)}: the placeholders are {{home}} and {{user}}"
            + (f", not {{{unknown[0]}}}" if unknown else "")
        )
    if not os.path.isabs(_PLACEHOLDER.sub("x", path)) and not path.startswith("{home}"):
        raise PolicyError(f"mounts: {_toml(path)} is not an absolute path")
    return path, mode


def _parse_value(key: str, value: Any, datasets: Mapping[str, Dataset], profiles: set[str]) -> Any:
    """One section key's typed value (the key is known)."""
    if key in ("profiles", "kernelspecs", "datasets"):
        return _names(key, value, datasets, profiles)
    if key == "mounts":
        if not isinstance(value, list):
            raise PolicyError(f"mounts: expected a list of tables, got {_toml(value)}")
        return tuple(_mount_rule(item) for item in value)
    if key == "egress":
        return parse_egress_rules(value)
    if key == "operator":
        if not isinstance(value, bool):
            raise PolicyError(f"operator: expected true or false, got {_toml(value)}")
        return value
    if key == "max_kernels":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PolicyError(f"max_kernels: expected a whole number >= 0, got {_toml(value)}")
        return value
    if key == "max_memory":
        return parse_size("max_memory", value)
    return validate(key, value)  # a ceiling, with the policy table's own parser


def _section(
    where: str,
    label: str,
    table: Any,
    datasets: Mapping[str, Dataset],
    profiles: set[str],
) -> _Section:
    if not isinstance(table, Mapping):
        raise PolicyError(f"{where}: {label} must be a table, got {_toml(table)}")
    values = {}
    for key, value in table.items():
        if key not in SECTION_KEYS:
            raise PolicyError(
                f"{where}: {label} {key}: unknown key; known: {', '.join(SECTION_KEYS)}"
            )
        try:
            values[key] = _parse_value(key, value, datasets, profiles)
        except PolicyError as exc:
            detail = str(exc).removeprefix(f"{key}: ")
            raise PolicyError(f"{where}: {label} {key}: {detail}") from None
    return _Section(label, values, dict(table))


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{where}: not valid TOML: {exc}") from None
    raise PolicyError(f"{where}: reading the service's policy file needs Python 3.11 or later")


def _read(path: str) -> tuple[str, os.stat_result]:
    """The file's text, refused unless only its owner (root or this account) can change it."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            data = file.read()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror}") from None
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyError(
            f"{path}: whoever can change this file decides what every user may do; it must be "
            f"owned by root and writable by its owner only (chown root {path}; chmod go-w {path})"
        )
    try:
        return data.decode("utf-8"), info
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None


class ServiceRules:
    """The operator's policy file, parsed and checked; ask it with :meth:`for_caller`."""

    def __init__(
        self,
        path: str | None,
        everyone: _Section | None,
        groups: Mapping[str, _Section],
        users: Mapping[str, _Section],
        datasets: Mapping[str, Dataset],
        info: os.stat_result | None = None,
    ):
        self.path = path  # the file read, None: no file, the built-in defaults
        self.mtime = info.st_mtime if info else None
        self.stamp = _stamp(info)
        self.everyone = everyone
        self.groups = dict(groups)
        self.users = dict(users)
        self.datasets = dict(datasets)
        self.builtin = _section(_BUILTIN, _BUILTIN, BUILTIN_DEFAULTS, {}, set(PROFILES))

    @classmethod
    def load(cls, path: str | None = None, *, profiles: Iterable[str] = ()) -> ServiceRules:
        """Read the policy file at ``path`` (default :data:`DEFAULT_RULES_PATH`).

        ``profiles`` are profile names the service knows besides the built-in ones.

        Raises:
            PolicyError: the file is malformed, unsafe, or a value in it is wrong (naming the
                file, section and key); an explicitly given path that does not exist.
        """
        if path is None and not os.path.lexists(DEFAULT_RULES_PATH):
            return cls(None, None, {}, {}, {})
        path = path or DEFAULT_RULES_PATH
        text, info = _read(path)
        document = _parse_toml(text, path)
        known = {"everyone", "group", "user", "datasets"}
        for name in document:
            if name not in known:
                hint = " (put it in [everyone])" if name in SECTION_KEYS else ""
                raise PolicyError(
                    f"{path}: unknown top-level key {name!r}{hint}; "
                    "expected [everyone], [group.NAME], [user.NAME] and [datasets]"
                )
        try:
            datasets = {d.name: d for d in parse_datasets(document.get("datasets", {}))}
        except PolicyError as exc:
            raise PolicyError(f"{path}: [datasets] {str(exc).removeprefix('datasets: ')}") from None
        names = set(PROFILES) | set(profiles)
        everyone = None
        if "everyone" in document:
            everyone = _section(path, "[everyone]", document["everyone"], datasets, names)
        parts: dict[str, dict[str, _Section]] = {"group": {}, "user": {}}
        for kind, sections in parts.items():
            tables = document.get(kind, {})
            if not isinstance(tables, Mapping):
                raise PolicyError(f"{path}: {kind} must be tables such as [{kind}.NAME]")
            for name, table in tables.items():
                label = f"[{kind}.{_toml(name) if '.' in name or ' ' in name else name}]"
                sections[name] = _section(path, label, table, datasets, names)
        return cls(path, everyone, parts["group"], parts["user"], datasets, info)

    def sections(self) -> list[str]:
        """The sections the file has, in the order they combine."""
        found = ["[everyone]"] if self.everyone else []
        return found + [s.label for s in (*self.groups.values(), *self.users.values())]

    def for_caller(self, caller: Caller) -> CallerRules:
        """What ``caller`` may do: the sections that match them, combined (module docstring)."""
        groups = [self.groups[g] for g in sorted(caller.groups) if g in self.groups]
        user = self.users.get(caller.name)
        picked: dict[str, Any] = {}
        sources: dict[str, tuple[str, ...]] = {}
        for key in SECTION_KEYS:
            base = self.everyone if self.everyone and key in self.everyone.values else None
            if base is None and key in self.builtin.values:
                base = self.builtin
            chain = [s for s in (base, *groups, user) if s is not None and key in s.values]
            if key not in LIST_KEYS:
                chain = _most_specific(key, base, groups, user)
            if chain:
                picked[key] = [(s, s.values[key]) for s in chain]
                sources[key] = tuple(self._rule(s, key) for s in chain)
        return self._combine(caller, picked, sources)

    def _rule(self, section: _Section, key: str, item: Any = None) -> str:
        """How messages name a rule: ``FILE [SECTION] key = value`` (or one item of a list)."""
        shown = f"= {_toml(section.written[key])}" if item is None else _toml(item)
        if section.label == _BUILTIN:
            return f"the built-in default {key} {shown}"
        return f"{self.path} {section.label} {key} {shown}"

    def _combine(
        self, caller: Caller, picked: dict[str, Any], sources: dict[str, tuple[str, ...]]
    ) -> CallerRules:
        def names(key: str, every: Iterable[str] | None = None) -> frozenset[str] | None:
            found = {n for _, values in picked.get(key, []) for n in values}
            if "*" in found:
                return None if every is None else frozenset(every)
            return frozenset(found)

        mounts: dict[tuple[str, str], MountRule] = {}
        for section, rules in picked.get("mounts", []):
            for (written, mode), raw in zip(rules, section.written["mounts"], strict=True):
                path = _expand(written, caller)
                if path is not None and (path, mode) not in mounts:
                    rule = self._rule(section, "mounts", raw)
                    mounts[(path, mode)] = MountRule(path, mode, rule, written)
        granted = names("datasets", self.datasets) or frozenset()
        egress = tuple(dict.fromkeys(e for _, values in picked.get("egress", []) for e in values))
        values = {key: picked[key][0][1] for key in VALUE_KEYS if key in picked}
        return CallerRules(
            caller=caller,
            profiles=names("profiles"),
            kernelspecs=names("kernelspecs"),
            ceilings={key: values[key] for key in CEILING_KEYS if key in values},
            max_kernels=values["max_kernels"],
            max_memory=values["max_memory"],
            mounts=tuple(mounts.values()),
            datasets={name: self.datasets[name] for name in sorted(granted)},
            egress=egress,
            operator=values["operator"],
            sources=sources,
        )

    def describe(self) -> dict[str, Any]:
        """The file and its sections, JSON-safe (for ``doctor``)."""
        return {
            "file": self.path or f"{DEFAULT_RULES_PATH} (absent: the built-in defaults)",
            "sections": self.sections(),
            "datasets": sorted(self.datasets),
        }


def _most_specific(
    key: str, base: _Section | None, groups: list[_Section], user: _Section | None
) -> list[_Section]:
    """The one section whose value of ``key`` applies (see the module docstring)."""
    if user is not None and key in user.values:
        return [user]
    setting = [g for g in groups if key in g.values]  # sorted by group name
    if setting:
        ceiling = KEYS[key].ceiling if key in KEYS else None
        if ceiling is not None and ceiling.pinned:
            return setting[:1]
        rank = ceiling.rank if ceiling is not None else (lambda value: value)
        best = setting[0]
        for group in setting[1:]:
            if rank(group.values[key]) > rank(best.values[key]):
                best = group
        return [best]
    return [base] if base is not None else []


def _expand(written: str, caller: Caller) -> str | None:
    """A mount rule's path for ``caller``: placeholders filled in, links resolved; None when
    the caller's account gives no safe value (a home that is not absolute, or is /)."""
    home = caller.home
    if "{home}" in written and (not os.path.isabs(home) or os.path.normpath(home) == "/"):
        return None
    if "{user}" in written and (caller.name in ("", ".", "..") or "/" in caller.name):
        return None
    path = _PLACEHOLDER.sub(lambda m: home if m.group(1) == "home" else caller.name, written)
    return os.path.realpath(path) if os.path.isabs(path) else None


def _stamp(info: os.stat_result | None) -> tuple[int, ...] | None:
    if info is None:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True)
class CallerRules:
    """What one caller may do; each ``check_*`` raises ServiceRefused naming the rule.

    ``sources`` says, per key, which rule(s) gave the value: one for a value, every
    contributing section for a list (``FILE [group.x] key = value``, or the built-in default).
    """

    caller: Caller
    profiles: frozenset[str] | None  # None: any
    kernelspecs: frozenset[str] | None  # None: any
    ceilings: dict[str, Any]  # typed; for layering.layer_policy / apply_ceilings
    max_kernels: int
    max_memory: int  # bytes
    mounts: tuple[MountRule, ...]
    datasets: dict[str, Dataset]
    egress: tuple[str, ...]
    operator: bool
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def rule(self, key: str) -> str:
        """The rule(s) that set ``key`` for this caller, as messages name them."""
        return " and ".join(self.sources.get(key, ())) or f"the policy file's {key} (unset)"

    def _refuse(self, key: str, reason: str, fix: str = "", rule: str = "") -> ServiceRefused:
        rule = rule or self.rule(key)
        who = self.caller.describe()
        message = f"refused by {rule}: {who} {reason}" + (f"; {fix}" if fix else "")
        return ServiceRefused(message, rule)

    def _check_name(self, key: str, what: str, name: str, allowed: frozenset[str] | None) -> None:
        if allowed is None or name in allowed:
            return
        raise self._refuse(
            key,
            f"may not use the {what} {name!r}",
            f"allowed: {', '.join(sorted(allowed)) or '(none)'}; ask the operator for more",
        )

    def check_profile(self, name: str) -> None:
        self._check_name("profiles", "profile", name, self.profiles)

    def check_kernelspec(self, name: str) -> None:
        self._check_name("kernelspecs", "kernelspec", name, self.kernelspecs)

    def check_mount(self, resolved_path: str, mode: str) -> MountRule:
        """The rule that lets the caller mount ``resolved_path`` (absolute, links already
        resolved by the service) with ``mode``; the most specific one when several do.

        The caller's own right to read (write) the folder is the service's check, not this.

        Raises:
            PolicyError: ``mode`` is not ro or rw, or the path is not absolute and resolved.
            ServiceRefused: no rule allows it.
        """
        if mode not in ("ro", "rw"):
            raise PolicyError(f'mount mode must be "ro" or "rw", got {mode!r}')
        path = resolved_path.rstrip("/") or "/"
        if not os.path.isabs(resolved_path) or os.path.normpath(path) != path:
            raise PolicyError(f"mount: {resolved_path!r} is not an absolute, resolved path")
        allowing = [r for r in self.mounts if r.allows(path, mode)]
        if allowing:
            return max(allowing, key=lambda r: len(r.path))  # the first of the longest
        read_only = [r for r in self.mounts if r.allows(path, "ro")]
        if read_only:
            raise self._refuse(
                "mounts",
                f"may mount {path} read-only only",
                "ask for it with :ro",
                rule=read_only[-1].section,
            )
        folders = ", ".join(f"{r.path} ({r.mode})" for r in self.mounts) or "(none)"
        raise self._refuse(
            "mounts",
            f"may not mount {path}: it is not at or under a folder they may mount ({folders})",
            "mount a folder inside one of those, or ask the operator",
        )

    def check_datasets(self, names: Iterable[str]) -> tuple[Dataset, ...]:
        """The operator's definitions of the datasets ``names`` asks for, by name."""
        found = []
        for name in names:
            if name not in self.datasets:
                raise self._refuse(
                    "datasets",
                    f"may not use the dataset {name!r}",
                    f"granted: {', '.join(self.datasets) or '(none)'}",
                )
            found.append(self.datasets[name])
        return tuple(found)

    def check_egress(self, patterns: Iterable[str]) -> None:
        """Each requested egress pattern must lie within one of the caller's patterns.

        Raises:
            PolicyError: a malformed pattern.
            ServiceRefused: a pattern reaching beyond the caller's allowlist.
        """
        allowed = [parse_rule(p) for p in self.egress]
        for pattern in parse_egress_rules(list(patterns)):
            asked = parse_rule(pattern)
            if not any(rule.covers(asked) for rule in allowed):
                raise self._refuse(
                    "egress",
                    f"may not let a kernel reach {pattern}",
                    f"allowed: {', '.join(self.egress) or '(none)'}",
                )

    def check_count(self, live_kernels: int, live_memory: int, new_memory: int) -> None:
        """One more kernel of ``new_memory`` bytes, beside ``live_kernels`` holding
        ``live_memory`` bytes (their memory_limit), within max_kernels and max_memory?"""
        if live_kernels >= self.max_kernels:
            raise self._refuse(
                "max_kernels",
                f"already has {live_kernels} live kernel{'s' * (live_kernels != 1)}",
                "stop one (kernel-sandbox ps / stop)",
            )
        if live_memory + new_memory > self.max_memory:
            raise self._refuse(
                "max_memory",
                f"has {format_size(live_memory) if live_memory else 'no'} memory in "
                f"{live_kernels} live kernel{'s' * (live_kernels != 1)}, and this one asks for "
                f"{format_size(new_memory)} more",
                "stop one (kernel-sandbox ps / stop) or ask for less (memory_limit)",
            )

    def apply_ceilings(
        self, policy: SandboxPolicy, sources: dict[str, str]
    ) -> tuple[SandboxPolicy, dict[str, str]]:
        """Hold ``policy`` under this caller's ceilings, as layering.apply_ceilings does
        (values only a default or profile chose are lowered), but refusing with the rule.

        Raises:
            ServiceRefused: a value set explicitly (config, kernelspec) over a ceiling.
        """
        for key, cap in self.ceilings.items():
            try:
                policy, sources = _apply_ceilings(policy, sources, {key: cap})
            except PolicyError:
                value, origin = getattr(policy, key), sources.get(key, "?")
                ceiling = KEYS[key].ceiling
                pinned = ceiling is not None and ceiling.pinned
                raise self._refuse(
                    key,
                    f"asks for {key} {display_value(key, value)} (from {origin}), "
                    + ("which differs from it" if pinned else "over this ceiling"),
                    f"use {display_value(key, cap)}" + ("" if pinned else " or less"),
                ) from None
        return policy, sources

    def describe(self) -> dict[str, Any]:
        """JSON-safe: what the caller may do and which rule says so (no credentials)."""

        def names(found: frozenset[str] | None) -> list[str] | str:
            return "*" if found is None else sorted(found)

        return {
            "caller": {
                "name": self.caller.name,
                "uid": self.caller.uid,
                "groups": sorted(self.caller.groups),
            },
            "profiles": names(self.profiles),
            "kernelspecs": names(self.kernelspecs),
            "ceilings": {k: display_value(k, v) for k, v in self.ceilings.items()},
            "max_kernels": self.max_kernels,
            "max_memory": format_size(self.max_memory),
            "mounts": [{"path": m.path, "mode": m.mode, "rule": m.section} for m in self.mounts],
            "datasets": {
                d.name: {"source": d.source, "access": d.access} for d in self.datasets.values()
            },
            "egress": list(self.egress),
            "operator": self.operator,
            "sources": {key: list(rules) for key, rules in self.sources.items()},
        }


class RulesFile:
    """The policy file as a running service sees it: re-read when it changes (its inode,
    size, mtime or ctime), the last good rules kept (and the error logged once) when a new
    version is malformed. Not thread-safe; the service asks from its one event loop."""

    def __init__(
        self,
        path: str | None = None,
        *,
        profiles: Iterable[str] = (),
        logger: logging.Logger | None = None,
    ):
        self.path = path
        self.profiles = tuple(profiles)
        self.log = logger or log
        self.rules = ServiceRules.load(path, profiles=self.profiles)  # a bad file: no start
        self.stamp = self.rules.stamp
        self.error: str | None = None  # why the newest version was not taken

    def current(self) -> ServiceRules:
        """The rules in force, re-read first if the file changed."""
        try:
            stamp = _stamp(os.stat(self.path or DEFAULT_RULES_PATH))
        except OSError:
            stamp = None
        if stamp == self.stamp:
            return self.rules
        self.stamp = stamp
        try:
            self.rules = ServiceRules.load(self.path, profiles=self.profiles)
        except PolicyError as exc:
            self.error = str(exc)
            self.log.error("keeping the previous service policy: %s", exc)
            return self.rules
        self.error = None
        self.stamp = self.rules.stamp
        self.log.info("service policy reloaded from %s", self.rules.path or "built-in defaults")
        return self.rules

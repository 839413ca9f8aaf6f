"""The sandbox's seccomp profile: Docker's default, minus what a notebook kernel never needs.

Under runc every system call of the kernel goes to the host's Linux kernel, so the seccomp
filter decides how much of it a hostile notebook can reach. Docker's default profile (engine
20.10) is a good base but allows ``io_uring_setup`` and ``ptrace``, which the host kernel then
grants without any capability. :data:`REFUSED` names what this profile removes from *every*
rule of Docker's default, and why; :func:`derive` applies it. The result is shipped as
``seccomp.json`` next to this module (package data, reviewable) and regenerated with::

    python -m kernel_sandbox.engine.seccomp tests/data/docker-seccomp-default-v20.10.24.json \\
        kernel_sandbox/engine/seccomp.json

(the input is ``profiles/seccomp/default.json`` of moby/moby at tag v20.10.24, the engine's
version here; a unit test re-derives the shipped file from it).

The rule for choosing: remove a call outright when the host kernel lets an unprivileged process
use it, so that seccomp is its only gate, and no notebook workload needs it. Calls the host
kernel itself allows only with a capability (mount, unshare of most namespaces, sethostname,
module loading, ...) stay as Docker has them: Docker grants them only to containers holding
that capability, and the sandbox holds none (``cap_drop: ALL``, no policy key adds one).

Under runsc (gVisor) Docker's profile does not filter the kernel's calls: they are served by
gVisor's Sentry (which implements no io_uring unless started with ``--iouring``), and runsc
applies an OCI seccomp profile only with ``--oci-seccomp``. See docs/threat-model.md.
"""

from __future__ import annotations

import copy
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import PolicyError

__all__ = [
    "ALREADY_REFUSED",
    "DOCKER_DEFAULT",
    "KERNEL_SANDBOX",
    "REFUSED",
    "derive",
    "load_profile",
    "security_options",
]

KERNEL_SANDBOX = "kernel-sandbox"  # the shipped profile (the default)
DOCKER_DEFAULT = "docker-default"  # the engine's own default profile

# What this profile removes from every rule of Docker's default, with the reason.
REFUSED: dict[str, str] = {
    "io_uring_setup": "io_uring: a large, fast-moving kernel interface behind many local "
    "privilege escalations; allowed by Docker 20.10 to every container. Python, NumPy, pandas "
    "and Jupyter do not use it; libraries that try it (libuv, liburing) fall back on an error.",
    "io_uring_enter": "io_uring (see io_uring_setup); useless without a ring.",
    "io_uring_register": "io_uring (see io_uring_setup); useless without a ring.",
    "ptrace": "allowed by Docker on kernels >= 4.8 without CAP_SYS_PTRACE, so the kernel could "
    "trace PID 1 (tini) and the watchdog. pdb and IPython's %debug do not use it; gdb, strace, "
    "ltrace and py-spy inside the sandbox stop working (debug them from the host instead).",
    "process_vm_readv": "reads another process's memory; Docker allows it only with "
    "CAP_SYS_PTRACE (never held here): removed outright so no capability brings it back.",
    "process_vm_writev": "writes another process's memory; as process_vm_readv.",
    "kcmp": "compares kernel objects of two processes (a KASLR and fd-probing aid); as "
    "process_vm_readv.",
    "pidfd_getfd": "steals a file descriptor from another process; as process_vm_readv.",
    "process_madvise": "advises on another process's memory; as process_vm_readv.",
    "bpf": "eBPF verifier and maps, a recurring source of kernel exploits, and allowed "
    "unprivileged by hosts with kernel.unprivileged_bpf_disabled=0; Docker allows it only "
    "with CAP_SYS_ADMIN: removed outright.",
    "perf_event_open": "perf events, a recurring source of kernel exploits and side "
    "channels, allowed unprivileged by hosts with a low kernel.perf_event_paranoid; Docker "
    "allows it only with CAP_SYS_ADMIN: removed outright.",
}

# Already absent from Docker's default (refused); derive() checks they stay absent.
ALREADY_REFUSED: dict[str, str] = {
    "userfaultfd": "stalls kernel page-fault handling at will, the classic race-widening tool",
    "keyctl": "kernel keyrings are not namespaced: keys would be shared with the host's uid",
    "add_key": "as keyctl",
    "request_key": "as keyctl",
}


def derive(default: dict[str, Any]) -> dict[str, Any]:
    """This project's profile from Docker's default: every name in :data:`REFUSED` taken out of
    every rule (a rule left with no names is dropped); everything else is kept as it is.

    Raises:
        ValueError: ``default`` does not look like Docker's profile, or allows a call of
            :data:`ALREADY_REFUSED` (a newer upstream: review it before shipping).
    """
    if default.get("defaultAction") != "SCMP_ACT_ERRNO" or not default.get("syscalls"):
        raise ValueError("not Docker's default seccomp profile (defaultAction SCMP_ACT_ERRNO)")
    profile = copy.deepcopy(default)
    rules = []
    for rule in profile["syscalls"]:
        allowed = rule.get("action") == "SCMP_ACT_ALLOW"
        reopened = sorted(set(rule["names"]) & set(ALREADY_REFUSED)) if allowed else []
        if reopened:
            raise ValueError(f"the input profile allows {', '.join(reopened)}: review it")
        names = [name for name in rule["names"] if name not in REFUSED]
        if names:
            rules.append({**rule, "names": names})
    profile["syscalls"] = rules
    return profile


def _shipped() -> str:
    return resources.files(__package__).joinpath("seccomp.json").read_text(encoding="utf-8")


def load_profile(setting: str) -> str | None:
    """The profile JSON text for the ``seccomp`` policy value, or None for the engine's default.

    Raises:
        PolicyError: a profile file that cannot be read or is not a JSON object.
    """
    if setting == DOCKER_DEFAULT:
        return None
    if setting == KERNEL_SANDBOX:
        text = _shipped()
    else:
        try:
            text = Path(setting).read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(
                f"seccomp: cannot read the profile {setting}: {exc.strerror}; give a readable "
                f"JSON file, or '{KERNEL_SANDBOX}' (default) or '{DOCKER_DEFAULT}'"
            ) from exc
    try:
        profile = json.loads(text)
    except ValueError as exc:
        raise PolicyError(f"seccomp: {setting} is not valid JSON: {exc}") from exc
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise PolicyError(
            f"seccomp: {setting} is not a seccomp profile (a JSON object with defaultAction, "
            "in Docker's format)"
        )
    return json.dumps(profile, separators=(",", ":"))


def security_options(setting: str) -> list[str]:
    """Docker ``security_opt`` values: no-new-privileges always, and the chosen profile."""
    profile = load_profile(setting)
    options = ["no-new-privileges"]
    if profile is not None:
        options.append(f"seccomp={profile}")
    return options


def main(argv: list[str]) -> int:
    """Regenerate the shipped profile: ``python -m kernel_sandbox.engine.seccomp IN [OUT]``."""
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    default = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    text = json.dumps(derive(default), indent="\t") + "\n"
    if len(argv) == 2:
        Path(argv[1]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

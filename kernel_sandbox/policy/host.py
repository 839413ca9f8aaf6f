"""What this host can give a sandbox: a policy the engine would refuse is refused first.

The engine refuses a ``cpu_limit`` above the CPUs it has ("Range of CPUs is from 0.01 to
2.00") only when the container is created, where it reads as a kernel that failed to start.
Checked here instead, as the policy is worked out (:func:`kernel_sandbox.policy.layering.
layer_policy`), it is a :class:`~kernel_sandbox.errors.PolicyError` that ``install`` and
``doctor`` report and that ``kernel-sandbox run`` counts as a setup error.

A seccomp profile file is read at each start; :func:`check_host_files` reads it now, for
``install`` and ``doctor`` (run as the user who will start the kernels; the sandbox service does
not open files a policy names on a caller's behalf).

Like the operator's ceilings, the host holds a value only a default, a profile or a ceiling
chose down to what it has (the ``analyst`` profile's 2 CPUs on a 1-CPU machine become 1), and
refuses one set explicitly (Jupyter config, kernelspec) above it.
"""

from __future__ import annotations

import dataclasses
import os

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = ["apply_host_limits", "check_host_files", "host_cpus"]


def host_cpus() -> int | None:
    """The CPUs of the machine the engine runs on, or None when it runs elsewhere.

    The engine (``docker info`` NCPU) counts the CPUs of its host; a ``DOCKER_HOST`` that is
    not a unix socket names another machine, whose CPUs this one cannot count.
    """
    docker_host = os.environ.get("DOCKER_HOST", "")
    if docker_host and not docker_host.startswith("unix://"):
        return None
    return os.cpu_count()


def _cpus(count: int) -> str:
    return f"{count} CPU{'s' * (count != 1)}"


def apply_host_limits(
    policy: SandboxPolicy, sources: dict[str, str], cpus: int | None
) -> tuple[SandboxPolicy, dict[str, str]]:
    """Hold ``policy`` to a host of ``cpus`` CPUs (None: unknown, nothing is checked).

    Raises:
        PolicyError: a ``cpu_limit`` set explicitly above ``cpus``.
    """
    if not cpus or policy.cpu_limit <= cpus:
        return policy, sources
    origin = sources.get("cpu_limit", "default")
    if origin == "default" or origin.startswith(("profile ", "ceiling")):
        lowered = dict(sources)
        lowered["cpu_limit"] = f"host ({_cpus(cpus)}; the {origin} value was {policy.cpu_limit:g})"
        return dataclasses.replace(policy, cpu_limit=float(cpus)), lowered
    raise PolicyError(
        f"cpu_limit: {policy.cpu_limit:g} (from {origin}) is more than this host's "
        f"{_cpus(cpus)}, which the Docker engine refuses; give at most {cpus}"
    )


def check_host_files(policy: SandboxPolicy) -> None:
    """Refuse now a seccomp profile file the start would refuse (unreadable, not a profile).

    Raises:
        PolicyError: naming the file and what is wrong with it.
    """
    from kernel_sandbox.engine.seccomp import load_profile

    if os.path.isabs(policy.seccomp):
        load_profile(policy.seccomp)

"""What a kernel's container is started with: its labels, its environment, its command.

Pure functions of the provisioner's settings; ``docker_provisioner`` calls them on every start.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.inside.contract import (
    HOST_SOCKETS_MOUNT,
    LIFELINE,
    SANDBOX_HOME,
    WATCHDOG_MODULE,
)
from kernel_sandbox.inside.contract import label as prefixed
from kernel_sandbox.policy.model import SandboxPolicy
from kernel_sandbox.policy.mounts import writable_parent

__all__ = [
    "check_datasets_not_writable",
    "check_exposure",
    "container_env",
    "container_labels",
    "with_watchdog",
]


def container_labels(kernel_id: str, kernelspec: str, profile: str, runtime_dir: str) -> dict:
    """The labels by which ``kernel-sandbox ps``/``gc`` and the orphan sweep find a sandbox
    and tell whose it is."""
    values = {
        "managed": "true",
        "kernel-id": kernel_id,
        "kernelspec": kernelspec,
        "profile": profile,
        "owner": getpass.getuser(),
        "owner-uid": str(os.getuid()),
        "owner-pid": str(os.getpid()),
        "owner-start": Owner.current().start or "",
        "owner-host": socket.gethostname(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime-dir": runtime_dir,
    }
    return {prefixed(k): v for k, v in values.items()}


# Thread pools that size themselves by the host's CPUs, not the container's cpu_limit: on a
# big host they would start dozens of threads (each counts against pids_limit) for a kernel
# allowed one or two CPUs. numpy's BLAS, pyarrow and numexpr read these.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def container_env(
    host_env: Mapping[str, str],
    allowed: Iterable[str],
    spec_env: Mapping[str, str],
    policy_env: Mapping[str, str],
    cpu_limit: float | None = None,
) -> dict[str, str]:
    """Deny by default: only the kernelspec's env, the policy's env and allowlisted names;
    thread pools sized to ``cpu_limit`` unless one of those says otherwise."""
    threads = str(max(1, int(cpu_limit))) if cpu_limit else None
    env = {name: threads for name in THREAD_VARIABLES} if threads else {}
    env.update({k: host_env[k] for k in allowed if k in host_env})
    env.update({k: host_env.get(k, v) for k, v in spec_env.items()})
    env.update(policy_env)
    # A sandbox's own uid has no entry in the image's /etc/passwd: getpass.getuser() reads
    # LOGNAME first (a fixed name, nothing of the host's).
    env.setdefault("LOGNAME", "sandbox")
    env.update(
        {
            "HOME": SANDBOX_HOME,
            "LANG": env.get("LANG", "C.UTF-8"),
            "TINI_KILL_PROCESS_GROUP": "1",
            "KERNEL_SANDBOX": "1",
        }
    )
    return env


def with_watchdog(argv: list[str], orphan_timeout: float) -> list[str]:
    """Run ``argv`` under the in-sandbox watchdog, which ends it ``orphan_timeout`` seconds
    after the owner's lifeline broke."""
    return [
        "python",
        "-m",
        WATCHDOG_MODULE,
        f"{HOST_SOCKETS_MOUNT}/{LIFELINE}",
        str(orphan_timeout),
        "--",
        *argv,
    ]


def check_exposure(policy: SandboxPolicy, broker_files: Sequence[str], kernelspec: str) -> None:
    """No mount or dataset may expose the data broker's own state or the host's credentials.

    ``broker_files``: the token database and audit log (their directories are protected) and
    the credentials file ("" when there is none).

    Raises:
        PolicyError: a mount or local dataset contains one of them.
    """
    token_db, audit_log, credentials = broker_files
    protected = [os.path.dirname(os.path.abspath(p)) for p in (token_db, audit_log)]
    if credentials:
        protected.append(os.path.abspath(credentials))
    exposed = [m.source for m in policy.mounts]
    exposed += [d.source for d in policy.datasets if "://" not in d.source]
    for source in exposed:
        real = os.path.realpath(source)
        for path in protected:
            if path == real or path.startswith(real.rstrip("/") + "/"):
                raise PolicyError(
                    f"kernelspec {kernelspec}: {source} would expose {path}, the data broker's "
                    "tokens, audit log or credentials; mount or serve another directory"
                )


def check_datasets_not_writable(
    policy: SandboxPolicy, workspace: str | None, runtime_root: str, kernelspec: str
) -> None:
    """No local dataset may lie in a host folder the kernel can write.

    There the kernel could rename the dataset's folder (or a folder above it) and put a link
    to any host folder in its place. The broker never follows it (the root is pinned when
    the kernel is granted it), but a dataset the kernel can swap is one nobody can trust, and
    a later start would resolve the link: so it is refused before any container starts.
    Writable here: ``rw`` mounts, the workspace (``workspace``, the notebook's directory)
    when the policy mounts it ``rw``, and the runtime directories under ``runtime_root``.

    Raises:
        PolicyError: naming the dataset, the writable folder and what to change.
    """
    writable = [(m.source, "a read-write mount") for m in policy.mounts if not m.read_only]
    if workspace and policy.workspace == "rw":
        writable.append((workspace, "its read-write workspace (the notebook's directory)"))
    writable.append((runtime_root, "the sandboxes' runtime directories"))
    for dataset in policy.datasets:
        if "://" in dataset.source:
            continue
        for folder, what in writable:
            tree = writable_parent(dataset.given, dataset.source, [folder])
            if tree is None:
                continue
            where = dataset.given or dataset.source
            raise PolicyError(
                f"kernelspec {kernelspec}: dataset {dataset.name!r} ({where}) "
                f"lies inside {tree}, which the kernel can write ({what}): it could replace the "
                "dataset's folder with a link to any host folder. Move the dataset out of it, "
                "or make that folder read-only for the kernel (workspace 'ro' or 'none', a "
                "mount ':ro')"
            )

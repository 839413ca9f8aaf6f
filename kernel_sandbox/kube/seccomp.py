"""The project's seccomp profile on Kubernetes nodes: a ``Localhost`` profile.

A pod's ``seccompProfile: RuntimeDefault`` is the container runtime's default profile, which
allows io_uring and ptrace of one's own children; the Docker path's profile
(``kernel_sandbox/engine/seccomp.json``) refuses both. Kubernetes can only point a pod at a
profile file *on the node* (``type: Localhost``, a path relative to the kubelet's seccomp root,
``/var/lib/kubelet/seccomp`` by default), so the operator installs the very same file on every
node (``kernel-sandbox kube seccomp-profile --install``, or a DaemonSet copying its output) and
sets ``kube_seccomp_profile`` to its relative path. A pod naming a profile its node lacks does
not start: the kubelet reports "cannot load seccomp profile", which the start reports at once.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from kernel_sandbox.engine.seccomp import DOCKER_DEFAULT
from kernel_sandbox.errors import PolicyError

__all__ = [
    "KUBELET_SECCOMP_ROOT",
    "LOCALHOST_PROFILE",
    "RUNTIME_DEFAULT",
    "check_setting",
    "install_profile",
    "node_copy",
    "pod_seccomp",
    "profile_text",
]

RUNTIME_DEFAULT = "RuntimeDefault"
# where the project's profile goes, relative to the kubelet's seccomp root (the suggested value
# of kube_seccomp_profile)
LOCALHOST_PROFILE = "kernel-sandbox/seccomp.json"
# the kubelet's seccomp root: --seccomp-profile-root's default in 1.20 (<root-dir>/seccomp
# from 1.23 on, the same directory with the default --root-dir)
KUBELET_SECCOMP_ROOT = "/var/lib/kubelet/seccomp"
INSTALL_HINT = (
    "install the profile on every node (`kernel-sandbox kube seccomp-profile --install` "
    f"writes {KUBELET_SECCOMP_ROOT}/{LOCALHOST_PROFILE}), or set "
    f"c.DockerSandboxProvisioner.kube_seccomp_profile = '{RUNTIME_DEFAULT}'"
)


def profile_text() -> str:
    """The profile file's text: byte for byte the Docker path's ``engine/seccomp.json``."""
    return resources.files("kernel_sandbox.engine").joinpath("seccomp.json").read_text("utf-8")


def check_setting(value: str) -> str:
    """``kube_seccomp_profile`` checked: ``RuntimeDefault``, or a relative path below the
    kubelet's seccomp root (what the API server accepts as ``localhostProfile``).

    Raises:
        PolicyError: an empty, absolute or escaping path.
    """
    if value == RUNTIME_DEFAULT:
        return value
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or value.endswith("/"):
        raise PolicyError(
            f"kube_seccomp_profile: expected '{RUNTIME_DEFAULT}' or a file's path relative to "
            f"the kubelet's seccomp root (e.g. '{LOCALHOST_PROFILE}'), got {value!r}"
        )
    return value


def pod_seccomp(setting: str, policy_seccomp: str) -> dict[str, Any]:
    """The pod's ``seccompProfile``: the node's copy of the project's profile when
    ``kube_seccomp_profile`` names one, else the runtime's default. A policy asking for the
    engine's own profile (``seccomp: docker-default``) gets the runtime's default either way.
    """
    if check_setting(setting) == RUNTIME_DEFAULT or policy_seccomp == DOCKER_DEFAULT:
        return {"type": RUNTIME_DEFAULT}
    return {"type": "Localhost", "localhostProfile": setting}


def install_profile(root: str = KUBELET_SECCOMP_ROOT, name: str = LOCALHOST_PROFILE) -> Path:
    """Write the profile to ``root``/``name`` on this machine (a node), atomically, mode 0644.

    Raises:
        PolicyError: ``name`` is not a valid relative path.
        OSError: the directory cannot be made or written (not root?).
    """
    target = Path(root) / check_setting(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".seccomp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(profile_text())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def node_copy(name: str, root: str = KUBELET_SECCOMP_ROOT) -> str | None:
    """The state of this machine's copy of profile ``name``: "same", "differs" or "missing";
    None when this machine is no node (no kubelet seccomp root here)."""
    if not Path(root).is_dir():
        return None
    try:
        text = (Path(root) / name).read_text(encoding="utf-8")
    except OSError:
        return "missing"
    return "same" if text == profile_text() else "differs"

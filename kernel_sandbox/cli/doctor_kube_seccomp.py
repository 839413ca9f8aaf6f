"""``doctor``'s seccomp check for kernelspecs that start pods: which profile their pods get
(``kube_seccomp_profile``), and, on a machine that is a node itself, whether its copy of the
project's profile is there and current. The other nodes' files are out of its sight: the
operator installs the profile on each (``kernel-sandbox kube seccomp-profile --install``).
"""

from __future__ import annotations

from traitlets.config import Config

from kernel_sandbox.cli.checks import FAIL, OK, WARN, Check
from kernel_sandbox.kube.seccomp import (
    INSTALL_HINT,
    KUBELET_SECCOMP_ROOT,
    RUNTIME_DEFAULT,
    node_copy,
)

__all__ = ["check_seccomp"]

AREA = "kubernetes"
INSTALL = "kernel-sandbox kube seccomp-profile --install (on every node)"


def _profiles(config: Config) -> dict[str, list[str]]:
    """kube_seccomp_profile -> the kernelspecs whose pods get it."""
    from kernel_sandbox.cli.doctor_kube import kube_kernelspecs

    profiles: dict[str, list[str]] = {}
    for name, prov, _policy in kube_kernelspecs(config):
        profiles.setdefault(prov.kube_seccomp_profile, []).append(name)
    return profiles


def check_seccomp(config: Config, root: str = KUBELET_SECCOMP_ROOT) -> list[Check]:
    """One check per seccomp profile the pods of this machine's kernelspecs get (``root``:
    the kubelet's seccomp root, when this machine is a node)."""
    checks = []
    for profile, specs in _profiles(config).items():
        names = ", ".join(specs)
        if profile == RUNTIME_DEFAULT:
            checks.append(
                Check(
                    AREA,
                    "seccomp",
                    WARN,
                    f"pods of {names} get RuntimeDefault, the runtime's default profile, which "
                    "allows io_uring and ptrace (the project's profile refuses both)",
                    f"{INSTALL}, then kube_seccomp_profile = 'kernel-sandbox/seccomp.json'",
                )
            )
            continue
        state = node_copy(profile, root)
        where = f"pods of {names} use the nodes' {profile} (Localhost)"
        if state is None:
            checks.append(
                Check(AREA, "seccomp", OK, f"{where}; every node must have it", INSTALL_HINT)
            )
        elif state == "same":
            checks.append(Check(AREA, "seccomp", OK, f"{where}; this node's copy is current"))
        else:
            checks.append(
                Check(
                    AREA,
                    "seccomp",
                    FAIL,
                    f"{where}; this node's copy is {state} (its pods would not start, or run "
                    "under another profile)",
                    INSTALL,
                )
            )
    return checks

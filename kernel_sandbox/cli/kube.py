"""``kernel-sandbox kube``: what a Kubernetes node needs from this project.

``kube seccomp-profile`` prints the project's seccomp profile (the very file the Docker path
uses) or, with ``--install``, writes it below the kubelet's seccomp root on this machine, where
pods with ``kube_seccomp_profile`` set find it (:mod:`kernel_sandbox.kube.seccomp`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kernel_sandbox.cli.console import EXIT_OK, done
from kernel_sandbox.kube.seccomp import (
    KUBELET_SECCOMP_ROOT,
    LOCALHOST_PROFILE,
    install_profile,
    profile_text,
)

__all__ = ["add_kube_command"]


async def cmd_seccomp_profile(args: argparse.Namespace, backend: Any) -> int:
    if not args.install:
        sys.stdout.write(profile_text())
        return EXIT_OK
    target = install_profile(args.root, args.name)
    done(
        f"installed {target}; pods find it with "
        f"c.DockerSandboxProvisioner.kube_seccomp_profile = '{args.name}'"
    )
    return EXIT_OK


def add_kube_command(commands: Any) -> None:
    """Register ``kernel-sandbox kube seccomp-profile`` on the CLI's subparsers."""
    kube = commands.add_parser("kube", help="what Kubernetes nodes need (the seccomp profile)")
    actions = kube.add_subparsers(dest="kube_command", required=True, metavar="ACTION")
    seccomp = actions.add_parser(
        "seccomp-profile",
        help="print the seccomp profile, or install it on this node (--install)",
        description="The project's seccomp profile (the same JSON the Docker path applies), "
        "for pods' seccompProfile type Localhost. Without --install it is printed (e.g. for "
        "a ConfigMap a DaemonSet copies onto every node); with --install it is written to "
        "ROOT/NAME on this machine, a node of the cluster.",
    )
    seccomp.add_argument(
        "--install", action="store_true", help="write it on this node instead of printing it"
    )
    seccomp.add_argument(
        "--root",
        default=KUBELET_SECCOMP_ROOT,
        help=f"the kubelet's seccomp root (default {KUBELET_SECCOMP_ROOT}: its "
        "--seccomp-profile-root, or <root-dir>/seccomp from Kubernetes 1.23)",
    )
    seccomp.add_argument(
        "--name",
        default=LOCALHOST_PROFILE,
        help=f"path below the root, the value of kube_seccomp_profile (default "
        f"{LOCALHOST_PROFILE})",
    )
    seccomp.set_defaults(func=cmd_seccomp_profile)

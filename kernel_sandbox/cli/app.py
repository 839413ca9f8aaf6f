"""The ``kernel-sandbox`` command: build images, install kernelspecs, look after sandboxes.

A thin layer: each command parses its flags, calls the library once through
``asyncio.run`` and turns errors into a one-line message and an exit code
(0 success, 1 failure, 2 usage or setup error).

Commands live beside the part of the library they drive and register themselves with one
call in :func:`build_parser` (``add_X_command(commands)``); this module only assembles them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from kernel_sandbox import __version__
from kernel_sandbox.cli.doctor import add_doctor_command
from kernel_sandbox.cli.egress import (
    add_egress_command,
    add_egress_install_flags,
    egress_install_policy,
    with_egress_policy,
)
from kernel_sandbox.cli.policy import (
    add_install_location,
    add_install_options,
    add_policy_command,
    add_policy_flags,
    add_wrap_command,
    install_custom,
    wants_custom_install,
)
from kernel_sandbox.cli.run import add_run_command
from kernel_sandbox.cli.sandboxes import add_gc_command, add_ps_command, add_stop_command
from kernel_sandbox.cli.tokens import add_tokens_command, install_with_datasets
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import ImageBuildError, SandboxError
from kernel_sandbox.image.build import (
    DEFAULT_BASE,
    LOCAL_BASE,
    build_base_image,
    build_kernel_image,
)
from kernel_sandbox.kernelspec import shipped_kernelspecs
from kernel_sandbox.policy import DEFAULT_IMAGE

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
err = Console(stderr=True, highlight=False)


def _progress(prefix: str) -> Callable[[str], None]:
    def show(line: str) -> None:
        err.print(f"[dim]{prefix}[/dim] {escape(line)}", markup=True, soft_wrap=True)

    return show


# -- commands -------------------------------------------------------------------------------


async def cmd_image_base(args: argparse.Namespace) -> int:
    await build_base_image(
        DockerBackend(),
        tag=args.tag,
        suite=args.suite,
        mirror=args.mirror,
        force=args.force,
        progress=_progress("base"),
    )
    return EXIT_OK


async def cmd_image_build(args: argparse.Namespace) -> int:
    await build_kernel_image(
        DockerBackend(),
        base=args.base,
        tag=args.tag,
        binder=args.binder,
        force=args.force,
        progress=_progress("build"),
        mirror=args.mirror,
    )
    return EXIT_OK


async def cmd_install(args: argparse.Namespace) -> int:
    user = args.user
    prefix = sys.prefix if args.sys_prefix else args.prefix
    egress = egress_install_policy(args)
    if wants_custom_install(args):
        extra = {**egress, **({"datasets": list(args.dataset)} if args.dataset else {})}
        return install_custom(args, extra)
    for shipped in shipped_kernelspecs():
        with with_egress_policy(shipped, egress) as source:
            where = install_with_datasets(source, args.dataset, user=user, prefix=prefix)
        err.print(f"installed kernelspec {source.name} in {where}")
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kernel-sandbox",
        description="Run Jupyter kernels in ephemeral, network-less containers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    install = commands.add_parser(
        "install",
        help="install python3-sandbox, or a sandboxed kernelspec with a policy",
        description="Without --name, --profile or policy flags: install the kernelspecs that "
        "come with kernel-sandbox, so that `jupyter kernelspec list` shows python3-sandbox. "
        "With them: write one Python kernelspec with that policy, e.g. `kernel-sandbox install "
        "--profile educator --name course-101 --display-name 'Course 101' --mount "
        "/srv/course:ro`. The policy is checked first, with the Jupyter config, exactly as "
        "the kernel's start will check it.",
    )
    add_install_options(install, "default python3-sandbox-PROFILE")
    add_install_location(install)
    add_policy_flags(install)
    add_egress_install_flags(install)  # --network allowlist --egress ... (egress_cli.py)
    install.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=SOURCE[:read|:read-write]",
        help="grant the kernels a dataset through the data broker (repeatable)",
    )
    install.set_defaults(func=cmd_install)

    image = commands.add_parser("image", help="build the kernel image or a local base image")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_commands.add_parser(
        "build",
        help=f"build the kernel image ({DEFAULT_IMAGE})",
        description="Build the kernel image from an environment spec in repo2docker's formats "
        "(requirements.txt, apt.txt). Wheels and Debian packages are downloaded on the host; "
        "the build itself has no network.",
    )
    build.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help=f"base image with Python (default {DEFAULT_BASE}; without a "
        f"registry use {LOCAL_BASE} from `kernel-sandbox image base`)",
    )
    build.add_argument("--tag", default=DEFAULT_IMAGE, help="tag of the image to build")
    build.add_argument(
        "--binder",
        type=Path,
        default=None,
        help="environment folder (default: the binder/ shipped with kernel-sandbox)",
    )
    build.add_argument(
        "--mirror",
        default=None,
        help="Debian mirror URL for apt.txt packages (default: the one in this "
        "machine's apt sources)",
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if the image is up to date"
    )
    build.set_defaults(func=cmd_image_build)

    base = image_commands.add_parser(
        "base",
        help=f"create {LOCAL_BASE} with debootstrap (no registry needed)",
        description="Create a minimal Debian base image with Python from this machine's apt "
        "mirror, for air-gapped sites. Needs root and debootstrap.",
    )
    base.add_argument("--tag", default=LOCAL_BASE, help="tag of the base image")
    base.add_argument("--suite", default="bookworm", help="Debian release (default bookworm)")
    base.add_argument(
        "--mirror",
        default=None,
        help="Debian mirror URL (default: the one in this machine's apt sources)",
    )
    base.add_argument("--force", action="store_true", help="rebuild even if the tag exists")
    base.set_defaults(func=cmd_image_base)
    add_wrap_command(commands)  # kernel-sandbox wrap (kernel_sandbox/policy_cli.py)
    add_policy_command(commands)  # kernel-sandbox policy show|profiles (policy_cli.py)
    add_doctor_command(commands)  # kernel-sandbox doctor (kernel_sandbox/doctor.py)
    add_ps_command(commands)  # kernel-sandbox ps (kernel_sandbox/sandboxes.py)
    add_stop_command(commands)  # kernel-sandbox stop (kernel_sandbox/sandboxes.py)
    add_gc_command(commands)  # kernel-sandbox gc (kernel_sandbox/sandboxes.py)
    add_run_command(commands)  # kernel-sandbox run (kernel_sandbox/run_cli.py)
    add_tokens_command(commands)  # kernel-sandbox tokens (kernel_sandbox/data_cli.py)
    add_egress_command(commands)  # kernel-sandbox egress (kernel_sandbox/egress_cli.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.func
    try:
        return asyncio.run(command(args))
    except ImageBuildError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, soft_wrap=True)
        return EXIT_FAILED
    except SandboxError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130

"""``kernel-sandbox image build|base``: build the kernel image, or a local base image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kernel_sandbox.cli.console import EXIT_OK, UsageError, done, progress
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.image.build import (
    DEFAULT_BASE,
    LOCAL_BASE,
    MINIMAL_IMAGE,
    build_base_image,
    build_kernel_image,
    minimal_binder_dir,
)
from kernel_sandbox.policy import DEFAULT_IMAGE

__all__ = ["add_image_command"]


async def cmd_image_base(args: argparse.Namespace, backend: DockerBackend) -> int:
    built = await build_base_image(
        backend,
        tag=args.tag,
        suite=args.suite,
        mirror=args.mirror,
        force=args.force,
        progress=progress("base"),
    )
    done(f"built {args.tag}" if built else f"{args.tag} already exists")
    return EXIT_OK


async def cmd_image_build(args: argparse.Namespace, backend: DockerBackend) -> int:
    if args.binder is not None and not Path(args.binder).is_dir():
        what = "is not a folder" if Path(args.binder).exists() else "does not exist"
        raise UsageError(f"--binder {args.binder} {what}: give the environment folder")
    if args.minimal:
        tag, binder = args.tag or MINIMAL_IMAGE, minimal_binder_dir()
    else:
        tag, binder = args.tag or DEFAULT_IMAGE, args.binder
    built = await build_kernel_image(
        backend,
        base=args.base,
        tag=tag,
        binder=binder,
        force=args.force,
        progress=progress("build"),
        mirror=args.mirror,
    )
    done(f"built {tag}" if built else f"{tag} is up to date")
    return EXIT_OK


def add_image_command(commands: Any) -> None:
    """Register ``kernel-sandbox image build|base`` on the CLI's subparsers."""
    image = commands.add_parser("image", help="build the kernel image or a local base image")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_commands.add_parser(
        "build",
        help=f"build the kernel image ({DEFAULT_IMAGE}, or --minimal)",
        description="Build the kernel image from an environment spec in repo2docker's formats "
        "(requirements.txt, apt.txt). Wheels and Debian packages are downloaded on the host; "
        f"the build itself has no network. The default, {DEFAULT_IMAGE}, has the analyst's "
        "common stack (numpy, pandas with pyarrow for CSV and Parquet, matplotlib, ipywidgets); "
        f"--minimal builds {MINIMAL_IMAGE} with ipykernel and fsspec only.",
    )
    build.add_argument(
        "--base",
        default=DEFAULT_BASE,
        help=f"base image with Python (default {DEFAULT_BASE}; without a "
        f"registry use {LOCAL_BASE} from `kernel-sandbox image base`)",
    )
    build.add_argument(
        "--tag",
        default=None,
        help=f"tag of the image to build (default {DEFAULT_IMAGE}; with --minimal {MINIMAL_IMAGE})",
    )
    spec = build.add_mutually_exclusive_group()
    spec.add_argument(
        "--binder",
        type=Path,
        default=None,
        help="environment folder (default: the binder/ shipped with kernel-sandbox, the "
        "analyst's stack)",
    )
    spec.add_argument(
        "--minimal",
        action="store_true",
        help=f"build the minimal image instead ({MINIMAL_IMAGE}, from binder/minimal/): "
        "ipykernel and fsspec, without numpy, pandas, pyarrow, matplotlib or ipywidgets; "
        "about 220 MB against 655 MB. A kernelspec or profile selects it with the policy key "
        f"image ({MINIMAL_IMAGE})",
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

"""The ``kernel-sandbox`` command: build images, install kernelspecs, look after sandboxes.

A thin layer: each command parses its flags, calls the library through one ``asyncio.run``
and returns an exit code; an error it raises becomes one ``error:`` line and the exit code
of :data:`kernel_sandbox.cli.console.EXIT_CODES` (0 success, 1 failure, 2 usage or setup
error, 130 interrupted).

Every command is ``async def cmd_X(args, backend) -> int``. :func:`main` hands each the one
:class:`~kernel_sandbox.engine.backend.DockerBackend` (which connects only when a command
first uses it), or the one a test passes in. Commands live in a module per group and
register themselves with one call in :func:`build_parser` (``add_X_command(commands)``);
this module only assembles them.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

from kernel_sandbox import __version__
from kernel_sandbox.cli.audit import add_audit_command
from kernel_sandbox.cli.console import EXIT_USAGE, err, exit_code_for, report_error
from kernel_sandbox.cli.doctor import add_doctor_command
from kernel_sandbox.cli.egress import add_egress_command
from kernel_sandbox.cli.image import add_image_command
from kernel_sandbox.cli.install import add_install_command, add_wrap_command
from kernel_sandbox.cli.kube import add_kube_command
from kernel_sandbox.cli.lockdown import add_lockdown_command
from kernel_sandbox.cli.mcp import add_mcp_command
from kernel_sandbox.cli.policy import add_policy_command
from kernel_sandbox.cli.run import add_run_command
from kernel_sandbox.cli.sandboxes import add_gc_command, add_ps_command, add_stop_command
from kernel_sandbox.cli.serve import add_serve_command
from kernel_sandbox.cli.tokens import add_tokens_command
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["Command", "build_parser", "main"]

Command = Callable[[argparse.Namespace, DockerBackend], Awaitable[int]]


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

    add_install_command(commands)
    add_image_command(commands)
    add_wrap_command(commands)
    add_policy_command(commands)
    add_doctor_command(commands)
    add_ps_command(commands)
    add_stop_command(commands)
    add_gc_command(commands)
    add_run_command(commands)
    add_tokens_command(commands)
    add_egress_command(commands)
    add_lockdown_command(commands)
    add_serve_command(commands)
    add_mcp_command(commands)
    add_audit_command(commands)
    add_kube_command(commands)
    return parser


async def _run(command: Command, args: argparse.Namespace, backend: DockerBackend | None) -> int:
    if backend is not None:
        return await command(args, backend)
    own = DockerBackend()  # no connection until a command uses it
    try:
        return await command(args, own)
    finally:
        own.close()


def main(argv: Sequence[str] | None = None, backend: DockerBackend | None = None) -> int:
    """Run one ``kernel-sandbox`` command; return its exit code.

    ``backend`` is the engine the commands use (a test can hand in its own); by default a
    :class:`DockerBackend` made here and closed when the command ends.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return asyncio.run(_run(args.func, args, backend))
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code_for(exc)
        if code is None:
            raise  # not an error of ours: a bug, shown with its traceback
        if isinstance(exc, KeyboardInterrupt):
            err.print("interrupted")
        else:
            report_error(exc)
        return code

"""The ``kernel-sandbox`` command line: one module per command group, assembled in :mod:`.app`."""

from kernel_sandbox.cli.app import build_parser, main

__all__ = ["build_parser", "main"]

"""``kernel-sandbox run``: execute notebooks for CI, each in its own fresh sandboxed kernel.

The command line, the progress display (live on a terminal, plain lines otherwise), the
summary and the exit code (:func:`exit_code`, through the CLI's one table); the work is done
by :mod:`kernel_sandbox.batch.runner`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kernel_sandbox.batch.display import LiveDisplay, PlainDisplay, summary
from kernel_sandbox.batch.runner import (
    BatchRunner,
    NotebookResult,
    RunOptions,
    Status,
    default_jobs,
    discover,
    kernel_config,
    load_jupyter_config,
    load_parameters,
    parse_value,
    preflight,
    write_csv,
    write_junit,
)
from kernel_sandbox.cli.console import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UsageError,
    exit_code_for,
    report_error,
    until_sigterm,
    wide_console,
)
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_run_command", "cmd_run", "exit_code"]

# -- the command ----------------------------------------------------------------------------


def _setup_error(
    results: Sequence[NotebookResult], setup_error: BaseException | None
) -> BaseException | None:
    return setup_error or next((r.setup_error for r in results if r.setup_error), None)


def exit_code(results: Sequence[NotebookResult], setup_error: BaseException | None = None) -> int:
    """0 all passed; a setup error's code (2); else 1 (a notebook failed or timed out)."""
    error = _setup_error(results, setup_error)
    if error is not None:
        return exit_code_for(error) or EXIT_USAGE
    if any(r.status is Status.ERROR for r in results):
        return EXIT_USAGE
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


async def _tick(display: LiveDisplay | PlainDisplay) -> None:
    """Once a second: the plain display's heartbeat lines."""
    while True:
        await asyncio.sleep(1)
        display.tick()


async def cmd_run(args: argparse.Namespace, backend: DockerBackend) -> int:
    """Run the notebooks: the pre-flight check asks ``backend``; each kernel's provisioner
    reaches the engine through its own (shared) client."""
    err, out = wide_console(120, stderr=True), wide_console(120)
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    try:
        notebooks = discover(args.paths, args.output_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    parameters: dict[str, Any] = {}
    for path in args.parameters_files or []:  # later files win, -p wins over all
        try:
            parameters.update(load_parameters(path))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    for name, value in args.parameters or []:
        if not name.isidentifier():
            raise UsageError(f"-p {name}: a parameter name must be an identifier")
        parameters[name] = parse_value(value)
    try:
        base_config = load_jupyter_config()
    except Exception as exc:  # a broken config file is the user's to fix, not a traceback
        raise UsageError(f"cannot load Jupyter config: {exc}") from exc
    options = RunOptions(
        kernel=args.kernel,
        profile=args.profile,
        jobs=args.jobs,
        timeout=args.timeout if args.timeout > 0 else None,
        notebook_timeout=args.notebook_timeout or None,
        startup_timeout=args.startup_timeout,
        retries=args.retries,
        allow_errors=args.allow_errors,
        parameters=parameters,
        output_dir=args.output_dir,
        inplace=args.inplace,
        config=kernel_config(args.profile, args.startup_timeout, base_config),
    )
    await preflight(options, backend)  # a SandboxError: exit 2 before any kernel starts

    runner = BatchRunner(notebooks, options)
    display = (
        LiveDisplay(err, runner.results)
        if err.is_terminal
        else PlainDisplay(err, runner.results, args.heartbeat or None)
    )
    profile = f", profile {options.profile}" if options.profile else ""
    err.print(
        f"kernel-sandbox run: {len(notebooks)} notebook(s), kernel {options.kernel}"
        f"{profile}, {options.jobs} at a time",
        markup=False,
    )
    started = time.monotonic()
    with display:
        runner.on_change = display.update
        ticker = asyncio.ensure_future(_tick(display))
        try:
            terminated = await until_sigterm(asyncio.ensure_future(runner.run()))
        finally:
            ticker.cancel()
    if terminated:
        err.print("terminated: every kernel was shut down")
        return EXIT_TERMINATED
    results = runner.results
    summary(out, err, results, time.monotonic() - started)
    if args.junit:
        try:
            write_junit(
                results,
                args.junit,
                {
                    "kernel": options.kernel,
                    "profile": options.profile or "(kernelspec's)",
                    "jobs": str(options.jobs),
                },
            )
        except OSError as exc:
            raise UsageError(f"cannot write the JUnit report: {exc}") from exc
        err.print(f"JUnit report: {args.junit}", markup=False)
    if args.csv:
        try:
            write_csv(results, args.csv)
        except OSError as exc:
            raise UsageError(f"cannot write the CSV summary: {exc}") from exc
        err.print(f"CSV summary: {args.csv}", markup=False)
    if options.output_dir is not None:
        err.print(f"executed notebooks: {options.output_dir}", markup=False)
    code = exit_code(results, runner.setup_error)
    error = _setup_error(results, runner.setup_error)
    if error is not None:
        said = next((r.summary for r in results if r.setup_error is error), str(error))
        report_error(f"{said} (no notebook was at fault; the rest were skipped)")
    elif code == EXIT_FAILED:
        bad = sum(not r.ok for r in results)
        err.print(f"[bold red]{bad} of {len(results)} notebook(s) did not pass[/bold red]")
    return code


def _positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_run_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run`` on the ``kernel-sandbox`` command's subparsers."""
    run = subparsers.add_parser(
        "run",
        help="execute notebooks, each in a fresh sandboxed kernel (for CI)",
        description="Execute notebooks (files, or folders searched recursively), each in its "
        "own fresh kernel, several at once. Exit status: 0 all passed, 1 a notebook failed or "
        "timed out, 2 usage or setup error.",
    )
    run.add_argument("paths", nargs="+", type=Path, metavar="NOTEBOOK_OR_DIR")
    run.add_argument(
        "--kernel",
        default="python3-sandbox",
        help="kernelspec to run every notebook with (default python3-sandbox; "
        "the notebooks' own kernelspec metadata is ignored)",
    )
    run.add_argument(
        "--profile",
        default=None,
        help="policy profile for the sandbox (strict, analyst, educator, ci, "
        "untrusted or one from Jupyter config; default: the kernelspec's)",
    )
    run.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=default_jobs(),
        help=f"notebooks at once (default {default_jobs()} on this machine)",
    )
    run.add_argument(
        "--timeout",
        type=_positive_or_zero,
        default=600,
        metavar="SECONDS",
        help="limit per cell (default 600; 0: none); a notebook's "
        'metadata["kernel-sandbox"]["timeout"] overrides it',
    )
    run.add_argument(
        "--startup-timeout",
        type=_positive_or_zero,
        default=60,
        metavar="SECONDS",
        help="limit for a kernel to start (default 60)",
    )
    run.add_argument(
        "--notebook-timeout",
        type=_positive_or_zero,
        default=0,
        metavar="SECONDS",
        help="limit for all cells of a notebook together (its kernel's start has "
        "--startup-timeout; default 0: none); "
        'a notebook\'s metadata["kernel-sandbox"]["notebook_timeout"] overrides it',
    )
    run.add_argument(
        "--retries",
        type=_positive_or_zero,
        default=0,
        metavar="N",
        help="start a new kernel up to N more times when a notebook's kernel fails to start "
        "(died, or not ready within --startup-timeout); a failing cell is never retried "
        "(default 0)",
    )
    run.add_argument(
        "--heartbeat",
        type=_positive_or_zero,
        default=60,
        metavar="SECONDS",
        help="in a CI log (not a terminal), print a line for a notebook that printed none for "
        "SECONDS: its running cell and time (default 60; 0: never)",
    )
    run.add_argument(
        "--allow-errors",
        action="store_true",
        help="go on after a cell raises, and count the notebook as passed",
    )
    run.add_argument(
        "-p",
        "--parameter",
        dest="parameters",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        help="papermill-style parameter injected after the cell tagged "
        "'parameters' (repeatable; True, False, None and numbers are typed; wins over -f)",
    )
    run.add_argument(
        "-f",
        "--parameters-file",
        dest="parameters_files",
        type=Path,
        action="append",
        metavar="FILE",
        help="parameters from a YAML or JSON file (a mapping of names to values), as "
        "papermill's -f (repeatable; later files and -p win)",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--output-dir",
        type=Path,
        metavar="DIR",
        help="write the executed notebooks (with outputs) under DIR",
    )
    where.add_argument(
        "--inplace", action="store_true", help="write the executed notebooks over the originals"
    )
    run.add_argument(
        "--junit",
        type=Path,
        metavar="FILE",
        help="write a JUnit XML report (one test case per notebook)",
    )
    run.add_argument(
        "--csv",
        type=Path,
        metavar="FILE",
        help="write a CSV summary, one row per notebook: path, status, cells run, the cell "
        "it failed in, the error, duration and the sandbox (kernelspec, profile, image, "
        "runtime, container)",
    )
    run.set_defaults(func=cmd_run)
    return run

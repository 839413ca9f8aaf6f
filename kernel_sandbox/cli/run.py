"""``kernel-sandbox run``: execute notebooks for CI, each in its own fresh sandboxed kernel.

The command line, the progress display (live on a terminal, plain lines otherwise), the
summary and the exit code (:func:`exit_code`, through the CLI's one table); the work is done
by :mod:`kernel_sandbox.batch.runner`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kernel_sandbox.batch.runner import (
    BatchRunner,
    NotebookResult,
    RunOptions,
    Status,
    default_jobs,
    discover,
    kernel_config,
    load_jupyter_config,
    parse_value,
    preflight,
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
    wide_console,
)
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_run_command", "cmd_run", "exit_code"]

STYLES = {
    Status.QUEUED: "dim",
    Status.STARTING: "cyan",
    Status.RUNNING: "yellow",
    Status.PASSED: "green",
    Status.FAILED: "bold red",
    Status.TIMED_OUT: "bold red",
    Status.ERROR: "bold magenta",
    Status.SKIPPED: "dim",
}
MARKS = {
    Status.QUEUED: "·",
    Status.STARTING: "…",
    Status.RUNNING: "▶",
    Status.PASSED: "✓",
    Status.FAILED: "✗",
    Status.TIMED_OUT: "✗",
    Status.ERROR: "!",
    Status.SKIPPED: "-",
}


def _state(result: NotebookResult) -> str:
    if result.status is Status.RUNNING:
        return f"running cell {result.cell} of {result.cells}"
    if result.status is Status.STARTING:
        return "starting kernel"
    return result.status.value


# -- displays -------------------------------------------------------------------------------


class PlainDisplay:
    """One log line when a notebook starts and one when it ends (for CI logs)."""

    def __init__(self, console: Console, results: list[NotebookResult]):
        self.console, self.results = console, results
        self._seen: dict[int, Status] = {}

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, result: NotebookResult) -> None:
        before = self._seen.get(id(result))
        self._seen[id(result)] = result.status
        if result.status is before or result.status is Status.RUNNING:
            return
        number = f"[{self.results.index(result) + 1}/{len(self.results)}]"
        if result.status is Status.STARTING:
            cells = f"{result.cells} code cell{'' if result.cells == 1 else 's'}"
            line = f"{number} start      {result.name} ({cells})"
        elif result.status.done:
            line = f"{number} {result.status.value.upper():<10} {result.name}"
            if result.started is not None:
                line += f" ({result.duration:.1f}s)"
            if result.summary:
                line += f": {result.summary.splitlines()[0]}"
        else:
            return
        self.console.print(line, markup=False, soft_wrap=True)


class LiveDisplay:
    """One line per notebook on a terminal, redrawn as cells run."""

    def __init__(self, console: Console, results: list[NotebookResult]):
        self.console, self.results = console, results
        self._start = time.monotonic()
        self._live = Live(
            console=console, get_renderable=self._render, refresh_per_second=8, transient=True
        )

    def __enter__(self) -> LiveDisplay:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def update(self, result: NotebookResult) -> None:
        self._live.refresh()

    def _render(self) -> Group:
        rows = self.results
        room = max(5, self.console.height - 3)
        hidden = 0
        if len(rows) > room:  # keep what moves: running first, then the latest finished
            keep = [r for r in rows if r.status in (Status.STARTING, Status.RUNNING)][:room]
            done = sorted(
                (r for r in rows if r.status.done), key=lambda r: (r.started or 0) + r.duration
            )
            queued = [r for r in rows if r.status is Status.QUEUED]
            for more in (done[::-1], queued):
                keep += more[: max(0, room - len(keep))]
            shown = set(map(id, keep))
            hidden = len(rows) - len(shown)
            rows = [r for r in rows if id(r) in shown]
        table = Table.grid(padding=(0, 1))
        now = time.monotonic()
        for r in rows:
            elapsed = (r.duration or now - r.started) if r.started else None
            line = Text(f"{MARKS[r.status]} ", style=STYLES[r.status])
            line.append(f"{_state(r):<24}", style=STYLES[r.status])
            table.add_row(
                line, Text(r.name), Text(f"{elapsed:5.1f}s" if elapsed else "", style="dim")
            )
        counts = _counts(self.results)
        footer = Text(f"{counts}  {now - self._start:.0f}s", style="dim")
        if hidden:
            footer.append(f"  ({hidden} more not shown)")
        return Group(table, footer)


def _counts(results: list[NotebookResult]) -> str:
    order = list(Status)
    tally = {s: sum(r.status is s for r in results) for s in order}
    return ", ".join(f"{n} {s.value}" for s, n in tally.items() if n)


# -- summary --------------------------------------------------------------------------------


def _summary(out: Console, err: Console, results: list[NotebookResult], elapsed: float) -> None:
    failures = [r for r in results if r.status in (Status.FAILED, Status.TIMED_OUT)]
    for r in failures:
        err.rule(f"{r.status.value.upper()}: {escape(r.name)}", style="red")
        err.print(r.details, markup=False, highlight=False, soft_wrap=True)
    table = Table(
        title=f"kernel-sandbox run: {_counts(results)} in {elapsed:.1f}s", title_justify="left"
    )
    table.add_column("notebook", overflow="fold")
    table.add_column("result")
    table.add_column("cells", justify="right")
    table.add_column("time", justify="right")
    table.add_column("detail", overflow="fold")
    for r in results:
        cells = f"{r.cell}/{r.cells}" if r.cells else ""
        table.add_row(
            escape(r.name),
            f"[{STYLES[r.status]}]{r.status.value}[/]",
            cells,
            f"{r.duration:.1f}s" if r.started else "",
            escape(r.summary.split("\n")[0]),
        )
    out.print(table)


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
    parameters = {name: parse_value(value) for name, value in args.parameters or []}
    for name in parameters:
        if not name.isidentifier():
            raise UsageError(f"-p {name}: a parameter name must be an identifier")
    try:
        base_config = load_jupyter_config()
    except Exception as exc:  # a broken config file is the user's to fix, not a traceback
        raise UsageError(f"cannot load Jupyter config: {exc}") from exc
    options = RunOptions(
        kernel=args.kernel,
        profile=args.profile,
        jobs=args.jobs,
        timeout=args.timeout if args.timeout > 0 else None,
        startup_timeout=args.startup_timeout,
        allow_errors=args.allow_errors,
        parameters=parameters,
        output_dir=args.output_dir,
        inplace=args.inplace,
        config=kernel_config(args.profile, args.startup_timeout, base_config),
    )
    await preflight(options, backend)  # a SandboxError: exit 2 before any kernel starts

    runner = BatchRunner(notebooks, options)
    display_class = LiveDisplay if err.is_terminal else PlainDisplay
    profile = f", profile {options.profile}" if options.profile else ""
    err.print(
        f"kernel-sandbox run: {len(notebooks)} notebook(s), kernel {options.kernel}"
        f"{profile}, {options.jobs} at a time",
        markup=False,
    )
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    terminated = False
    with display_class(err, runner.results) as display:
        runner.on_change = display.update
        task = asyncio.ensure_future(runner.run())

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            await task
        except asyncio.CancelledError:
            if not terminated:
                raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
    if terminated:
        err.print("terminated: every kernel was shut down")
        return EXIT_TERMINATED
    results = runner.results
    _summary(out, err, results, time.monotonic() - started)
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
    if options.output_dir is not None:
        err.print(f"executed notebooks: {options.output_dir}", markup=False)
    code = exit_code(results, runner.setup_error)
    error = _setup_error(results, runner.setup_error)
    if error is not None:
        report_error(f"{error} (no notebook was at fault; the rest were skipped)")
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
        help="limit per cell (default 600; 0: none)",
    )
    run.add_argument(
        "--startup-timeout",
        type=_positive_or_zero,
        default=60,
        metavar="SECONDS",
        help="limit for a kernel to start (default 60)",
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
        "'parameters' (repeatable; True, False, None and numbers are typed)",
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
    run.set_defaults(func=cmd_run)
    return run

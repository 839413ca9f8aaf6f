"""Where every ``kernel-sandbox`` command writes, and the exit code each outcome gets.

Results go to stdout through :data:`out`: tables, JSON, what a command did ("installed ...",
"approved ...") and that there is nothing to show ("no sandboxed kernel is running"). Progress,
notes, warnings and errors go to stderr through :data:`err`. An error is always one
``error: ...`` line, markup-escaped, and its exit code comes from :data:`EXIT_CODES`, the one
table every command goes through:

====  ==========================================================================
0     success
1     a real failure: a notebook failed, ``doctor`` found a problem, a build failed
2     usage or setup error: a bad flag or value, the engine or image missing, any
      :class:`~kernel_sandbox.errors.SandboxError` (nothing was at fault but the setup),
      a file or folder that cannot be read or written (an ``OSError``)
130   interrupted (Ctrl-C)
143   terminated (SIGTERM; ``run`` shuts every kernel down first)
====  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from kernel_sandbox.errors import ImageBuildError, SandboxError

__all__ = [
    "EXIT_CODES",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "UsageError",
    "done",
    "err",
    "exit_code_for",
    "out",
    "progress",
    "one_line",
    "report_error",
    "warn",
    "wide_console",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class UsageError(Exception):
    """A command line that cannot be carried out as given (a path that does not exist, a
    report that cannot be written): argparse's own errors, for checks it cannot make."""


# First match wins: put a subclass before its base.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ImageBuildError, EXIT_FAILED),  # the build ran and failed, like a failed notebook
    (SandboxError, EXIT_USAGE),
    (UsageError, EXIT_USAGE),
    (OSError, EXIT_USAGE),  # a path that cannot be read, written or made: the setup's
    (KeyboardInterrupt, EXIT_INTERRUPTED),
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code :data:`EXIT_CODES` gives ``exc``, or None when it is not a known error."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return None


def one_line(message: object) -> str:
    """The text of an error on one line: an ``OSError`` as "what: path", lines joined by "; "."""
    if isinstance(message, OSError) and message.strerror and not isinstance(message, SandboxError):
        where = f": {message.filename}" if message.filename else ""
        text = f"{message.strerror}{where}"
    else:
        text = str(message) or type(message).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def report_error(message: object) -> None:
    """Print ``error: MESSAGE`` on stderr, on one line (markup in it is shown as it is)."""
    err.print(f"[bold red]error:[/bold red] {escape(one_line(message))}", markup=True)


def done(message: str) -> None:
    """What a command did, or that there is nothing to show: one line on stdout."""
    out.print(message, markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning or note on stderr, after ``warning:`` (or as it is when it names itself)."""
    err.print(message, markup=False, highlight=False)


def progress(prefix: str) -> Callable[[str], None]:
    """A progress callback printing each line on stderr after a dim ``prefix``."""

    def show(line: str) -> None:
        err.print(f"[dim]{prefix}[/dim] {escape(line)}", markup=True)

    return show


def wide_console(min_width: int, stderr: bool = False) -> Console:
    """A console that, outside a terminal (CI logs, pipes), is at least ``min_width`` wide,
    so tables of paths and ids are not folded."""
    console = Console(stderr=stderr, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, highlight=False, width=max(console.width, min_width))

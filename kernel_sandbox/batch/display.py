"""What ``kernel-sandbox run`` shows while and after it runs: a live table on a terminal,
plain log lines (with a heartbeat for long notebooks) in a CI log, and the summary.
"""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kernel_sandbox.batch.results import NotebookResult, Status

__all__ = ["LiveDisplay", "PlainDisplay", "summary"]

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
        return (
            f"starting kernel (try {len(result.retries) + 1})"
            if result.retries
            else ("starting kernel")
        )
    return result.status.value


# -- displays -------------------------------------------------------------------------------


class PlainDisplay:
    """One log line when a notebook starts and one when it ends (for CI logs); a failed
    kernel start that is retried gets a line, and a notebook that runs long a heartbeat line
    every ``heartbeat`` seconds without one (so a CI log shows it is alive, and where)."""

    def __init__(
        self, console: Console, results: list[NotebookResult], heartbeat: float | None = None
    ):
        self.console, self.results, self.heartbeat = console, results, heartbeat
        self._seen: dict[int, tuple[Status, int]] = {}
        self._last_line: dict[int, float] = {}  # when a notebook's last line was printed

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _print(self, result: NotebookResult, what: str) -> None:
        number = f"[{self.results.index(result) + 1}/{len(self.results)}]"
        self.console.print(f"{number} {what}", markup=False, soft_wrap=True)
        self._last_line[id(result)] = time.monotonic()

    def update(self, result: NotebookResult) -> None:
        before = self._seen.get(id(result))
        self._seen[id(result)] = (result.status, len(result.retries))
        if before is not None and len(result.retries) > before[1]:
            tries = f"try {len(result.retries) + 1}"
            self._print(
                result,
                f"retry      {result.name}: the kernel failed to start "
                f"({result.retries[-1]}); {tries}",
            )
            return
        if (before and result.status is before[0]) or result.status is Status.RUNNING:
            return
        if result.status is Status.STARTING:
            cells = f"{result.cells} code cell{'' if result.cells == 1 else 's'}"
            self._print(result, f"start      {result.name} ({cells})")
        elif result.status.done:
            line = f"{result.status.value.upper():<10} {result.name}"
            if result.started is not None:
                line += f" ({result.duration:.1f}s)"
            if result.summary:
                line += f": {result.summary.splitlines()[0]}"
            self._print(result, line)

    def tick(self) -> None:
        """Print a heartbeat for each notebook silent for ``heartbeat`` seconds (called
        about once a second)."""
        if not self.heartbeat:
            return
        now = time.monotonic()
        for result in self.results:
            if result.status not in (Status.STARTING, Status.RUNNING) or result.started is None:
                continue
            if now - self._last_line.get(id(result), result.started) < self.heartbeat:
                continue
            if result.status is Status.STARTING:
                line = f"starting   {result.name} ({now - result.started:.0f}s): its kernel"
            else:
                since = now - (result.cell_started or now)
                line = (
                    f"running    {result.name} ({now - result.started:.0f}s): "
                    f"{result.where}, running for {since:.0f}s"
                )
            self._print(result, line)


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

    def tick(self) -> None:
        pass  # redrawn by rich, eight times a second

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


def summary(out: Console, err: Console, results: list[NotebookResult], elapsed: float) -> None:
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

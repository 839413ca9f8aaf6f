"""What ``kernel-sandbox run`` found: one :class:`NotebookResult` per notebook, the JUnit
XML report CI systems display, and the CSV summary a spreadsheet reads (one row per notebook).

Results are plain data, updated in place while the notebooks run, so a display can watch
them and a report can be written from them without knowing how they were produced.
"""

from __future__ import annotations

import csv
import enum
import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import SandboxError

__all__ = [
    "NotebookResult",
    "Status",
    "fail",
    "fail_in_cell",
    "plain",
    "stream_output",
    "write_csv",
    "write_junit",
]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class Status(str, enum.Enum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    TIMED_OUT = "timed out"
    ERROR = "setup error"
    SKIPPED = "skipped"

    @property
    def done(self) -> bool:
        return self not in (Status.QUEUED, Status.STARTING, Status.RUNNING)


@dataclass
class NotebookResult:
    """One notebook's run, updated in place while it runs."""

    path: Path  # the source notebook
    name: str  # how reports name it (relative to the folder it was found in)
    output: Path | None = None  # where the executed notebook is written, if anywhere
    status: Status = Status.QUEUED
    cell: int = 0  # the user's code cells started so far (an injected cell is not counted)
    cells: int = 0  # the user's code cells to run
    where: str = ""  # the cell running now, as the user numbers it ("cell 4 (code cell 2 of 3)")
    cell_started: float | None = None
    retries: list[str] = field(default_factory=list)  # why each failed kernel start failed
    started: float | None = None
    duration: float = 0.0
    summary: str = ""  # one line: what went wrong
    details: str = ""  # the failing cell's source and its traceback
    error_type: str = ""
    failed_cell: str = ""  # the cell it stopped in, as the user numbers it
    sandbox: dict[str, str] = field(default_factory=dict)  # kernelspec, profile, image, ...
    stdout: str = ""  # stream output of all cells, for the report
    setup_error: SandboxError | None = None

    @property
    def ok(self) -> bool:
        """Passed, or skipped by its own metadata (a batch with a setup error exits 2 anyway)."""
        return self.status in (Status.PASSED, Status.SKIPPED)


def plain(text: str) -> str:
    """``text`` without terminal colour codes (tracebacks from IPython carry them)."""
    return _ANSI.sub("", text)


def fail(
    result: NotebookResult,
    status: Status,
    error_type: str,
    summary: str,
    details: str = "",
) -> None:
    """Record how ``result``'s notebook ended badly; ``details`` default to ``summary``."""
    result.status, result.error_type, result.summary = status, error_type, summary
    result.details = plain(details or summary)


def fail_in_cell(
    result: NotebookResult,
    nb: Any,
    index: int | None,
    where: str,
    status: Status,
    error_type: str,
    what: str,
) -> None:
    """:func:`fail`, naming cell ``index`` of ``nb`` (``where``: as the user numbers it) and
    keeping its source and traceback."""
    if index is None:
        fail(result, status, error_type, what)
        return
    cell = nb.cells[index]
    traceback = "\n".join(
        "\n".join(out.get("traceback", []))
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    )
    details = f"{where}:\n{cell.source}\n{'-' * 40}\n{traceback or what}"
    fail(result, status, error_type, f"{where}: {what}", details)
    result.failed_cell = where


def stream_output(nb: Any, limit: int = 64_000) -> str:
    """The stream output (stdout, stderr) of every code cell, for the report."""
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    return text if len(text) <= limit else text[:limit] + "\n[... truncated]"


# -- JUnit report ---------------------------------------------------------------------------


def _shown_path(path: Path) -> str:
    """Relative to the working directory when below it (as CI annotations expect)."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub("", plain(text))


def write_junit(
    results: Sequence[NotebookResult], path: Path, properties: Mapping[str, str] | None = None
) -> None:
    """One ``testcase`` per notebook in the JUnit XML that CI systems display.

    A failed or timed-out notebook has a ``failure`` (message: the failing cell and the
    error; text: the cell's source and traceback); a setup error is an ``error``; a
    notebook not run is ``skipped``. Stream output goes to ``system-out``.
    """
    counts = {
        "tests": len(results),
        "failures": sum(r.status in (Status.FAILED, Status.TIMED_OUT) for r in results),
        "errors": sum(r.status is Status.ERROR for r in results),
        "skipped": sum(r.status is Status.SKIPPED for r in results),
    }
    total = sum(r.duration for r in results)
    attrs = {k: str(v) for k, v in counts.items()} | {"time": f"{total:.3f}"}
    root = ET.Element("testsuites", {"name": "kernel-sandbox run", **attrs})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": "kernel-sandbox run",
            **attrs,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
        },
    )
    if properties:
        props = ET.SubElement(suite, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", {"name": key, "value": _xml_text(str(value))})
    for result in results:
        folder = Path(result.name).parent.as_posix()
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": "notebooks"
                if folder == "."
                else f"notebooks.{folder.replace('/', '.')}",
                "name": result.name,
                "file": _shown_path(result.path),
                "time": f"{result.duration:.3f}",
            },
        )
        if result.status in (Status.FAILED, Status.TIMED_OUT):
            element = ET.SubElement(
                case,
                "failure",
                {
                    "type": result.error_type or result.status.value,
                    "message": _xml_text(f"{result.status.value}: {result.summary}"),
                },
            )
            element.text = _xml_text(result.details)
        elif result.status is Status.ERROR:
            element = ET.SubElement(
                case,
                "error",
                {
                    "type": result.error_type,
                    "message": _xml_text(result.summary),
                },
            )
            element.text = _xml_text(result.details)
        elif result.status is Status.SKIPPED:
            ET.SubElement(case, "skipped", {"message": _xml_text(result.summary)})
        if result.stdout:
            ET.SubElement(case, "system-out").text = _xml_text(result.stdout)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# -- CSV summary ----------------------------------------------------------------------------

CSV_COLUMNS = (
    "notebook",
    "path",
    "status",
    "cells_run",
    "cells",
    "failed_cell",
    "error_type",
    "error",
    "duration_s",
    "kernelspec",
    "profile",
    "image",
    "runtime",
    "container",
)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell_text(value: object) -> str:
    """One CSV field: plain text on one line, never read as a formula by a spreadsheet
    (error messages come from the notebook, which may be an attacker's)."""
    text = " ".join(_XML_INVALID.sub("", plain(str(value))).split())
    return "'" + text if text.startswith(_FORMULA) else text


def write_csv(results: Sequence[NotebookResult], path: Path) -> None:
    """One row per notebook, in :data:`CSV_COLUMNS`: what it is, how it ended, where it
    stopped, how long it took and which sandbox ran it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            row = {
                "notebook": r.name,
                "path": _shown_path(r.path),
                "status": r.status.value,
                "cells_run": r.cell,
                "cells": r.cells,
                "failed_cell": r.failed_cell,
                "error_type": r.error_type,
                "error": r.summary if not r.ok or r.status is Status.SKIPPED else "",
                "duration_s": f"{r.duration:.3f}",
                **{k: r.sandbox.get(k, "") for k in CSV_COLUMNS[9:]},
            }
            writer.writerow(_cell_text(row[column]) for column in CSV_COLUMNS)

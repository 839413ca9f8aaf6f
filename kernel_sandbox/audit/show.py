"""Reading audit records back: every file of a chain, filtered, executions paired up.

For ``kernel-sandbox audit show``: records of several chains (the audit log, the egress
decision log) merged in time order, each given an ``event`` (broker lines are ``data``, egress
decisions ``egress``), and an execute request joined with its reply (or its ``execute_end``)
into one ``execute`` row. Reading does not verify; ``audit verify`` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from kernel_sandbox.audit.chain import chain_files

__all__ = ["parse_since", "read_records", "rows"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time or date (UTC unless it says), or an age such as ``10m``,
    ``2h``, ``7d``.

    Raises:
        ValueError: neither.
    """
    now = now or datetime.now(timezone.utc)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: an ISO time such as 2026-12-03T16:00 or an age such as 30m, 2h, 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _event(record: dict[str, Any]) -> str:
    event = record.get("event")
    if isinstance(event, str):
        return event
    return "data" if "op" in record else "egress" if "host" in record else "other"


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every record of one chain, oldest file first (lines that are not JSON are skipped)."""
    for file in chain_files(path):
        try:
            with open(file, "rb") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        record["event"] = _event(record)
                        yield record
        except OSError:
            continue


def _time(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record.get("time")))
    except ValueError:
        return None


def rows(
    chains: Iterable[str | os.PathLike[str]],
    kernel: str | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """The records of ``chains`` in time order, for one kernel (an id or its prefix) and from
    ``since`` if given, each execution as one ``execute`` row (request fields, plus the
    reply's ``status``, ``end`` and ``seconds``)."""
    records: list[dict[str, Any]] = []
    for chain in chains:
        for record in read_records(chain):
            kernel_id = str(record.get("kernel_id") or "")
            if kernel and not kernel_id.startswith(kernel):
                continue
            when = _time(record)
            if since is not None and (when is None or when < since):
                continue
            records.append(record)
    records.sort(key=lambda r: str(r.get("time", "")))
    out: list[dict[str, Any]] = []
    open_runs: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        event, key = record["event"], (record.get("kernel_id"), record.get("msg_id"))
        if event == "execute_request":
            row = {**record, "event": "execute", "status": "running"}
            open_runs[key] = row  # type: ignore[index]
            out.append(row)
        elif event in ("execute_reply", "execute_end") and key in open_runs:
            row = open_runs.pop(key)  # type: ignore[arg-type]
            for field in ("status", "end", "seconds", "execution_count", "ename", "reason"):
                if field in record:
                    row[field] = record[field]
        else:
            out.append(record)
    return out

"""One line of ``kernel-sandbox doctor``: what was checked, its status, and the fix.

Status ``warn`` is advice: only ``fail`` makes ``doctor`` exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAIL", "OK", "WARN", "Check"]

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    status: str
    detail: str
    fix: str = ""

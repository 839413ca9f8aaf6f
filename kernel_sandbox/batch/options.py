"""How ``kernel-sandbox run`` runs its notebooks: :class:`RunOptions`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitlets.config import Config

__all__ = ["RunOptions", "default_jobs"]


def default_jobs() -> int:
    """Notebooks at once by default: one per CPU, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class RunOptions:
    kernel: str = "python3-sandbox"
    profile: str | None = None
    jobs: int = field(default_factory=default_jobs)
    timeout: int | None = 600  # per cell; None: no limit
    notebook_timeout: int | None = None  # all cells of a notebook together (not its start)
    startup_timeout: int = 60
    retries: int = 0  # new kernels for a notebook whose kernel failed to start
    allow_errors: bool = False
    parameters: Mapping[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None
    inplace: bool = False
    config: Config = field(default_factory=Config)  # Jupyter config for the kernel managers

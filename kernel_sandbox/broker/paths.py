"""Dataset-relative paths as a kernel sends them, checked before any file system is touched.

Every path a kernel sends is relative to its dataset: :func:`relative_parts` refuses absolute
paths, ``..`` and NUL bytes. The aliases name what a source takes and returns (a class with a
``list`` method cannot write ``list[str]`` in its own annotations).
"""

from __future__ import annotations

from typing import Any

from kernel_sandbox.broker.protocol import Refusal

__all__ = ["Entry", "Listing", "Parts", "escape", "not_found", "relative_parts"]

Parts = list[str]  # a path inside a dataset, split at "/" (no "", ".", "..")
Entry = dict[str, Any]  # one directory entry: name, type, size, mtime
Listing = list[Entry]


def escape(why: str) -> Refusal:
    return Refusal("escape", f"path leaves the dataset ({why})")


def not_found(parts: Parts) -> Refusal:
    return Refusal("not-found", f"no such file or directory: {'/'.join(parts) or '.'}")


def relative_parts(path: str) -> Parts:
    """Split a dataset-relative path; refuse anything that could leave the dataset."""
    if "\x00" in path:
        raise escape("NUL byte in path")
    if path.startswith("/"):
        raise escape("absolute paths are not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise escape("'..' is not allowed")
    return parts

"""File upload and download for the Python API: through the kernel, within the policy.

Files move over the kernel's own channel (a user expression of a silent execution that
writes or reads one base64 chunk at a time: evaluated as Python, without IPython's input
transformations, which would take seconds over megabytes), never by a second path to the engine or
to the host folder: the kernel's uid, mounts and read-only flags apply exactly as they do to
the code it runs. Paths are relative to the workspace (the kernel's working directory, the
folder the sandbox was started in). The policy's ``workspace`` mode decides, and a refusal is
said before anything is sent: ``rw`` allows both ways, ``ro`` downloads only, ``none`` (no
workspace is mounted) neither.

The snippets sent run in a namespace of their own (nothing of the user's is read or
replaced) and use only the standard library.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Iterator

from kernel_sandbox.errors import TransferRefused

__all__ = ["CHUNK", "check_transfer", "read_expression", "relative_path", "write_expressions"]

CHUNK = 4 * 1024 * 1024  # bytes per message each way (base64 adds a third)

_WRITE = """
import base64, os
path = {path!r}
folder = os.path.dirname(path)
if folder:
    os.makedirs(folder, exist_ok=True)
with open(path, {mode!r}) as f:
    f.write(base64.b64decode(data))
out = None
"""
_READ = """
import base64
with open({path!r}, 'rb') as f:
    f.seek({offset})
    out = base64.b64encode(f.read({size})).decode()
"""


def relative_path(path: str) -> str:
    """``path`` as a path inside the workspace; refused if it leaves it.

    Raises:
        ValueError: empty, absolute or climbing out with ``..``.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"a file path in the workspace is needed, not {path!r}")
    if path.startswith("/"):
        raise ValueError(
            f"{path!r} is absolute: give a path relative to the workspace (the sandbox's "
            "working directory), e.g. 'data/input.csv'"
        )
    clean = posixpath.normpath(path)
    if clean == ".." or clean.startswith("../"):
        raise ValueError(f"{path!r} leads out of the workspace: give a path inside it")
    return clean


def check_transfer(direction: str, workspace: str, profile: str, cwd: str) -> None:
    """Refuse an ``upload`` or ``download`` the policy's ``workspace`` mode forbids.

    Raises:
        TransferRefused: naming the mode, the profile and how to allow it.
    """
    if workspace == "rw":
        return
    if workspace == "ro" and direction == "download":
        return
    if workspace == "none":
        raise TransferRefused(
            f"cannot {direction}: this sandbox has no workspace (policy workspace 'none', "
            f"profile {profile!r}), so no folder of the host is shared with it; start it with "
            "workspace='ro' to download or workspace='rw' (profile 'analyst') to upload, or "
            "pass data in the code you run"
        )
    raise TransferRefused(
        f"cannot upload: the workspace {cwd} is read-only for this sandbox (policy workspace "
        f"{workspace!r}, profile {profile!r}); start it with workspace='rw' (or "
        "profile='analyst') to let it write there"
    )


def write_expressions(path: str, data: bytes) -> Iterator[str]:
    """User expressions that write ``data`` to ``path``, one per chunk (at least one)."""
    for offset in range(0, max(len(data), 1), CHUNK):
        chunk = base64.b64encode(data[offset : offset + CHUNK]).decode()
        mode = "wb" if offset == 0 else "ab"
        yield _isolated(_WRITE.format(path=path, mode=mode), data=chunk)


def read_expression(path: str, offset: int, size: int = CHUNK) -> str:
    """A user expression whose value is ``size`` bytes of ``path`` from ``offset``, base64."""
    return _isolated(_READ.format(path=path, offset=offset, size=size))


def _isolated(source: str, **values: str) -> str:
    """An expression that runs ``source`` in a namespace of its own holding ``values`` (the
    real builtins, not the user's names) and is worth the ``out`` it sets. The values are
    parsed once, as literals of the expression, not again inside ``source``."""
    return f"(lambda g: (__import__('builtins').exec({source!r}, g), g['out'])[1])({values!r})"

"""Which Jupyter sees a kernelspec: said by ``install`` when it writes one, and by ``doctor``.

A kernelspec lives in a Jupyter data directory (``.../share/jupyter/kernels/NAME``). A Jupyter
finds it only if that directory is on its own data path (``jupyter --paths``), which depends
on the Python it runs from: the user's directory and the system's are on every one, a Python
environment's (``--sys-prefix``) only on that environment's. So a kernelspec installed with
one Python's ``--sys-prefix`` is not found (NoSuchKernel) by a virtual environment's Jupyter,
although ``jupyter kernelspec list`` of another environment on PATH may show it. The first
directory on the path that holds the name wins, so an older copy can also shadow a new one.

Nothing here changes anything: it reads this Python's data path
(:func:`jupyter_core.paths.jupyter_path`) and asks the ``jupyter`` on PATH for its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from jupyter_core import paths

__all__ = [
    "Visibility",
    "kernelspec_visibility",
    "path_jupyter_data",
    "venv_data_path",
    "visibility_findings",
]


def _norm(path: str) -> str:
    return os.path.normpath(os.path.realpath(os.path.expanduser(path)))


def path_jupyter_data(timeout: float = 10.0) -> tuple[str | None, list[str] | None]:
    """The ``jupyter`` command on PATH and its data path (``jupyter --paths --json``); None
    for the path when there is no such command or it does not answer."""
    command = shutil.which("jupyter")
    if command is None:
        return None, None
    try:
        result = subprocess.run(
            [command, "--paths", "--json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        data = json.loads(result.stdout)["data"]
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
        return command, None
    return command, [str(d) for d in data]


def venv_data_path(data_path: Sequence[str] | None = None) -> list[str]:
    """The data path a virtual environment made from this Python (``python3 -m venv``) has,
    but for its own directory: this Python's without this environment's (``sys.prefix``)."""
    own = {_norm(d) for d in paths.ENV_JUPYTER_PATH}
    return [d for d in (data_path or paths.jupyter_path()) if _norm(d) not in own]


def _finds(data_path: Sequence[str], data_dir: str, name: str) -> str | None:
    """Where a Jupyter with ``data_path`` finds kernelspec ``name`` first, or None."""
    for directory in data_path:
        if os.path.isfile(os.path.join(directory, "kernels", name, "kernel.json")):
            return _norm(directory)
    return None


@dataclass(frozen=True)
class Visibility:
    """Who finds the kernelspec ``name`` written in ``data_dir`` (a Jupyter data directory)."""

    name: str
    data_dir: str
    this_python: str | None  # the data directory this Python's Jupyter finds the name in
    in_venv: str | None  # ... a new virtual environment's Jupyter
    path_command: str | None  # the `jupyter` on PATH, if any
    on_path: str | None  # the data directory it finds the name in (None: not found)
    path_answered: bool  # whether that command told its data path

    @property
    def scope(self) -> str:
        data = _norm(self.data_dir)
        if data == _norm(paths.jupyter_data_dir()):
            return "user"
        if data in {_norm(d) for d in paths.SYSTEM_JUPYTER_PATH}:
            return "system"
        if data in {_norm(d) for d in paths.ENV_JUPYTER_PATH}:
            return "environment"
        return "elsewhere"

    def seen(self, found: str | None) -> bool:
        return found == _norm(self.data_dir)

    def lines(self) -> list[tuple[bool, str]]:
        """What a person needs to know, one sentence a line, each with whether it is a
        warning (a Jupyter this user is likely to run misses it); the last says what to do."""
        who = {
            "user": "every Jupyter you run (any Python, any virtual environment), not other users'",
            "system": "every Jupyter on this machine, of every user",
            "environment": f"Jupyter run from this Python environment ({sys.prefix})",
            "elsewhere": "only a Jupyter whose data path (`jupyter --paths`) lists "
            f"{self.data_dir} (JUPYTER_PATH)",
        }[self.scope]
        lines = [(False, f"{self.name} is seen by {who}")]
        if not self.seen(self.this_python):
            lines.append((True, self._missed("this Python's Jupyter", self.this_python)))
        if self._missed_on_path():
            where = f"the `jupyter` on your PATH ({self.path_command})"
            lines.append((True, self._missed(where, self.on_path)))
        if not self.seen(self.in_venv):
            venv = "a virtual environment's Jupyter (python3 -m venv)"
            lines.append((False, self._missed(venv, self.in_venv)))
        shadows = sorted(
            {f for f in (self.this_python, self.on_path, self.in_venv) if f and not self.seen(f)}
        )
        if shadows:
            lines.append(
                (False, f"remove the other copy: {', '.join(shadows)}/kernels/{self.name}")
            )
        elif len(lines) > 1:
            lines.append(
                (
                    False,
                    "for another Jupyter: install with --user (all your Jupyters), or with "
                    "the Python it runs from (`python -m kernel_sandbox.cli install "
                    f"--sys-prefix ...`), or add {self.data_dir} to its JUPYTER_PATH",
                )
            )
        return lines

    def _missed_on_path(self) -> bool:
        return self.path_command is not None and self.path_answered and not self.seen(self.on_path)

    def _missed(self, who: str, found: str | None) -> str:
        if found is None:
            return f"{who} does NOT see it (NoSuchKernel)"
        return f"{who} finds another {self.name} first, in {found}"

    @property
    def problem(self) -> bool:
        """Whether a Jupyter this user is likely to run misses it: this Python's, or the
        one on PATH."""
        return not self.seen(self.this_python) or self._missed_on_path()


def kernelspec_visibility(
    kernel_dir: str, path_data: tuple[str | None, list[str] | None] | None = None
) -> Visibility:
    """Who finds the kernelspec in ``kernel_dir`` (``DATA/kernels/NAME``).

    ``path_data`` is the ``jupyter`` on PATH and its data path (default: asked now,
    :func:`path_jupyter_data`).
    """
    kernel_dir = _norm(kernel_dir)
    name = os.path.basename(kernel_dir)
    data_dir = os.path.dirname(os.path.dirname(kernel_dir))
    command, on_path = path_jupyter_data() if path_data is None else path_data
    mine = paths.jupyter_path()
    return Visibility(
        name=name,
        data_dir=data_dir,
        this_python=_finds(mine, data_dir, name),
        in_venv=_finds(venv_data_path(mine), data_dir, name),
        path_command=command,
        on_path=_finds(on_path, data_dir, name) if on_path is not None else None,
        path_answered=on_path is not None,
    )


def visibility_findings(kernel_dirs: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """For ``doctor``: (name, status, detail, fix) per kernelspec (name -> its directory);
    ``warn`` when this Python's Jupyter or the one on PATH does not find it there."""
    if not kernel_dirs:
        return []
    path_data = path_jupyter_data()
    findings = []
    for name, kernel_dir in sorted(kernel_dirs.items()):
        seen = kernelspec_visibility(kernel_dir, path_data)
        lines = [text for _warning, text in seen.lines()]
        fix = lines.pop() if len(lines) > 1 else ""
        status = "warn" if seen.problem else "ok"
        findings.append((f"{name} visibility", status, "; ".join(lines), fix))
    return findings

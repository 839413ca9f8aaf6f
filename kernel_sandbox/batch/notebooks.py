"""Which notebooks ``kernel-sandbox run`` runs, and the parameters injected into them.

Both follow what users already know: folders are searched recursively as ``jupyter
nbconvert`` users expect, and ``-p NAME VALUE`` parameters are injected the way papermill does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CellMap", "discover", "inject_parameters", "parse_value"]


def discover(inputs: Sequence[Path], output_dir: Path | None = None) -> list[tuple[Path, str]]:
    """Notebooks named or found (recursively) under ``inputs``: (path, report name) pairs.

    Hidden folders (``.ipynb_checkpoints``) and the output folder are skipped.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input file is not a notebook, a folder holds none, or two notebooks
            would be written to the same output path.
    """
    found: dict[Path, str] = {}
    skip = output_dir.resolve() if output_dir else None
    for given in inputs:
        if not given.exists():
            raise FileNotFoundError(f"no such notebook or folder: {given}")
        if given.is_file():
            if given.suffix != ".ipynb":
                raise ValueError(f"not a notebook (.ipynb): {given}")
            found.setdefault(given.resolve(), given.name)
            continue
        inside = []
        for path in sorted(given.rglob("*.ipynb")):
            relative = path.relative_to(given)
            if any(part.startswith(".") for part in relative.parts[:-1]):
                continue
            if skip is not None and skip in path.resolve().parents:
                continue
            inside.append((path.resolve(), relative.as_posix()))
        if not inside:
            raise ValueError(f"no notebooks under {given}")
        for path, name in inside:
            found.setdefault(path, name)
    names: dict[str, Path] = {}
    for path, name in found.items():
        if name in names:
            raise ValueError(
                f"two notebooks would be reported and written as {name}: {names[name]} and "
                f"{path}; pass their common parent folder instead"
            )
        names[name] = path
    return list(found.items())


# -- parameters -----------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value as papermill reads it: bool, None, int, float, else text."""
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def inject_parameters(
    nb: Any, parameters: Mapping[str, Any], language: str = "python"
) -> int | None:
    """Insert papermill's ``injected-parameters`` cell after the cell tagged ``parameters``.

    As papermill does: an earlier injected cell is replaced, and without a ``parameters``
    cell the new one goes first. Returns the index of the cell inserted, None when none was
    (no parameters, or an earlier injected cell replaced: the user's cells did not move).

    Raises:
        ValueError: the kernel's language is not Python and papermill is not installed.
    """
    if not parameters:
        return None
    import nbformat

    if language == "python":
        source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    else:
        try:
            from papermill.translators import translate_parameters  # type: ignore[import-untyped, import-not-found]
        except ImportError:
            raise ValueError(
                f"parameters for a {language} kernel need papermill: pip install papermill"
            ) from None
        source = translate_parameters(language, language, dict(parameters), "Parameters")
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    if (nb.nbformat, nb.nbformat_minor) < (4, 5):
        cell.pop("id", None)  # cell ids only exist from nbformat 4.5 on

    def tagged(tag: str) -> list[int]:
        return [i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", [])]

    old = tagged("injected-parameters")
    if old:
        nb.cells[old[0]] = cell
        for index in reversed(old[1:]):
            del nb.cells[index]
        return None
    anchor = tagged("parameters")
    at = anchor[0] + 1 if anchor else 0
    nb.cells.insert(at, cell)
    return at


@dataclass(frozen=True)
class CellMap:
    """Cell numbers as the user wrote the notebook, whatever run inserted into it.

    ``injected`` is the index of the parameters cell run inserted (None: none); ``code``
    the indexes of the user's code cells that run, in order.
    """

    code: tuple[int, ...]
    injected: int | None = None

    def number(self, index: int) -> int | None:
        """Cell ``index``'s number (from 1, markdown included) in the user's notebook; None
        for the injected cell."""
        if index == self.injected:
            return None
        return index + (0 if self.injected is None or index < self.injected else -1) + 1

    def label(self, index: int) -> str:
        """``cell 3 (code cell 2 of 3)``, as JupyterLab numbers the user's notebook."""
        number = self.number(index)
        if number is None:
            return "the injected parameters cell (-p/-f)"
        if index in self.code:
            return f"cell {number} (code cell {self.code.index(index) + 1} of {len(self.code)})"
        return f"cell {number}"

"""What a notebook's metadata tells ``kernel-sandbox run``, and what run writes back into it.

A notebook can carry its own limits and a skip under ``metadata["kernel-sandbox"]`` (so the
notebook, not the CI job, says that it is slow or not runnable here)::

    "kernel-sandbox": {"timeout": 1200, "notebook_timeout": 3600, "skip": "needs a GPU"}

and the executed notebook records which sandbox ran it under
``metadata["kernel-sandbox"]["executed"]`` (kernelspec, profile, image and image id), so an
artifact says where its outputs came from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "KEY",
    "NotebookSettings",
    "load_parameters",
    "record_sandbox",
    "sandbox_of",
    "settings_of",
]

KEY = "kernel-sandbox"  # the notebook metadata key run reads and writes
_SETTINGS = ("timeout", "notebook_timeout", "skip", "executed")


@dataclass(frozen=True)
class NotebookSettings:
    """A notebook's own settings; None: the command line's."""

    timeout: int | None = None  # per cell (0: none)
    notebook_timeout: int | None = None  # the whole notebook (0: none)
    skip: str | None = None  # why it is not run (a skip without a reason: "skipped")


def _seconds(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(
            f'metadata["{KEY}"]["{key}"] must be a number of seconds (0: no limit), not {value!r}'
        )
    return int(value)


def settings_of(nb: Any) -> NotebookSettings:
    """The notebook's ``metadata["kernel-sandbox"]`` settings.

    Raises:
        ValueError: a setting of the wrong type, or an unknown key (a typo would be ignored).
    """
    raw = nb.metadata.get(KEY) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f'metadata["{KEY}"] must be an object, not {raw!r}')
    unknown = sorted(set(raw) - set(_SETTINGS))
    if unknown:
        raise ValueError(
            f'unknown key(s) in metadata["{KEY}"]: {", ".join(unknown)} '
            f"(known: timeout, notebook_timeout, skip)"
        )
    skip = raw.get("skip", False)
    if not isinstance(skip, (bool, str)):
        raise ValueError(f'metadata["{KEY}"]["skip"] must be true, false or a reason')
    return NotebookSettings(
        timeout=_seconds(raw["timeout"], "timeout") if "timeout" in raw else None,
        notebook_timeout=_seconds(raw["notebook_timeout"], "notebook_timeout")
        if "notebook_timeout" in raw
        else None,
        skip=(skip if isinstance(skip, str) else "skipped") if skip else None,
    )


def load_parameters(path: Path) -> dict[str, Any]:
    """Parameters from a YAML or JSON file (``-f``, as papermill's): a mapping of names.

    Raises:
        ValueError: unreadable, not YAML/JSON, not a mapping, or a name not an identifier.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"-f {path}: cannot read it: {exc.strerror or exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except ValueError as exc:  # json.JSONDecodeError
            raise ValueError(f"-f {path}: not valid JSON: {exc}") from exc
    else:  # YAML (JSON is YAML too)
        try:
            import yaml  # type: ignore[import-untyped]  # jupyter_events's dependency
        except ImportError:
            raise ValueError(
                f"-f {path}: YAML needs PyYAML (pip install pyyaml), or use a .json file"
            ) from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"-f {path}: not valid YAML: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"-f {path}: must hold a mapping of parameter names to values")
    for name in values:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"-f {path}: parameter name {name!r} is not an identifier")
    return {name: _plain(value) for name, value in values.items()}


def _plain(value: Any) -> Any:
    """``value`` with what has no Python literal (YAML dates and times) as text, as the
    parameters cell writes each value as a literal."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):  # date, datetime, time
        return value.isoformat()
    return str(value)


async def _image_id(provisioner: Any) -> str | None:
    """The id of the image the kernel's container was created from (never raises)."""
    container_id = getattr(provisioner, "container_id", None)
    backend = getattr(provisioner, "backend", None)
    if container_id is None or backend is None:
        return None
    try:
        for row in await backend.find():
            if row.get("Id") == container_id:
                return str(row.get("ImageID")) or None
    except Exception:
        return None
    return None


async def record_sandbox(nb: Any, kernel_name: str, km: Any) -> None:
    """Write which sandbox ran ``nb`` into ``metadata["kernel-sandbox"]["executed"]``.

    Best effort: what cannot be found out is left out, and this never raises.
    """
    record: dict[str, Any] = {
        "kernelspec": kernel_name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        from kernel_sandbox import __version__

        record["kernel-sandbox"] = __version__
        provisioner = getattr(km, "provisioner", None)
        if provisioner is not None and hasattr(provisioner, "policy_sources"):
            if getattr(provisioner, "via_service", None) is not None:
                record["via_service"] = True
                record["profile"] = getattr(provisioner, "profile", None)
            else:
                policy = provisioner.policy
                record["profile"] = provisioner.profile  # a kernelspec's pinned one included
                record["image"] = policy.image
                record["image_id"] = await _image_id(provisioner)
                record["runtime"] = policy.runtime
        else:
            record["sandboxed"] = False
    except Exception:
        pass
    own = dict(nb.metadata.get(KEY) or {})
    own["executed"] = {k: v for k, v in record.items() if v is not None}
    nb.metadata[KEY] = own


def sandbox_of(nb: Any, km: Any) -> dict[str, str]:
    """What :func:`record_sandbox` wrote, plus the container's short id, for the reports."""
    record = (nb.metadata.get(KEY) or {}).get("executed") or {}
    keys = ("kernelspec", "profile", "image", "runtime")
    found = {k: str(record[k]) for k in keys if k in record}
    container = getattr(getattr(km, "provisioner", None), "container_id", None)
    if isinstance(container, str) and container:
        found["container"] = container[:12]
    return found

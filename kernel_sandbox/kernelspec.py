"""Kernelspecs: install the shipped ``python3-sandbox`` and write sandboxed variants.

A sandboxed kernelspec is an ordinary kernelspec whose ``metadata.kernel_provisioner``
names ``docker-sandbox`` and carries the policy values in its ``config``; Jupyter needs
nothing else to pick it up.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .errors import KernelspecError
from .policy import SandboxPolicy

__all__ = ["PROVISIONER_NAME", "install_kernelspec", "shipped_kernelspecs", "write_kernelspec"]

PROVISIONER_NAME = "docker-sandbox"


def shipped_kernelspecs_dir() -> Path:
    packaged = Path(__file__).parent / "_shared" / "kernelspecs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "kernelspecs"


def shipped_kernelspecs() -> list[Path]:
    """The kernelspec directories that come with kernel-sandbox."""
    return sorted(p for p in shipped_kernelspecs_dir().iterdir() if (p / "kernel.json").exists())


def sandbox_spec(
    argv: list[str],
    display_name: str,
    language: str = "python",
    policy: dict[str, Any] | None = None,
    profile: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A kernel.json dict for ``argv`` run inside the sandbox with ``policy`` values.

    Raises:
        PolicyError: a policy value is invalid (checked now, not at kernel start).
    """
    config: dict[str, Any] = {}
    if profile:
        config["profile"] = profile
    if policy:
        SandboxPolicy.from_mapping(policy)  # validate before writing anything
        config.update(policy)
    metadata = dict(extra_metadata or {})
    metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME, "config": config}
    return {
        "argv": argv,
        "display_name": display_name,
        "language": language,
        "interrupt_mode": "signal",
        "metadata": metadata,
    }


def install_kernelspec(
    source: Path, name: str | None = None, user: bool = False, prefix: str | None = None
) -> str:
    """Install one kernelspec directory; return where it went.

    Raises:
        KernelspecError: the target is not writable.
    """
    try:
        return KernelSpecManager().install_kernel_spec(
            str(source), kernel_name=name or source.name, user=user, prefix=prefix
        )
    except OSError as exc:
        where = "--user" if not user else "--prefix"
        raise KernelspecError(
            f"cannot install kernelspec {name or source.name}: {exc}; try {where}"
        ) from exc


def write_kernelspec(
    name: str, spec: dict[str, Any], user: bool = False, prefix: str | None = None,
    resources: Path | None = None,
) -> str:
    """Install ``spec`` as kernelspec ``name`` (logos copied from ``resources``)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        if resources is not None:
            for logo in resources.glob("logo-*"):
                shutil.copy(logo, folder / logo.name)
        (folder / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        return install_kernelspec(folder, name, user=user, prefix=prefix)


def find_kernelspec(name: str) -> Any:
    """The installed kernelspec ``name``.

    Raises:
        KernelspecError: no such kernelspec (with the names that do exist).
    """
    manager = KernelSpecManager()
    try:
        return manager.get_kernel_spec(name)
    except NoSuchKernel:
        known = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise KernelspecError(
            f"no kernelspec named {name!r} (installed: {known}); run `kernel-sandbox install`"
        ) from None

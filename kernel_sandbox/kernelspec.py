"""Kernelspecs: install the shipped ``python3-sandbox`` and write sandboxed variants.

A sandboxed kernelspec is an ordinary kernelspec whose ``metadata.kernel_provisioner``
names ``docker-sandbox`` and carries the policy values in its ``config``; Jupyter needs
nothing else to pick it up. Every kernel.json is written by :func:`write_kernelspec`; the
``install`` and ``wrap`` commands (:mod:`kernel_sandbox.cli.install`) build on these.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from kernel_sandbox.errors import KernelspecError
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = [
    "PROVISIONER_NAME",
    "check_kernel_name",
    "find_kernelspec",
    "install_kernelspec",
    "read_kernelspec",
    "sandbox_spec",
    "shipped_kernelspecs",
    "with_policy",
    "wrapped_spec",
    "write_kernelspec",
]

PROVISIONER_NAME = "docker-sandbox"
# The argv the shipped python3-sandbox kernelspec runs inside the image.
PYTHON_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
_KERNEL_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)  # what jupyter_client accepts


def check_kernel_name(name: str) -> str:
    """Refuse a kernelspec name Jupyter would not accept.

    Raises:
        KernelspecError: naming the allowed characters.
    """
    if not _KERNEL_NAME.match(name):
        raise KernelspecError(
            f"{name!r} is not a valid kernelspec name: use letters, digits, '.', '_' and '-'"
        )
    return name


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


def read_kernelspec(folder: Path) -> dict[str, Any]:
    """The kernel.json of the kernelspec folder ``folder``, as a dict."""
    spec: dict[str, Any] = json.loads((folder / "kernel.json").read_text())
    return spec


def with_policy(spec: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with ``values`` added to its provisioner config.

    Raises:
        PolicyError: the config that results is not a valid policy (checked now, not at
            kernel start).
    """
    spec = copy.deepcopy(spec)
    provisioner = spec.setdefault("metadata", {}).setdefault("kernel_provisioner", {})
    config = provisioner.setdefault("config", {})
    config.update(values)
    SandboxPolicy.from_mapping({k: v for k, v in config.items() if k != "profile"})
    return spec


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
    name: str,
    spec: dict[str, Any],
    user: bool = False,
    prefix: str | None = None,
    resources: Path | None = None,
) -> str:
    """Install ``spec`` as kernelspec ``name``; the other files of ``resources`` (logos,
    kernel.js) are copied along."""
    check_kernel_name(name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        if resources is not None:
            for item in resources.iterdir():
                if item.is_file() and item.name != "kernel.json":
                    shutil.copy(item, folder / item.name)
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


def wrapped_spec(
    spec: KernelSpec,
    name: str,
    image: str,
    display_name: str | None = None,
    policy: dict[str, Any] | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """A kernel.json dict that runs ``spec``'s argv inside ``image`` under the sandbox.

    An absolute program path in argv (a host interpreter) becomes its bare name, looked up
    on the image's PATH; the kernel's env and metadata are kept.

    Raises:
        KernelspecError: ``spec`` is already sandboxed, or its argv needs host files.
        PolicyError: a policy value is invalid.
    """
    metadata = dict(spec.metadata or {})
    if (metadata.get("kernel_provisioner") or {}).get("provisioner_name") == PROVISIONER_NAME:
        raise KernelspecError(
            f"kernelspec {name!r} is already sandboxed; install a variant with "
            "`kernel-sandbox install --name NEW --profile P ...` instead"
        )
    argv = list(spec.argv)
    if any("{resource_dir}" in arg for arg in argv):
        raise KernelspecError(
            f"kernelspec {name!r} runs files from its own folder ({{resource_dir}}), which "
            "the sandbox cannot see; build an image that contains the kernel and wrap a "
            "kernelspec whose argv names the program in that image"
        )
    if "{connection_file}" not in " ".join(argv):
        raise KernelspecError(f"kernelspec {name!r} has no {{connection_file}} in its argv")
    if argv and os.path.isabs(argv[0]):
        argv[0] = os.path.basename(argv[0])
    metadata.pop("kernel_provisioner", None)
    metadata["debugger"] = False  # as python3-sandbox: no debugger across the sandbox boundary
    out = sandbox_spec(
        argv,
        display_name or f"{spec.display_name} (sandboxed)",
        spec.language or "",
        policy={"image": image, **(policy or {})},
        profile=profile,
        extra_metadata=metadata,
    )
    if spec.env:
        out["env"] = dict(spec.env)
    return out

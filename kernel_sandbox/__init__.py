"""kernel-sandbox: every Jupyter kernel in an ephemeral, network-less container.

The package is laid out by where code runs and what it is for (docs/architecture.md):
``inside/`` runs in the container (standard library only; the image build copies it whole),
everything else on the host. Importing the package has no side effects: it is also copied
into the kernel image, beside ``inside/``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


# The Python API for programs (kernel_sandbox.api), imported only when first used.
_API = ("AsyncSandbox", "ExecutionError", "Result", "RunResult", "Sandbox")


def __getattr__(name: str) -> Any:
    import importlib

    # ``from kernel_sandbox import data`` is the in-kernel data API (kernel_sandbox.inside.data).
    if name == "data":
        return importlib.import_module("kernel_sandbox.inside.data")
    if name in _API:
        return getattr(importlib.import_module("kernel_sandbox.api"), name)
    raise AttributeError(f"module 'kernel_sandbox' has no attribute {name!r}")

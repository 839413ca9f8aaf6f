"""Helpers to start real sandboxed kernels in tests and always clean them up."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

SANDBOX = "python3-sandbox"


def jupyter_kernels_dir() -> Path:
    """The kernels folder of the test JUPYTER_PATH (set up by conftest.jupyter_path)."""
    return Path(os.environ["JUPYTER_PATH"].split(os.pathsep)[0]) / "kernels"


def make_kernelspec(
    name: str, config: dict[str, Any] | None = None, argv: list[str] | None = None
) -> str:
    """Write a sandboxed kernelspec ``name`` with provisioner ``config``; return its name."""
    folder = jupyter_kernels_dir() / name
    folder.mkdir(exist_ok=True)
    spec = {
        "argv": argv or ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"test {name}",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config or {}}
        },
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    return name


@contextmanager
def sandbox_kernel(
    kernel_name: str = SANDBOX, config: Any = None, **start_kwargs: Any
) -> Iterator[tuple]:
    """Start a kernel with a blocking client; shut both down whatever happens."""
    km = KernelManager(kernel_name=kernel_name, **({"config": config} if config else {}))
    km.start_kernel(**start_kwargs)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_cell(kc, code: str, timeout: float = 30) -> dict:
    """Execute ``code`` with a BlockingKernelClient; return stdout, stderr, status, error."""
    outputs: dict = {"stdout": "", "stderr": "", "status": None, "ename": None, "evalue": None}

    def output_hook(msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            outputs[content["name"]] += content["text"]
        elif kind == "error":
            outputs["ename"], outputs["evalue"] = content["ename"], content["evalue"]

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=output_hook)
    outputs["status"] = reply["content"]["status"]
    return outputs


def bridge_gateway() -> str:
    """The host's own address on Docker's default bridge (a listener there is on this machine)."""
    import ipaddress

    import docker

    config = docker.from_env().networks.get("bridge").attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


def is_sandbox_uid(uid: int) -> bool:
    """Whether ``uid`` is one a default kernel runs as: as root, a uid of its own from the
    default uid_range (kernel_sandbox.host.uids); otherwise the user's own."""
    from kernel_sandbox.host.uids import DEFAULT_RANGE, UidRange

    return uid in UidRange.parse(DEFAULT_RANGE) if os.getuid() == 0 else uid == os.getuid()


# the same, as a regular expression for text (2000000-2065535 as root)
SANDBOX_UID_PATTERN = r"20[0-6]\d{4}" if os.getuid() == 0 else str(os.getuid())

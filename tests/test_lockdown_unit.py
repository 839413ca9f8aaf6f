"""The lockdown's decisions without a server: which kernelspecs exist for a locked server,
what a start for each name gets, and the terminal container's options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from tornado import web

from kernel_sandbox.engine.container import ContainerRequest, container_options
from kernel_sandbox.lockdown import SandboxLockdown
from kernel_sandbox.lockdown.kernels import LockedKernelSpecManager, admit, locked_class
from kernel_sandbox.policy.model import SandboxPolicy

SANDBOXED = {
    "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "sandboxed",
    "language": "python",
    "metadata": {"kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": {}}},
}
HOST = {**SANDBOXED, "display_name": "host", "metadata": {}}


@pytest.fixture
def specs(tmp_path: Path) -> KernelSpecManager:
    for name, spec in (("box", SANDBOXED), ("box2", SANDBOXED), ("host", HOST)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kernel.json").write_text(json.dumps(spec))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "kernel.json").write_text("{not json")
    cls = locked_class(KernelSpecManager, LockedKernelSpecManager, SandboxLockdown())
    return cls(kernel_dirs=[str(tmp_path)], ensure_native_kernel=True)  # type: ignore[no-any-return]


def test_only_sandboxed_kernelspecs_exist(specs: KernelSpecManager) -> None:
    assert sorted(specs.find_kernel_specs()) == ["box", "box2"]
    assert sorted(specs.get_all_specs()) == ["box", "box2"]
    assert specs.get_kernel_spec("box").display_name == "sandboxed"
    for name in ("host", "python3"):
        with pytest.raises(NoSuchKernel):
            specs.get_kernel_spec(name)
    with pytest.raises(ValueError):  # as without lockdown: a broken kernel.json starts nothing
        specs.get_kernel_spec("broken")
    assert {"host", "python3"} <= set(specs.all_kernel_names())  # type: ignore[attr-defined]


def test_map_mode(specs: KernelSpecManager) -> None:
    lockdown = SandboxLockdown(map_to="box")
    assert admit(lockdown, specs, "box2") == "box2"
    for name in ("host", "python3", "nope", None, "", "50%"):
        assert admit(lockdown, specs, name) == "box"


def test_refuse_mode(specs: KernelSpecManager) -> None:
    lockdown = SandboxLockdown(map_to="box", on_unsandboxed="refuse")
    assert admit(lockdown, specs, None) == "box"
    with pytest.raises(web.HTTPError) as refused:
        admit(lockdown, specs, "host")
    assert refused.value.status_code == 403
    assert refused.value.log_message == (
        "kernel 'host' is not sandboxed: this server starts only sandboxed kernels "
        "(box, box2); ask for one of them"
    )
    with pytest.raises(web.HTTPError) as unknown:
        admit(lockdown, specs, "no-such")
    assert unknown.value.status_code == 404
    with pytest.raises(web.HTTPError) as odd:
        admit(lockdown, specs, "%s<b>")  # never echoed: not a kernelspec name
    assert odd.value.log_message is not None and "%s" not in odd.value.log_message


def test_terminal_container_options() -> None:
    base = dict(
        name="t",
        policy=SandboxPolicy(),
        command=["/bin/bash"],
        env={},
        labels={},
        runtime_dir="/tmp/x",
        user="1000:1000",
    )
    kernel = container_options(ContainerRequest(**base))  # type: ignore[arg-type]
    terminal = container_options(ContainerRequest(**base, terminal=True))  # type: ignore[arg-type]
    assert "tty" not in kernel and "auto_remove" not in kernel
    assert terminal.pop("tty") and terminal.pop("stdin_open") and terminal.pop("auto_remove")
    assert terminal == kernel  # the same hardening

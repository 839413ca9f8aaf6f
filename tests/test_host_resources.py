"""Unit tests (no engine) of the one close of a kernel's host resources, on every path: a
restart, a failed start, the final cleanup, interpreter exit; twice; after things vanished."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec

from kernel_sandbox.engine.backend import ContainerState, DockerBackend
from kernel_sandbox.errors import EngineUnavailable, KernelStartError, PolicyError, SandboxError
from kernel_sandbox.host.exits import ExitRegistry
from kernel_sandbox.host.reap import SweepOnce
from kernel_sandbox.host.resources import KernelResources
from kernel_sandbox.inside.contract import IMAGE_KIND_KERNEL, LIFELINE, label
from kernel_sandbox.provisioner import DockerSandboxProvisioner

LOG = logging.getLogger("test-host-resources")


class FakeBackend(DockerBackend):
    """Records removals; ``remove_error`` is raised by the next removal."""

    def __init__(self) -> None:
        super().__init__(client_factory=lambda: pytest.fail("no engine in unit tests"))
        self.removed: list[str] = []
        self.remove_error: Exception | None = None
        self.start_error: Exception | None = None
        self.closed = 0

    def remove_blocking(self, container_id: str) -> None:
        if self.remove_error is not None:
            error, self.remove_error = self.remove_error, None
            raise error
        self.removed.append(container_id)

    async def image_labels(self, tag: str) -> dict[str, str] | None:
        return {label("image"): IMAGE_KIND_KERNEL}

    async def start(self, request: Any) -> str:
        if self.start_error is not None:
            raise self.start_error
        return "c0ffee"

    async def state(self, container_id: str) -> ContainerState:
        return ContainerState(running=False, exit_code=3)

    async def logs_tail(self, container_id: str, lines: int = 15) -> str:
        return "boom"

    async def find(self, **labels: str) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        self.closed += 1


class FakeBroker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def revoke(self, kernel_id: str, reason: str) -> int:
        self.calls.append(("revoke", kernel_id))
        return 1

    def release(self, kernel_id: str, reason: str = "") -> None:
        self.calls.append(("release", kernel_id))

    def serve(self, kernel_id: str, shared_dir: Path) -> None:
        self.calls.append(("serve", kernel_id))


class FakeEgress:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "rt")


def running(root: str, backend: FakeBackend, exits: ExitRegistry) -> KernelResources:
    """Resources as a started kernel holds them (container, dir, lifeline, data, egress)."""
    resources = KernelResources("k1", backend, LOG, exits)
    assert resources.open_runtime_dir(root, (os.getuid(), os.getgid())) is True
    resources.container_id, resources.container_name = "c1", "ks-k1"
    resources.serve_data(FakeBroker())  # type: ignore[arg-type]
    resources.egress = FakeEgress()  # type: ignore[assignment]
    resources.watch(1, 0, lambda reason: None)
    return resources


def test_restart_then_final_close_then_again(root: str) -> None:
    backend, exits = FakeBackend(), ExitRegistry()
    resources = running(root, backend, exits)
    broker, egress = resources._broker, resources.egress
    runtime_dir = resources.runtime_dir
    assert runtime_dir is not None and resources in exits

    resources.close(restart=True)
    assert backend.removed == ["c1"] and resources.container_id is None
    assert broker.calls == [("serve", "k1"), ("revoke", "k1")]  # type: ignore[union-attr]
    assert runtime_dir.exists() and (runtime_dir.host_dir / LIFELINE).exists()
    assert resources.egress is egress and egress.closed == 0  # type: ignore[union-attr]
    assert resources in exits  # still holds the directory

    resources.close()
    assert not runtime_dir.exists() and resources.runtime_dir is None
    assert broker.calls[-1] == ("release", "k1")  # type: ignore[union-attr]
    assert egress.closed == 1 and resources.egress is None  # type: ignore[union-attr]
    assert resources not in exits

    resources.close()  # idempotent: nothing more happens
    resources.close(restart=True)
    assert backend.removed == ["c1"] and egress.closed == 1  # type: ignore[union-attr]
    assert broker.calls[-1] == ("release", "k1")  # type: ignore[union-attr]


def test_close_after_everything_vanished(root: str) -> None:
    resources = running(root, FakeBackend(), ExitRegistry())
    assert resources.runtime_dir is not None
    assert resources.runtime_dir.remove().complete  # its tmpfs too, when it has one
    resources.close()
    assert resources.runtime_dir is None and resources.container_id is None


def test_an_unreachable_engine_leaves_the_container_for_gc(root: str) -> None:
    backend, exits = FakeBackend(), ExitRegistry()
    resources = running(root, backend, exits)
    backend.remove_error = EngineUnavailable("engine gone")
    resources.close()
    assert resources.container_id is None and resources.runtime_dir is None
    assert resources not in exits


def test_a_refused_removal_releases_the_rest_then_raises_and_exit_retries(root: str) -> None:
    backend, exits = FakeBackend(), ExitRegistry()
    resources = running(root, backend, exits)
    backend.remove_error = SandboxError("refused")
    with pytest.raises(SandboxError, match="refused"):
        resources.close()
    assert resources.runtime_dir is None and resources.egress is None
    assert resources.container_id == "c1" and resources in exits
    exits.close_all()  # what interpreter exit runs
    assert backend.removed == ["c1"] and resources not in exits


def test_aclose_runs_in_this_thread_when_no_worker_may_start(root: str) -> None:
    resources = running(root, FakeBackend(), ExitRegistry())

    async def at_exit() -> None:
        await asyncio.get_running_loop().shutdown_default_executor()  # like interpreter exit
        await resources.aclose()

    asyncio.run(at_exit())
    assert resources.runtime_dir is None


def test_exit_registry_hooks_lazily_and_spares_other_processes(monkeypatch) -> None:
    hooked: list[Any] = []
    monkeypatch.setattr("atexit.register", hooked.append)
    exits = ExitRegistry()
    assert hooked == []

    class Entry:
        kernel_id, log = "k", LOG

        def __init__(self, fail: bool = False) -> None:
            self.fail, self.closed = fail, 0

        def close(self, restart: bool = False) -> None:
            self.closed += 1
            if self.fail:
                raise RuntimeError("cannot")

    failing, fine, parents = Entry(fail=True), Entry(), Entry()
    exits.add(failing)
    exits.add(fine)
    assert hooked == [exits.close_all]
    monkeypatch.setattr(os, "getpid", lambda: -1)
    exits.add(parents)  # registered "by another process"
    monkeypatch.undo()
    exits.close_all()
    assert (failing.closed, fine.closed, parents.closed) == (1, 1, 0)


def test_importing_the_provisioner_registers_no_exit_hook() -> None:
    code = (
        "import atexit; hooks = []; atexit.register = hooks.append\n"
        "import kernel_sandbox.provisioner, kernel_sandbox.host.resources\n"
        "ours = [h for h in hooks if 'kernel_sandbox' in (getattr(h, '__module__', '') or '')]\n"
        "assert ours == [], ours\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def sandbox_provisioner(root: str, backend: FakeBackend, exits: ExitRegistry, **config: Any):
    spec = KernelSpec(argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    spec.name = "unit"
    provisioner = DockerSandboxProvisioner(
        kernel_id="0123456789",
        kernel_spec=spec,
        engine=backend,
        exit_registry=exits,
        orphan_sweeps=SweepOnce(),
        **config,  # policy keys, as a kernelspec gives them
    )
    provisioner.runtime_root, provisioner.launch_timeout = root, 5.0
    provisioner.uid_claims = str(Path(root).parent / "uids")
    provisioner.uid_range = "2000000-2000009"
    provisioner.reap_orphans = False
    return provisioner


def claims(root: str) -> list[str]:
    folder = Path(root).parent / "uids"
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.skipif(os.getuid() != 0, reason="a uid of its own needs root")
def test_the_uid_claim_lives_as_long_as_the_kernel(root: str, caplog) -> None:
    caplog.set_level(logging.INFO)
    backend, exits = FakeBackend(), ExitRegistry()
    provisioner = sandbox_provisioner(root, backend, exits)
    provisioner.log = LOG

    async def start() -> dict[str, Any]:
        kwargs = await provisioner.pre_launch(env={})
        await provisioner.launch_kernel(kwargs.pop("cmd"), **kwargs)
        return kwargs

    with pytest.raises(KernelStartError):
        asyncio.run(start())
    assert claims(root) == []  # a failed first start gives its uid back

    provisioner._launched = True  # a restart keeps the uid and the directory owned by it
    with pytest.raises(KernelStartError):
        asyncio.run(start())
    held = claims(root)
    assert len(held) == 1 and 2000000 <= int(held[0]) <= 2000009
    assert provisioner.runtime_dir is not None
    assert provisioner.runtime_dir.shared.stat().st_uid == int(held[0])
    kwargs = asyncio.run(provisioner.pre_launch(env={}))
    assert kwargs["user"] == f"{held[0]}:{held[0]}" and claims(root) == held
    # said once, at the first start (a restart keeps the uid and says nothing)
    assert caplog.text.count(": a uid of its own from uid_range 2000000-2000009") == 1

    asyncio.run(provisioner.cleanup(restart=False))
    asyncio.run(provisioner.cleanup(restart=False))  # twice is fine
    assert claims(root) == []


@pytest.mark.skipif(os.getuid() != 0, reason="a uid of its own needs root")
def test_a_range_over_a_host_account_stops_the_start(root: str) -> None:
    provisioner = sandbox_provisioner(root, FakeBackend(), ExitRegistry())
    provisioner.uid_range = "1-70000"
    with pytest.raises(PolicyError, match="uid_range: 1-70000 overlaps ids this host uses"):
        asyncio.run(provisioner.pre_launch(env={}))
    assert claims(root) == [] and not Path(root).exists() or os.listdir(root) == []


def test_a_failed_start_leaves_nothing_and_a_failed_restart_keeps_the_directory(
    root: str,
) -> None:
    backend, exits = FakeBackend(), ExitRegistry()
    provisioner = sandbox_provisioner(root, backend, exits)

    async def start() -> None:
        kwargs = await provisioner.pre_launch(env={})
        await provisioner.launch_kernel(kwargs.pop("cmd"), **kwargs)

    with pytest.raises(KernelStartError, match="exited with status 3"):
        asyncio.run(start())
    assert backend.removed == ["c0ffee"]
    assert provisioner.runtime_dir is None and os.listdir(root) == []
    assert provisioner.resources not in exits

    provisioner._launched = True  # as after a successful first start: now a restart
    with pytest.raises(KernelStartError):
        asyncio.run(start())
    runtime_dir = provisioner.runtime_dir
    assert runtime_dir is not None and runtime_dir.exists()
    assert provisioner.container_id is None and provisioner.resources in exits

    asyncio.run(provisioner.cleanup(restart=False))
    assert not runtime_dir.exists() and provisioner.resources not in exits
    assert backend.closed == 1  # an injected backend is not the process's shared one
    asyncio.run(provisioner.cleanup(restart=False))  # twice is fine


def test_a_failed_pre_launch_leaves_nothing(root: str) -> None:
    backend, exits = FakeBackend(), ExitRegistry()
    provisioner = sandbox_provisioner(root, backend, exits, network="allowlist", egress=["a.test"])

    async def refused(*args: Any) -> dict[str, str]:
        return {}

    backend.image_labels = refused  # type: ignore[method-assign]
    with pytest.raises(SandboxError, match="needs an image built by"):
        asyncio.run(provisioner.pre_launch(env={}))
    assert provisioner.runtime_dir is None and os.listdir(root) == []
    assert provisioner.resources not in exits


def test_the_orphan_sweep_uses_the_injected_backend_once_per_root(root: str) -> None:
    backend, sweeps = FakeBackend(), SweepOnce()
    found: list[str] = []

    async def find(**labels: str) -> list[dict[str, Any]]:
        found.append("find")
        return []

    backend.find = find  # type: ignore[method-assign]
    assert sweeps.start(backend, root, LOG) is True
    assert sweeps.start(backend, root, LOG) is False
    for _ in range(200):
        if found:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert found == ["find"]

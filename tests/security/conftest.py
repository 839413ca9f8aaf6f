"""Fixtures for the attack battery: host-side bait, one shared kernel per runtime, the record.

Probes that leave their kernel intact run in ``sandbox``, one kernel per runtime for the whole
session, started in a workspace full of links that point out of it and with a fake secret in
the host environment. Probes that kill or flood their kernel start their own with
``dedicated_kernel``. Every kernel here is started through jupyter_client with the shipped
kernelspec (or its runsc twin) and the default policy: profile strict.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from support.kernels import run_cell, sandbox_kernel
from test_containment import RUNTIMES, runtime_kernel

from .battery import PRELUDE, Battery, parse_report, run_facts

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "security.md"
_BATTERY = pytest.StashKey[Battery]()


# -- the record ---------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_BATTERY] = Battery(runtimes=tuple(RUNTIMES))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.when == "call" or (report.when == "setup" and not report.passed):
        battery = item.config.stash[_BATTERY]
        if report.passed:
            battery.outcomes[item.nodeid] = "held"
        elif hasattr(report, "wasxfail"):
            battery.outcomes[item.nodeid] = "known gap"
        else:
            battery.outcomes[item.nodeid] = "failed"
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    battery = session.config.stash.get(_BATTERY, None)
    if battery is not None and battery.complete():
        battery.write(TABLE)


@pytest.fixture(scope="session")
def battery(request: pytest.FixtureRequest, docker_client: Any, kernel_image: str) -> Battery:
    record = request.config.stash[_BATTERY]
    if not record.facts:
        record.facts.update(run_facts(docker_client, kernel_image))
    return record


@pytest.fixture
def observe(battery: Battery, runtime: str, request: pytest.FixtureRequest):
    """``observe(probe_id, text)``: what this probe saw under this test's runtime."""

    def record(probe_id: str, text: str) -> None:
        battery.observe(probe_id, runtime, text, request.node.nodeid)

    return record


# -- kernels ------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A running probe kernel and its manager and client."""

    km: Any
    kc: Any
    runtime: str

    @property
    def container_id(self) -> str:
        return str(self.km.provisioner.container_id)

    def probe(self, code: str, timeout: float = 60) -> dict[str, Any]:
        """Run a probe cell; return the JSON object it reported last."""
        try:
            out = run_cell(self.kc, code, timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(
                f"probe kernel ({self.runtime}) gave no reply in {timeout:.0f} s; its "
                f"container: {self.describe()}"
            ) from exc
        assert out["status"] == "ok", (
            f"probe cell failed under {self.runtime}: {out['ename']}: {out['evalue']}\n"
            f"{out['stdout']}{out['stderr']}"
        )
        return parse_report(out["stdout"])

    def describe(self) -> str:
        """The container's state and last log lines, for failure messages."""
        try:
            client = docker.from_env()
        except docker.errors.DockerException as exc:
            return f"{self.container_id[:12]}: the engine does not answer ({exc})"
        try:
            attrs = client.api.inspect_container(self.container_id)
            logs = client.api.logs(self.container_id, tail=5).decode(errors="replace")
        except docker.errors.NotFound:
            return f"{self.container_id[:12]} is gone (removed by someone)"
        except docker.errors.DockerException as exc:
            return f"{self.container_id[:12]}: the engine does not answer ({exc})"
        finally:
            client.close()
        state = attrs["State"]
        return (
            f"{self.container_id[:12]} {state['Status']} exit={state['ExitCode']} "
            f"oom={state['OOMKilled']} finished={state['FinishedAt']}; logs: {logs!r}"
        )


@dataclass
class Bait:
    """Host files a sandbox must not reach, and the workspace the shared kernel starts in."""

    root: Path  # a host directory; only its ws/ subdirectory is mounted
    workspace: Path
    outside: Path  # beside the workspace, not mounted
    in_root_home: Path  # in /root (or the user's home), never mounted
    secret: str  # the text inside both files
    env_name: str
    env_value: str


@pytest.fixture(scope="session", params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def x86_64() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the probes use x86_64 system call numbers")


@pytest.fixture(scope="session")
def bait() -> Iterator[Bait]:
    base = "/srv" if os.access("/srv", os.W_OK) else tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="ks-sec-", dir=base))
    home = Path("/root") if os.access("/root", os.W_OK) else Path.home()
    token = secrets.token_hex(8)
    secret = f"ks-security-secret-{token}"
    bait = Bait(
        root=root,
        workspace=root / "ws",
        outside=root / "secret.txt",
        in_root_home=home / f"ks-sec-{token}.txt",
        secret=secret,
        env_name="KS_SECURITY_FAKE_SECRET",
        env_value=f"ks-env-secret-{token}",
    )
    root.chmod(0o755)  # readable by the sandbox's uid: only the mount may stop it
    bait.workspace.mkdir(mode=0o755)
    for path in (bait.outside, bait.in_root_home):
        path.write_text(secret)
        path.chmod(0o644)
    (bait.workspace / "inside.txt").write_text("visible\n")
    (bait.workspace / "inside.txt").chmod(0o666)
    bait.workspace.chmod(0o777)  # writable by anyone on the host: only the read-only mount stops it
    (bait.workspace / "abs-link").symlink_to(bait.outside)
    (bait.workspace / "rel-link").symlink_to(Path("..") / bait.outside.name)
    (bait.workspace / "dir-link").symlink_to(root)
    (bait.workspace / "home-link").symlink_to(bait.in_root_home)
    try:
        yield bait
    finally:
        shutil.rmtree(root, ignore_errors=True)
        bait.in_root_home.unlink(missing_ok=True)


@contextmanager
def started(
    runtime: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    kernel_name: str | None = None,
    config: Any = None,
) -> Iterator[Sandbox]:
    """Start a probe kernel for ``runtime`` in ``cwd``; ``env`` is set in the host process
    only while the kernel starts (the provisioner must not pass it in). ``kernel_name`` and
    ``config`` (traitlets): another kernelspec than the shipped one, Jupyter config."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        name = kernel_name or runtime_kernel(runtime)
        with sandbox_kernel(name, config=config, cwd=str(cwd)) as (km, kc):
            _restore(saved)
            sandbox = Sandbox(km, kc, runtime)
            out = run_cell(kc, PRELUDE)
            assert out["status"] == "ok", out
            run_cell(kc, f"_PRELUDE = {PRELUDE!r}")
            yield sandbox
    finally:
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def sandbox(
    jupyter_path: Path, kernel_image: str, runtime: str, bait: Bait, x86_64: None
) -> Iterator[Sandbox]:
    """The shared probe kernel (kernel A): started in the bait workspace with a host secret,
    claimed from a warm pool (kernel_sandbox.host.pool), so every probe run in it holds for a
    pooled kernel; the dedicated kernels below start cold."""
    from traitlets.config import Config

    from kernel_sandbox.host.pool import process_pool

    config = Config()
    config.DockerSandboxProvisioner.pool_size = 1
    pool = process_pool()
    with started(runtime, bait.workspace, config=config):
        pass  # the first start of a recipe is cold; it fills the pool
    deadline = time.monotonic() + 120
    while not any(pool.counts().values()):
        assert time.monotonic() < deadline, "the warm pool did not fill"
        time.sleep(0.1)
    try:
        env = {bait.env_name: bait.env_value}
        with started(runtime, bait.workspace, env, config=config) as kernel:
            assert str(kernel.km.provisioner.container_name).startswith("ks-pool-")
            pool.close()  # no waiting sandbox outlives this start (the leak checks count them)
            yield kernel
    finally:
        pool.close()


@pytest.fixture
def dedicated_kernel(jupyter_path: Path, kernel_image: str, runtime: str, bait: Bait, x86_64: None):
    """``with dedicated_kernel() as k``: a kernel of this runtime for one damaging probe."""

    @contextmanager
    def start() -> Iterator[Sandbox]:
        cwd = Path(tempfile.mkdtemp(prefix="k-", dir=bait.root))
        cwd.chmod(0o755)
        with started(runtime, cwd) as kernel:
            yield kernel

    return start


@pytest.fixture
def configured_kernel(jupyter_path: Path, kernel_image: str, runtime: str, x86_64: None):
    """``with configured_kernel(name, policy, cwd, state) as k``: a kernel of this runtime
    whose kernelspec ``name`` carries ``policy`` (kernelspec provisioner config) and whose
    data broker keeps its tokens and audit log in ``state``."""

    @contextmanager
    def start(name: str, policy: dict[str, Any], cwd: Path, state: Path) -> Iterator[Sandbox]:
        from support.kernels import make_kernelspec
        from traitlets.config import Config

        spec = make_kernelspec(f"{name}-{runtime}", {"runtime": runtime, **policy})
        config = Config()
        config.DockerSandboxProvisioner.token_db = str(state / "tokens.sqlite")
        config.DockerSandboxProvisioner.audit_log = str(state / "audit.jsonl")
        with started(runtime, cwd, kernel_name=spec, config=config) as kernel:
            yield kernel

    return start

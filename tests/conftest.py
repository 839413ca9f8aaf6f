"""Shared fixtures: a real Docker engine, the real kernel image, the repo's kernelspecs.

In CI (``CI`` set) a missing engine or image is a failure, never a skip. Every test that
starts kernels can ask for ``leak_check``: it fails the test when a container or runtime
directory created during the test is still there afterwards.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from kernel_sandbox.host.owner import Owner

REPO = Path(__file__).resolve().parent.parent
IMAGE = "kernel-sandbox/python:latest"
LABEL = "io.kernel-sandbox.managed=true"
IN_CI = bool(os.environ.get("CI"))


def unavailable(reason: str) -> None:
    """Fail in CI (everything the tests need is installed there), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that restart the Docker engine last: they kill every running container."""
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


@pytest.fixture(scope="session", autouse=True)
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Make the repo's kernelspecs visible to every Jupyter tool the tests start."""
    data = tmp_path_factory.mktemp("jupyter-data")
    kernels = data / "kernels"
    shutil.copytree(REPO / "kernelspecs", kernels)
    # a plain local kernel, using this interpreter, for side-by-side comparisons
    local = kernels / "python3-local"
    local.mkdir()
    (local / "kernel.json").write_text(
        '{"argv": ["%s", "-m", "ipykernel_launcher", "-f", "{connection_file}"],'
        ' "display_name": "Python 3 (local)", "language": "python"}' % sys.executable
    )
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(data), old]))
    yield data
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        unavailable(f"Docker engine not reachable: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def kernel_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"{IMAGE} is missing: run `kernel-sandbox image build`")
    return IMAGE


def _foreign(pid: int) -> bool:
    """True for a live process that is neither this test process nor one of its descendants
    (another session sharing the engine: its kernels are not this test's leaks)."""
    while pid > 1:
        if pid == os.getpid():
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False  # dead: whatever it left could be ours
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return True


def sandbox_containers(client: docker.DockerClient) -> set[str]:
    found = set()
    for container in client.containers.list(all=True, filters={"label": LABEL}):
        owner = container.labels.get("io.kernel-sandbox.owner-pid", "0") or "0"
        if not _foreign(int(owner)):
            found.add(container.id)
    return found


def runtime_dirs() -> set[str]:
    root = Path(f"/tmp/kernel-sandbox-{os.getuid()}")
    found = set()
    for path in root.iterdir() if root.is_dir() else []:
        owner = Owner.load(path)
        if owner is None or not _foreign(owner.pid):
            found.add(str(path))
    return found


@pytest.fixture
def leak_check(docker_client: docker.DockerClient, kernel_image: str) -> Iterator[None]:
    """Fail if the test leaves a sandbox container or runtime directory behind."""
    containers_before, dirs_before = sandbox_containers(docker_client), runtime_dirs()
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = sandbox_containers(docker_client) - containers_before
        leaked_dirs = runtime_dirs() - dirs_before
        if not (leaked or leaked_dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for cid in leaked:  # remove them so one failure does not cascade
        try:
            docker_client.api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
    assert not leaked, f"test left {len(leaked)} sandbox container(s) behind"
    assert not leaked_dirs, f"test left runtime directories behind: {sorted(leaked_dirs)}"

"""Shared fixtures and the test tiers.

Tiers: ``python -m pytest -m "not integration"`` runs the unit tests alone, in seconds, with
the Docker engine out of reach; ``python3 -m pytest`` runs everything. A test is marked
``integration`` by its module (``pytestmark``) or here, when it asks for ``docker_client`` or
``kernel_image`` (every engine fixture depends on one of them). In CI (``CI`` set) a missing
engine or image is a failure, never a skip. Tests that restart the engine run last.

``leak_check`` (see ``support.leaks``) fails a test that leaves a sandbox container or
runtime directory of its own behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from support import IMAGE, NO_ENGINE, REPO, unavailable
from support.kube import START_TIMEOUT as KUBE_START_TIMEOUT
from support.kube import kube_cluster  # noqa: F401  (the Kubernetes 1.20 test cluster)
from support.leaks import Scope, no_leaks
from support.service import ServiceProcess, TestUsers

ENGINE_FIXTURES = {"docker_client", "kernel_image", "sandbox_service", "kube_cluster", "classroom"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the engine ``integration``; run engine restarts last."""
    for item in items:
        needs_engine = ENGINE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if (
            needs_engine
            or any(item.iter_markers("docker"))
            or any(item.iter_markers("engine_restart"))
        ):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)
    # the first test on the Kubernetes cluster may have to build and start it (fixture setup
    # counts against the test's timeout): that one test gets the time a cold build takes
    first_kube = next((i for i in items if "kube_cluster" in getattr(i, "fixturenames", ())), None)
    if first_kube is not None:
        first_kube.add_marker(pytest.mark.timeout(KUBE_START_TIMEOUT + 300))


@pytest.fixture(autouse=True)
def unit_tests_have_no_engine(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit test (and every process it starts) sees no Docker engine: one that needs it
    fails at once, telling its author to mark it ``integration``."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", NO_ENGINE)
        yield


@pytest.fixture(scope="session", autouse=True)
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Make the repo's kernelspecs visible to every Jupyter tool the tests start."""
    data = tmp_path_factory.mktemp("jupyter-data")
    kernels = data / "kernels"
    shutil.copytree(REPO / "kernelspecs", kernels)
    # a plain local kernel, using this interpreter, for side-by-side comparisons
    local = kernels / "python3-local"
    local.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (local)",
        "language": "python",
    }
    (local / "kernel.json").write_text(json.dumps(spec))
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


@pytest.fixture
def leak_check(docker_client: docker.DockerClient, kernel_image: str) -> Iterator[Scope]:
    """Fail if the test leaves a sandbox container or runtime directory of its own behind.
    Yields the test's Scope: ``leak_check.pids.add(pid)`` / ``leak_check.spec(name)`` make
    the sandboxes of another owner process or of a kernelspec count as the test's."""
    yield from no_leaks(docker_client)


@pytest.fixture(scope="session")
def test_users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestUsers]:
    """Three ordinary accounts (kstalice, kstbob, kstcarol), none in the docker group."""
    if os.geteuid() != 0:
        unavailable("making test accounts needs root")
    users = TestUsers(Path("/tmp") / f"ks-users-{os.getpid()}")
    for name in ("kstalice", "kstbob", "kstcarol"):
        users.add(name)
    yield users
    users.forget()
    shutil.rmtree(users.base, ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox_service(
    docker_client: docker.DockerClient, kernel_image: str
) -> Iterator[ServiceProcess]:
    """One `kernel-sandbox serve` for the session, with a policy file tests may rewrite
    (restore it when done: ``sandbox_service.write_policy(DEFAULT_TEST_POLICY)``)."""
    base = Path("/tmp") / f"kss-{os.getpid()}"
    base.mkdir(mode=0o755)
    service = ServiceProcess(base, policy=base / "service.toml", orphan_timeout=30.0)
    service.policy.write_text("")  # type: ignore[union-attr]
    service.start()
    yield service
    service.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def classroom(
    test_users: TestUsers, docker_client: docker.DockerClient, kernel_image: str
) -> Iterator[Any]:
    """One real JupyterHub class for tests/test_hub*.py, with its own sandbox service (the
    class's policy): see support.hub and docs/jupyterhub.md."""
    from support.hub import Classroom

    room = Classroom.start(test_users, Path("/tmp") / f"kshs-{os.getpid()}")
    yield room
    room.stop()

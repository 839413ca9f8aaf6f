"""Clear, actionable errors, each produced for real (nothing is started when input is bad)."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from jupyter_client.manager import KernelManager
from support.kernels import make_kernelspec
from support.leaks import runtime_dirs, sandbox_containers

from kernel_sandbox.engine.backend import ContainerRequest, DockerBackend
from kernel_sandbox.errors import (
    EngineError,
    EngineUnavailable,
    ImageMissing,
    KernelStartError,
    PolicyError,
    RuntimeUnavailable,
    SandboxError,
)
from kernel_sandbox.policy.model import SandboxPolicy


def start(name: str) -> KernelManager:
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    return km


def assert_nothing_started(docker_client, before_containers, before_dirs):
    assert sandbox_containers(docker_client) == before_containers
    assert runtime_dirs() == before_dirs


def test_engine_unreachable(jupyter_path, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    with pytest.raises(EngineUnavailable) as info:
        start("python3-sandbox")
    message = str(info.value)
    assert "cannot reach the Docker engine" in message and "docker info" in message
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, SandboxError)


def test_image_missing_names_the_build_command(jupyter_path, docker_client, kernel_image):
    before = sandbox_containers(docker_client), runtime_dirs()
    name = make_kernelspec("missing-image", {"image": "kernel-sandbox/nope:missing"})
    with pytest.raises(ImageMissing) as info:
        start(name)
    assert "kernel-sandbox/nope:missing" in str(info.value)
    assert "kernel-sandbox image build" in str(info.value)
    assert_nothing_started(docker_client, *before)


def test_container_exiting_during_start_shows_its_log(jupyter_path, docker_client, kernel_image):
    before = sandbox_containers(docker_client), runtime_dirs()
    name = make_kernelspec(
        "dies-at-start",
        argv=["python", "-c", "import sys; print('boom: no kernel today'); sys.exit(3)"],
    )
    with pytest.raises(KernelStartError) as info:
        start(name)
    message = str(info.value)
    assert "exited with status 3" in message
    assert "boom: no kernel today" in message
    assert "kernel-sandbox/python:latest" in message
    assert_nothing_started(docker_client, *before)


def test_gvisor_with_too_few_pids_says_what_to_raise(jupyter_path, docker_client, kernel_image):
    # runsc's own threads count against pids_limit: at 64 it exits with status 2 and prints
    # nothing, which alone tells the user nothing
    before = sandbox_containers(docker_client), runtime_dirs()
    name = make_kernelspec("runsc-few-pids", {"runtime": "runsc", "pids_limit": 64})
    with pytest.raises(KernelStartError) as info:
        start(name)
    message = str(info.value)
    assert "(it printed nothing)" in message
    assert "give pids_limit at least 128" in message
    assert_nothing_started(docker_client, *before)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"memory_limit": "lots"}, "memory_limit: expected a size"),
        ({"workspace": "sometimes"}, "workspace: expected one of none, ro, rw"),
        ({"cpu_limit": -1}, "cpu_limit: expected a positive number"),
        ({"memroy_limit": "1g"}, "unknown provisioner config key 'memroy_limit'"),
        ({"mounts": ["/var/run/docker.sock"]}, "Docker socket"),
        ({"mounts": ["/proc"]}, "refusing to mount /proc"),
        ({"user": "0:0"}, "must not run as root"),
        ({"profile": "nonexistent"}, "unknown profile 'nonexistent'"),
    ],
)
def test_bad_provisioner_config_is_refused_before_anything_starts(
    jupyter_path, docker_client, kernel_image, config, expected
):
    before = sandbox_containers(docker_client), runtime_dirs()
    name = make_kernelspec("bad-config", config)
    with pytest.raises(PolicyError) as info:
        start(name)
    assert expected in str(info.value)
    assert "kernelspec bad-config" in str(info.value)
    assert_nothing_started(docker_client, *before)


def test_unknown_runtime_is_one_clear_line(jupyter_path, docker_client, kernel_image):
    before = sandbox_containers(docker_client), runtime_dirs()
    name = make_kernelspec("no-such-runtime", {"runtime": "kata-nonexistent"})
    with pytest.raises(RuntimeUnavailable) as info:
        start(name)
    assert "no OCI runtime 'kata-nonexistent'" in str(info.value)
    assert "daemon.json" in str(info.value)
    assert_nothing_started(docker_client, *before)


# -- engine errors are translated in the backend, at one choke point -------------------------


def test_an_engine_refusal_becomes_an_engine_error(docker_client):
    """A request the real engine refuses (an invalid image reference): EngineError, not APIError."""
    backend = DockerBackend()
    try:
        with pytest.raises(EngineError) as info:
            asyncio.run(backend.image_labels("bad::reference"))
        assert info.value.status_code == 400
        assert "the Docker engine refused to inspect image bad::reference" in str(info.value)
        assert "invalid reference format" in str(info.value)
        assert isinstance(info.value.__cause__, docker.errors.APIError)
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, SandboxError)
        # refused by the SDK before the engine is asked (an empty id): the same type
        with pytest.raises(EngineError) as info:
            backend.remove_blocking("")
        assert info.value.status_code is None
        assert isinstance(info.value.__cause__, docker.errors.DockerException)
    finally:
        backend.close()


def build_context(tmp_path: Path) -> str:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    return str(tmp_path)


def empty_tarball(tmp_path: Path) -> str:
    (tmp_path / "rootfs.tar").write_bytes(b"")
    return str(tmp_path / "rootfs.tar")


def container_request(tmp_path: Path) -> ContainerRequest:
    return ContainerRequest(
        name="ks-test-unreachable",
        policy=SandboxPolicy(),
        command=["python"],
        env={},
        labels={},
        runtime_dir=str(tmp_path),
        user="1000:1000",
    )


IMAGE = "kernel-sandbox/python:latest"
CID = "0123456789ab"
# Every public method of DockerBackend that talks to the engine, with valid arguments.
BACKEND_CALLS: dict[str, Callable[[DockerBackend, Path], Any]] = {
    "start": lambda b, tmp: b.start(container_request(tmp)),
    "create": lambda b, tmp: b.create(container_request(tmp)),
    "state": lambda b, tmp: b.state(CID),
    "signal": lambda b, tmp: b.signal(CID, 2),
    "remove": lambda b, tmp: b.remove(CID),
    "remove_blocking": lambda b, tmp: b.remove_blocking(CID),
    "logs_tail": lambda b, tmp: b.logs_tail(CID),
    "find": lambda b, tmp: b.find(kernel_id="x"),
    "runtimes": lambda b, tmp: b.runtimes(),
    "engine_info": lambda b, tmp: b.engine_info(),
    "memory_usage": lambda b, tmp: b.memory_usage(CID),
    "ping": lambda b, tmp: b.ping(),
    "image_exists": lambda b, tmp: b.image_exists(IMAGE),
    "image_labels": lambda b, tmp: b.image_labels(IMAGE),
    "pull": lambda b, tmp: b.pull("kernel-sandbox/base:none"),
    "run_once": lambda b, tmp: b.run_once(IMAGE, ["true"]),
    "build": lambda b, tmp: b.build(build_context(tmp), "ks-test/none:x", {}, {}, print),
    "import_rootfs": lambda b, tmp: b.import_rootfs(empty_tarball(tmp), "ks-test/none:x"),
}


def call(backend: DockerBackend, method: str, tmp_path: Path) -> Any:
    result = BACKEND_CALLS[method](backend, tmp_path)
    if isinstance(result, Coroutine):
        return asyncio.run(result)
    return result


def test_every_backend_method_is_covered():
    public = {
        name
        for name in dir(DockerBackend)
        if not name.startswith("_") and callable(getattr(DockerBackend, name))
    }
    assert public - {"close"} == set(BACKEND_CALLS)


@pytest.mark.parametrize("method", sorted(BACKEND_CALLS))
def test_an_unreachable_engine_is_engine_unavailable_from_every_method(tmp_path, method):
    """Nothing listens on the socket: each method raises EngineUnavailable, none a requests
    or docker error (the client is created without asking the engine for its version)."""
    factory = functools.partial(
        docker.DockerClient, base_url=f"unix://{tmp_path}/no-engine.sock", version="1.41"
    )
    backend = DockerBackend(factory)
    try:
        with pytest.raises(EngineUnavailable) as info:
            call(backend, method, tmp_path)
        assert "cannot reach the Docker engine" in str(info.value)
        assert info.value.__cause__ is not None
    finally:
        backend.close()


def test_an_engine_that_does_not_answer_is_an_engine_error(tmp_path):
    """A socket that accepts and never answers (a hung engine): EngineError after the timeout."""
    path = tmp_path / "hung-engine.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)
        factory = functools.partial(
            docker.DockerClient, base_url=f"unix://{path}", version="1.41", timeout=0.3
        )
        backend = DockerBackend(factory)
        try:
            with pytest.raises(EngineError) as info:
                asyncio.run(backend.find())
            assert "did not answer in time to list kernel containers" in str(info.value)
            assert info.value.status_code is None
        finally:
            backend.close()


# -- one tree ---------------------------------------------------------------------------------


def test_every_sandbox_error_is_defined_in_errors_py():
    """No SandboxError subclass lives outside kernel_sandbox.errors (the old homes re-export)."""
    import importlib
    import pkgutil

    import kernel_sandbox
    from kernel_sandbox import errors

    for module in pkgutil.walk_packages(kernel_sandbox.__path__, "kernel_sandbox."):
        if not module.name.endswith(".__main__"):  # entry points run when imported
            importlib.import_module(module.name)
    found, todo = set(), [SandboxError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in found)
    assert all(name.startswith("kernel_sandbox.errors.") for name in outside), outside
    assert {c.__name__ for c in found} == set(errors.__all__)


def test_moved_errors_keep_their_old_import_paths():
    from kernel_sandbox import errors
    from kernel_sandbox.broker.sources import CredentialsError
    from kernel_sandbox.broker.tokens import TokenNotFound, TokenRefused
    from kernel_sandbox.egress.control import EgressControlError
    from kernel_sandbox.egress.rules import TargetError

    assert TokenRefused is errors.TokenRefused and TokenNotFound is errors.TokenNotFound
    assert CredentialsError is errors.CredentialsError and TargetError is errors.TargetError
    assert EgressControlError is errors.EgressControlError
    assert issubclass(TargetError, ValueError) and issubclass(TokenRefused, PermissionError)

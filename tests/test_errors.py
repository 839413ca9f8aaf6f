"""Clear, actionable errors, each produced for real (nothing is started when input is bad)."""

from __future__ import annotations

import pytest
from jupyter_client.manager import KernelManager
from support.kernels import make_kernelspec
from support.leaks import runtime_dirs, sandbox_containers

from kernel_sandbox.errors import (
    EngineUnavailable,
    ImageMissing,
    KernelStartError,
    PolicyError,
    RuntimeUnavailable,
    SandboxError,
)


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

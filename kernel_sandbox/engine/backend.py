"""The container backend: a policy in, a hardened Docker container out.

This is the only module that talks to the Docker SDK and the only place where
``docker.errors`` (and the ``requests`` errors beneath them) become
:mod:`kernel_sandbox.errors`: every SDK call goes through one choke point,
:meth:`DockerBackend._guarded`. Blocking SDK calls run in ``asyncio.to_thread`` so a Jupyter
Server's event loop never waits on the engine.
Another backend (Podman, Kubernetes) would take the same :class:`ContainerRequest`
(:mod:`kernel_sandbox.engine.container`, re-exported here with its helpers).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from kernel_sandbox.engine.container import (
    ContainerRequest,
    ContainerState,
    container_options,
    start_error,
    workspace_target,
)
from kernel_sandbox.errors import (
    EngineError,
    EngineUnavailable,
    ImageBuildError,
    ImageMissing,
    KernelStartError,
    RuntimeUnavailable,
    SandboxError,
)
from kernel_sandbox.host.logtext import clip
from kernel_sandbox.inside.contract import IMAGE_KIND_KERNEL, LABEL_PREFIX, label
from kernel_sandbox.inside.contract import RUNTIME_MOUNT as RUNTIME_MOUNT  # tests read it here
from kernel_sandbox.inside.contract import SANDBOX_HOME as SANDBOX_HOME  # tests read it here

__all__ = [
    "ContainerRequest",
    "ContainerState",
    "DockerBackend",
    "container_options",
    "shared_backend",
    "start_error",
    "workspace_target",
]

T = TypeVar("T")
LOG_LINE = 1000  # characters of one container log line quoted in an error message


def _engine_unavailable(exc: BaseException) -> EngineUnavailable:
    return EngineUnavailable(
        f"cannot reach the Docker engine ({exc.__class__.__name__}). Start it (for example "
        "`sudo systemctl start docker`, or `dockerd &`) and check `docker info` works."
    )


def _short(container_id: str) -> str:
    return container_id[:12]


class DockerBackend:
    """Create, watch, signal and remove kernel containers on one Docker engine.

    ``client_factory`` is injectable so tests (and other engines speaking the Docker API,
    such as Podman's socket) can hand in their own client.

    Besides the errors each method names, every method raises
    :class:`~kernel_sandbox.errors.EngineUnavailable` when the engine does not answer and
    :class:`~kernel_sandbox.errors.EngineError` when it refuses or fails a request; no
    ``docker`` or ``requests`` exception leaves this class.
    """

    def __init__(self, client_factory: Callable[[], docker.DockerClient] = docker.from_env):
        self._client_factory = client_factory
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = self._client_factory()
            except docker.errors.DockerException as exc:
                raise _engine_unavailable(exc) from exc
        return self._client

    async def _call(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """:meth:`_guarded` in a worker thread."""
        return await asyncio.to_thread(self._guarded, what, func, *args)

    def _guarded(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run one blocking engine call; the one place where engine errors are translated.

        ``what`` completes "the Docker engine refused to ..." (e.g. "remove container 0a1b").
        """
        try:
            return func(*args)
        except SandboxError:
            raise  # translated already, with a more precise message
        except docker.errors.APIError as exc:  # the engine answered with an error status
            raise EngineError(
                f"the Docker engine refused to {what}: {exc.explanation or exc}",
                exc.status_code,
            ) from exc
        except (requests.exceptions.ConnectionError, ConnectionError) as exc:
            raise _engine_unavailable(exc) from exc
        except requests.exceptions.Timeout as exc:
            raise EngineError(
                f"the Docker engine did not answer in time to {what} "
                f"({exc.__class__.__name__}); check that `docker info` answers promptly"
            ) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"cannot {what} on the Docker engine: {exc}") from exc

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, request: ContainerRequest) -> str:
        """Create and start the container; return its id.

        Raises:
            ImageMissing: the policy's image is not on the engine.
            RuntimeUnavailable: the policy's runtime is not registered with the engine.
            EngineUnavailable: the engine does not answer.
            KernelStartError: the engine refused to create or start the container.
        """
        return await self._call(f"start kernel container {request.name}", self._start_sync, request)

    def _start_sync(self, request: ContainerRequest) -> str:
        options = container_options(request)
        try:
            # create + start, never run(): run() would try to pull a missing image.
            container = self.client.containers.create(**options)
            container.start()
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(
                f"image {request.policy.image} is not on the Docker engine; build it with "
                "`kernel-sandbox image build` (or set the policy's image to one that exists)"
            ) from exc
        except docker.errors.APIError as exc:
            runtime = request.policy.runtime
            if runtime != "runc" and runtime not in self._runtimes_sync():
                raise RuntimeUnavailable(
                    f"the Docker engine has no OCI runtime {runtime!r}; register it in "
                    "/etc/docker/daemon.json (see `kernel-sandbox doctor`) or use runtime 'runc'"
                ) from exc
            self._remove_by_name(request.name)
            raise KernelStartError(
                f"the Docker engine refused to start kernel container {request.name}: "
                f"{exc.explanation or exc}"
            ) from exc
        return str(container.id)

    async def create(self, request: ContainerRequest) -> str:
        """Create the container without starting it (a terminal's is started by the
        ``docker start --attach`` that becomes its pty); return its id.

        Raises:
            ImageMissing: the policy's image is not on the engine.
            KernelStartError: the engine refused to create the container.
        """
        return await self._call(f"create container {request.name}", self._create_sync, request)

    def _create_sync(self, request: ContainerRequest) -> str:
        try:
            container = self.client.containers.create(**container_options(request))
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(
                f"image {request.policy.image} is not on the Docker engine; build it with "
                "`kernel-sandbox image build` (or set the policy's image to one that exists)"
            ) from exc
        except docker.errors.APIError as exc:
            raise KernelStartError(
                f"the Docker engine refused to create container {request.name}: "
                f"{exc.explanation or exc}"
            ) from exc
        return str(container.id)

    def _remove_by_name(self, name: str) -> None:
        try:
            self.client.containers.get(name).remove(force=True)
        except docker.errors.DockerException:
            pass

    async def state(self, container_id: str) -> ContainerState:
        """The container's real state; a container that is gone counts as ended (code -1)."""
        return await self._call(
            f"inspect container {_short(container_id)}", self._state_sync, container_id
        )

    def _state_sync(self, container_id: str) -> ContainerState:
        try:
            attrs = self.client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return ContainerState(running=False, exit_code=-1, error="container is gone")
        state = attrs["State"]
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            return ContainerState(running=True, exit_code=None)
        return ContainerState(
            running=False,
            exit_code=int(state.get("ExitCode", -1)),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error", ""),
        )

    async def signal(self, container_id: str, signum: int) -> None:
        """Send ``signum`` to the container's init, which passes it to the kernel's group."""
        await self._call(
            f"signal container {_short(container_id)}", self._signal_sync, container_id, signum
        )

    def _signal_sync(self, container_id: str, signum: int) -> None:
        try:
            self.client.api.kill(container_id, signal=signal.Signals(signum).name)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # not running: nothing to signal
                return
            raise

    async def remove(self, container_id: str) -> None:
        """Force-remove the container; "already gone" is fine (cleanup is idempotent)."""
        await self._call(
            f"remove container {_short(container_id)}", self._remove_sync, container_id
        )

    def remove_blocking(self, container_id: str) -> None:
        """:meth:`remove` without a worker thread, for interpreter exit."""
        self._guarded(f"remove container {_short(container_id)}", self._remove_sync, container_id)

    def _remove_sync(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # removal already in progress
                return
            raise

    async def logs_tail(self, container_id: str, lines: int = 15) -> str:
        """The last lines the container printed (stdout and stderr), for error messages."""
        return await self._call(
            f"show the log of container {_short(container_id)}",
            self._logs_sync,
            container_id,
            lines,
        )

    def _logs_sync(self, container_id: str, lines: int) -> str:
        try:
            out = self.client.api.logs(container_id, tail=lines, stdout=True, stderr=True)
        except docker.errors.DockerException:
            return ""
        # the kernel printed these: clip each line and escape controls (terminal escapes too)
        text = out.decode(errors="replace").strip()
        return "\n".join(clip(line, LOG_LINE) for line in text.splitlines()[-lines:])

    # -- discovery --------------------------------------------------------------------------

    async def find(self, **labels: str) -> list[dict[str, Any]]:
        """Containers (running or not) carrying all of ``labels`` (names without the prefix)."""
        return await self._call("list kernel containers", self._find_sync, labels)

    def _find_sync(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        filters = [f"{LABEL_PREFIX}managed=true"]
        filters += [f"{LABEL_PREFIX}{k}={v}" for k, v in labels.items()]
        return list(self.client.api.containers(all=True, filters={"label": filters}))

    async def runtimes(self) -> list[str]:
        """The OCI runtimes the engine has registered."""
        return await self._call("list its OCI runtimes", self._runtimes_sync)

    def _runtimes_sync(self) -> list[str]:
        return sorted(self.client.info().get("Runtimes", {}))

    async def engine_info(self) -> dict[str, Any]:
        """What ``docker info`` says: version, runtimes with their arguments, cgroup version."""
        return await self._call("describe itself (docker info)", self._info_sync)

    def _info_sync(self) -> dict[str, Any]:
        return dict(self.client.info())

    async def memory_usage(self, container_id: str) -> tuple[int, int] | None:
        """(bytes used, limit) of a running container as ``docker stats`` counts them
        (page cache that can be dropped excluded); None when it is gone or not running."""
        return await self._call(
            f"report the memory use of container {_short(container_id)}",
            self._memory_usage_sync,
            container_id,
        )

    def _memory_usage_sync(self, container_id: str) -> tuple[int, int] | None:
        try:
            stats = self.client.api.stats(container_id, stream=False, one_shot=True)
        except (docker.errors.NotFound, ValueError):  # gone, or going (an empty answer)
            return None
        memory = stats.get("memory_stats") or {}
        if "usage" not in memory:
            return None
        detail = memory.get("stats") or {}
        cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
        return int(memory["usage"]) - int(cache), int(memory.get("limit", 0))

    async def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""
        await self._call("answer a ping", self._ping_sync)

    def _ping_sync(self) -> None:
        try:
            self.client.ping()
        except docker.errors.APIError as exc:
            raise _engine_unavailable(exc) from exc

    # -- images -----------------------------------------------------------------------------

    async def image_exists(self, tag: str) -> bool:
        return await self.image_labels(tag) is not None

    async def image_labels(self, tag: str) -> dict[str, str] | None:
        """The image's labels, or None when the engine does not have it."""
        return await self._call(f"inspect image {tag}", self._image_labels_sync, tag)

    def _image_labels_sync(self, tag: str) -> dict[str, str] | None:
        try:
            attrs = self.client.api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            return None
        return dict(attrs.get("Config", {}).get("Labels") or {})

    async def pull(self, image: str) -> None:
        """Pull ``image`` from its registry (only for bases; kernel images are built here)."""
        await self._call(f"pull {image}", self._pull_sync, image)

    def _pull_sync(self, image: str) -> None:
        repository, _, tag = image.partition(":")
        try:
            self.client.api.pull(repository, tag=tag or "latest")
        except docker.errors.APIError as exc:
            raise ImageMissing(
                f"base image {image} is not on the engine and cannot be pulled "
                f"({exc.explanation or exc}); without a registry, create one with "
                "`kernel-sandbox image base` and build with `--base kernel-sandbox/base:bookworm`"
            ) from exc

    async def run_once(self, image: str, command: list[str]) -> str:
        """Run ``command`` in a throwaway, network-less container and return its output."""
        return await self._call(
            f"run `{' '.join(command)}` in {image}", self._run_once_sync, image, command
        )

    def _run_once_sync(self, image: str, command: list[str]) -> str:
        try:
            out = self.client.containers.run(
                image, command, remove=True, network_mode="none", stdout=True, stderr=True
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"image {image} is not on the Docker engine") from exc
        except docker.errors.ContainerError as exc:
            raise ImageBuildError(
                f"`{' '.join(command)}` failed in {image}: {exc.stderr!r}"
            ) from exc
        return bytes(out).decode().strip()

    async def build(
        self,
        context: str,
        tag: str,
        buildargs: dict[str, str],
        labels: dict[str, str],
        progress: Callable[[str], None],
    ) -> None:
        """Build ``context`` with no network at all; stream each build line to ``progress``."""
        await self._call(
            f"build {tag}", self._build_sync, context, tag, buildargs, labels, progress
        )

    def _build_sync(
        self,
        context: str,
        tag: str,
        buildargs: dict[str, str],
        labels: dict[str, str],
        progress: Callable[[str], None],
    ) -> None:
        recent: list[str] = []
        try:
            stream = self.client.api.build(
                path=context,
                tag=tag,
                buildargs=buildargs,
                network_mode="none",
                rm=True,
                forcerm=True,
                decode=True,
                labels={label("image"): IMAGE_KIND_KERNEL, **labels},
            )
            for chunk in stream:
                if "error" in chunk:
                    tail = "\n".join(recent[-10:])
                    raise ImageBuildError(
                        f"building {tag} failed: {chunk['error'].strip()}\n{tail}"
                    )
                line = str(chunk.get("stream", "")).rstrip()
                if line:
                    recent.append(line)
                    progress(line)
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"building {tag} failed: {exc.explanation or exc}") from exc

    async def import_rootfs(self, tarball: str, image: str) -> None:
        """Import a root file system tarball as ``image`` (REPOSITORY:TAG)."""
        await self._call(f"import {tarball} as {image}", self._import_rootfs_sync, tarball, image)

    def _import_rootfs_sync(self, tarball: str, image: str) -> None:
        repository, _, tag = image.partition(":")
        self.client.api.import_image_from_file(tarball, repository, tag or "latest")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# What docker.from_env reads: a backend is shared only among kernels of the same engine.
ENGINE_ENV = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
_shared: dict[tuple[int, tuple[str | None, ...]], DockerBackend] = {}
_shared_lock = threading.Lock()


def shared_backend() -> DockerBackend:
    """The process's backend for kernel provisioners, one per engine address.

    One docker client (and its connection pool) for all kernels of a Jupyter Server, instead
    of a client per kernel that first negotiates the API version: 10-17 ms off every start
    (docs/benchmarks.md) and no file descriptors held per kernel. A forked child gets its own.
    """
    engine = {name: os.environ[name] for name in ENGINE_ENV if name in os.environ}
    key = (os.getpid(), tuple(engine.get(name) for name in ENGINE_ENV))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = DockerBackend(functools.partial(docker.from_env, environment=engine))
        return _shared[key]

"""Before a batch starts: the Jupyter config its kernel managers get, and the preflight check.

``kernel-sandbox run`` checks once, before any notebook starts, what every notebook needs
(kernelspec, policy, engine, image), so a setup error stops the batch with one message.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from traitlets.config import Config

from kernel_sandbox.errors import ImageMissing, PolicyError, RuntimeUnavailable
from kernel_sandbox.kernelspec import PROVISIONER_NAME

if TYPE_CHECKING:
    from kernel_sandbox.batch.options import RunOptions
    from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["kernel_config", "load_jupyter_config", "preflight"]


async def preflight(options: RunOptions, backend: DockerBackend | None = None) -> None:
    """Check what every notebook needs before starting any: kernelspec, policy, engine, image.

    ``backend`` is the engine to ask (default: a client of its own, closed afterwards).

    Raises:
        KernelspecError: no such kernelspec.
        PolicyError: unknown profile or bad policy, or ``profile`` with a kernelspec that is
            not sandboxed or pins another profile.
        PolicyError: also a ``cpu_limit`` above the engine's CPUs (the engine refuses it).
        EngineUnavailable, ImageMissing: the engine or the kernel image is not there.
    """
    from kernel_sandbox.engine.backend import DockerBackend
    from kernel_sandbox.kernelspec import find_kernelspec
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

    spec = find_kernelspec(options.kernel)
    provisioner_info = (spec.metadata or {}).get("kernel_provisioner") or {}
    if provisioner_info.get("provisioner_name") != PROVISIONER_NAME:
        if options.profile:
            raise PolicyError(
                f"--profile needs a sandboxed kernelspec; {options.kernel} does not use the "
                f"{PROVISIONER_NAME} provisioner"
            )
        return
    spec_config = dict(provisioner_info.get("config") or {})
    pinned = spec_config.get("profile")
    if options.profile and pinned and pinned != options.profile:
        raise PolicyError(
            f"kernelspec {options.kernel} pins profile {pinned!r}, which --profile "
            f"{options.profile} cannot override; drop --profile or use a kernelspec without a "
            "pinned profile (python3-sandbox)"
        )
    provisioner = DockerSandboxProvisioner(
        kernel_id="preflight", kernel_spec=spec, config=options.config, **spec_config
    )
    if provisioner.via_service is not None:  # it checks policy and image at each start
        from kernel_sandbox.service.client import ServiceClient

        await asyncio.to_thread(ServiceClient(provisioner.via_service.socket_path, 10).ask, "hello")
        return
    policy = provisioner.policy  # PolicyError for an unknown profile or a bad value
    own = backend is None
    engine = DockerBackend() if backend is None else backend
    try:
        await engine.ping()
        if await engine.image_labels(policy.image) is None:
            raise ImageMissing(
                f"image {policy.image} is not on the Docker engine; build it with "
                "`kernel-sandbox image build` (or set the policy's image to one that exists)"
            )
        cpus = (await engine.engine_info()).get("NCPU")
        if policy.cpu_limit and isinstance(cpus, int) and policy.cpu_limit > cpus:
            raise PolicyError(
                f"cpu_limit {policy.cpu_limit:g} of {options.kernel} is more than the {cpus} "
                "CPU(s) of the Docker engine, which refuses such a container; lower it in the "
                f"kernelspec or Jupyter config (`kernel-sandbox policy show {options.kernel}` "
                "says where it is set)"
            )
        if policy.runtime != "runc" and policy.runtime not in await engine.runtimes():
            raise RuntimeUnavailable(
                f"the Docker engine has no OCI runtime {policy.runtime!r}, which the policy "
                f"of {options.kernel} asks for; register it in /etc/docker/daemon.json "
                "(`kernel-sandbox doctor` says how) or pick another profile"
            )
    finally:
        if own:
            engine.close()


def load_jupyter_config() -> Config:
    """The Jupyter config the batch's kernel managers get: the files a Jupyter Server reads.

    The same loader as ``kernel-sandbox policy show``
    (:func:`kernel_sandbox.policy.jupyter_config.read_jupyter_config`), so both work out the
    same policy for the same kernelspec.

    Raises:
        Exception: whatever a broken config file raises.
    """
    from kernel_sandbox.policy.jupyter_config import read_jupyter_config

    config, _files = read_jupyter_config()
    return config


def kernel_config(
    profile: str | None, startup_timeout: float, base: Config | None = None
) -> Config:
    """Jupyter config for the kernel managers: ``base`` plus the profile and start timeout.

    The provisioner reads ``DockerSandboxProvisioner.profile`` unless the kernelspec pins a
    profile itself (:func:`preflight` refuses that combination).
    """
    config = Config()
    config.merge(base or Config())
    if profile:
        config.DockerSandboxProvisioner.profile = profile
    config.DockerSandboxProvisioner.launch_timeout = float(startup_timeout)
    return config

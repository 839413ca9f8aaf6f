"""The provisioner's other mode: the kernel is started by the sandbox service, not by us.

On a shared machine the user's Jupyter Server holds no engine access: it asks the service
(:mod:`kernel_sandbox.service`) over a unix socket, and the service decides, from who the
caller is and the operator's rules, what it starts. This side only forwards what the kernelspec
and the Jupyter config ask for, and opens the folders to mount itself (so the kernel checks the
user's rights; the descriptors go over the socket). The kernel's ZeroMQ traffic does not pass
through here or the service: the connection info names sockets in the service's runtime
directory that only this user may connect to.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, cast

from jupyter_client.connect import KernelConnectionInfo

from kernel_sandbox.errors import PolicyError, ServiceUnavailable
from kernel_sandbox.policy.model import SandboxPolicy
from kernel_sandbox.policy.mounts import parse_mounts
from kernel_sandbox.service.client import ServiceClient

if TYPE_CHECKING:
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

__all__ = ["ServiceKernel", "open_folders"]


def _open_folder(path: str) -> int | None:
    """A descriptor of ``path`` opened for reading (the kernel checks our rights), or None."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def open_folders(
    prov: DockerSandboxProvisioner, asked: dict[str, Any], cwd: str | None
) -> tuple[list[int], list[dict[str, Any]]]:
    """Open the folders a start sends the service: the workspace (``cwd``, when this process
    can open it) and each of the policy's mounts; their descriptors and descriptions.

    Raises:
        PolicyError: a mount is malformed or this process cannot open its folder.
    """
    fds: list[int] = []
    folders: list[dict[str, Any]] = []
    try:
        workspace = _open_folder(cwd) if cwd else None
        if workspace is not None:
            fds.append(workspace)
            folders.append({"for": "workspace"})
        if asked.get("mounts"):
            try:
                mounts = parse_mounts(asked["mounts"])
            except PolicyError as exc:
                raise PolicyError(f"kernelspec {prov._spec_name}: {exc}") from exc
            for index, mount in enumerate(mounts):
                fd = _open_folder(mount.source)
                if fd is None:
                    raise PolicyError(
                        f"kernelspec {prov._spec_name}: mounts: you cannot open "
                        f"{mount.source} for reading, so it cannot be mounted"
                    )
                fds.append(fd)
                folders.append({"for": "mount", "index": index})
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds, folders


class ServiceKernel:
    """One kernel through the service: what ``DockerSandboxProvisioner`` does in that mode."""

    def __init__(self, provisioner: DockerSandboxProvisioner, socket_path: str):
        self.prov = provisioner
        self.client = ServiceClient(socket_path)
        self.started = False
        self.policy: dict[str, Any] = {}
        self._ended_told = False

    @property
    def socket_path(self) -> str:
        return self.client.path

    async def _ask(self, op: str, fds: list[int] | tuple[int, ...] = (), **fields: Any) -> dict:
        return await asyncio.to_thread(self.client.ask, op, fds, **fields)

    def requested(self) -> dict[str, Any]:
        """What this side's kernelspec and Jupyter config ask for (the service caps it)."""
        prov = self.prov
        asked = {
            key: getattr(prov, key)
            for key in SandboxPolicy.keys()
            if getattr(prov, key) is not None
        }
        asked.update(prov._spec_config)
        if "profile" not in asked and prov.profile != "strict":  # else the service's default
            asked["profile"] = prov.profile
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asked.items()}

    async def pre_launch(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        prov = self.prov
        extra = kwargs.pop("extra_arguments", [])
        prov.cwd = str(kwargs.pop("cwd", None) or os.getcwd())
        host_env = dict(kwargs.pop("env", None) or os.environ)
        asked = self.requested()
        passthrough = asked.get("env_passthrough") or []
        names = {
            *prov.env_allowlist,
            *([passthrough] if isinstance(passthrough, str) else passthrough),
        }
        kwargs["env"] = {k: v for k, v in host_env.items() if k in names}
        kwargs["cmd"] = list(prov.kernel_spec.argv)
        kwargs["extra_arguments"] = list(extra)
        return kwargs

    async def launch_kernel(self, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        prov = self.prov
        asked = self.requested()
        spec = prov.kernel_spec
        fds, folders = open_folders(prov, asked, prov.cwd)
        try:
            reply = await self._ask(
                "start",
                fds,
                kernel_id=prov.kernel_id,
                restart=self.started,
                kernelspec={
                    "name": prov._spec_name,
                    "argv": list(spec.argv),
                    "env": dict(spec.env or {}),
                    "language": spec.language,
                    "display_name": spec.display_name,
                },
                config=asked,
                cwd=prov.cwd,
                env=kwargs.get("env", {}),
                extra_arguments=kwargs.get("extra_arguments", []),
                folders=folders,
            )
        finally:
            for fd in fds:
                os.close(fd)
        info = dict(reply["connection_info"])
        info["key"] = str(info["key"]).encode()
        prov.connection_info = cast(KernelConnectionInfo, info)
        self.policy = reply.get("policy", {})
        for note in reply.get("notes") or []:
            prov.log.warning("kernel %s: %s", prov.kernel_id, note)
        self.started = True
        self._ended_told = False
        prov.log.info(
            "kernel %s: started by the sandbox service at %s (%s)",
            prov.kernel_id,
            self.socket_path,
            ", ".join(f"{k} {v}" for k, v in self.policy.items()),
        )
        return prov.connection_info

    async def poll(self) -> int | None:
        if not self.started:
            return 0
        try:
            reply = await self._ask("poll", kernel_id=self.prov.kernel_id)
        except ServiceUnavailable as exc:
            # A restarting service: the kernel keeps running meanwhile (its watchdog waits).
            self.prov.log.warning("kernel %s: %s", self.prov.kernel_id, exc)
            return None
        code = reply.get("exit_code")
        reason = reply.get("end_reason")
        if code is not None and reason and not self._ended_told:
            # Ended by the service (idle_timeout, a stop): shut down like a culler, so that
            # the manager does not restart it (see DockerSandboxProvisioner._end_from_monitor).
            self._ended_told = True
            self.prov._shut_down_for(str(reason))
            return None
        return code if code is None else int(code)

    async def send_signal(self, signum: int) -> None:
        if not self.started:
            return
        try:
            await self._ask("signal", kernel_id=self.prov.kernel_id, signum=int(signum))
        except ServiceUnavailable as exc:
            self.prov.log.warning("kernel %s: cannot signal it: %s", self.prov.kernel_id, exc)

    async def cleanup(self, restart: bool) -> None:
        if not self.started:
            return
        try:
            await self._ask("cleanup", kernel_id=self.prov.kernel_id, restart=restart)
        except ServiceUnavailable as exc:  # never raise into jupyter_client from cleanup
            self.prov.log.warning("kernel %s: cleanup not confirmed: %s", self.prov.kernel_id, exc)
        if not restart:
            self.started = False

    def provisioner_info(self) -> dict[str, Any]:
        return {"service": self.socket_path, "policy": self.policy}

    async def adopt(self, provisioner_info: dict[str, Any]) -> None:
        reply = await self._ask("adopt", kernel_id=self.prov.kernel_id)
        info = dict(reply["connection_info"])
        info["key"] = str(info["key"]).encode()
        self.prov.connection_info = cast(KernelConnectionInfo, info)
        self.policy = provisioner_info.get("policy") or {}
        self.started = True

"""Terminals the service runs for its callers: the sandbox here, only a pty for the caller.

A locked-down Jupyter Server under the service has no engine access, so its terminals are
started here (``terminal_start``): the container is made under the operator's rules for the
caller as a kernel's would be (profile, kernelspec, ceilings, the caller's folders received as
descriptors and staged, the caller's uid when a folder is mounted read-write, else a uid of its
own; it counts against ``max_kernels`` and ``max_memory``), the docker CLI's attach runs here on
the slave side of a new pty (its controlling terminal, so a resize of the master reaches it as
``SIGWINCH``), and the master descriptor goes back to the caller with the reply. The service
keeps no copy of it.

The terminal ends, and its container is removed, when: the caller closes it
(``terminal_close``, an operator's ``stop``); its shell exits; its caller's process dies (its
master descriptor closes, so the attach sees the hangup and ends); or, as a backstop, the owner
sweep finds the caller's process gone. Terminals do not survive a restart of the service: their
watchdogs end them after ``orphan_timeout``, as for a server that dies in direct mode.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.errors import BadRequest, NoSuchKernel, SandboxError
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.provisioner.identity import Identity
from kernel_sandbox.provisioner.terminal import (
    attach_command,
    create_terminal_sandbox,
    terminal_id,
)
from kernel_sandbox.service.callers import Caller
from kernel_sandbox.service.folders import CallerFolder, Staging
from kernel_sandbox.service.kernels import KernelRegistry, _policy_summary, _text, _user_name

__all__ = ["ServedTerminal", "TerminalRegistry"]

log = logging.getLogger("kernel_sandbox.service")

START_TIMEOUT = 60.0  # seconds the attach may take to start the container
MAX_SHELL = 32  # words of a shell command line


@dataclass
class ServedTerminal:
    """One terminal the service runs for a caller."""

    terminal_id: str
    name: str
    uid: int
    owner: Owner
    kernelspec: str
    profile: str
    resources: Any  # KernelResources: container, runtime dir, uid claim
    attach: subprocess.Popen[bytes]
    memory: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    closed: bool = False

    def summary(self) -> dict[str, Any]:
        """A row of ``ps`` (the same keys as a kernel's)."""
        return {
            "kernel_id": self.terminal_id,
            "kind": "terminal",
            "uid": self.uid,
            "user": _user_name(self.uid),
            "kernelspec": self.kernelspec,
            "profile": self.profile,
            "container": self.resources.container_name,
            "container_id": self.resources.container_id,
            "memory_limit": self.memory,
            "runtime": self.policy.get("runtime", ""),
            "network": self.policy.get("network", ""),
            "started": self.started,
            "owner_pid": self.owner.pid,
        }


def _shell(value: Any) -> list[str]:
    if value is None:
        return ["/bin/bash", "-l"]
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_SHELL
        or not all(isinstance(v, str) and 0 < len(v) <= 1024 for v in value)
    ):
        raise BadRequest(f"shell must be a list of 1-{MAX_SHELL} non-empty strings")
    return list(value)


class TerminalRegistry:
    """Every terminal of every caller, on the service's event loop beside the kernels."""

    def __init__(self, kernels: KernelRegistry, docker_command: str = "docker"):
        self.kernels = kernels
        self.terminals: dict[str, ServedTerminal] = kernels.terminals
        self.docker_command = docker_command

    def _mine(self, caller: Caller, ident: str) -> ServedTerminal:
        terminal = self.terminals.get(ident)
        operator = self.kernels.rules.current().for_caller(caller).operator
        if terminal is None or (terminal.uid != caller.uid and not operator):
            raise NoSuchKernel(
                f"no terminal {ident} of {caller.describe()} (see kernel-sandbox ps)"
            )
        return terminal

    async def start(
        self, caller: Caller, request: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        """Start a terminal for ``caller``: the reply, and the pty master to send with it
        (the caller of this method closes it once sent)."""
        name = _text(request.get("name"), "name", 64) or "1"
        if not re.fullmatch(r"\w+", name):
            raise BadRequest("name must be letters, digits or '_'")
        term = _text(request.get("term"), "term", 64) or "xterm-256color"
        if not re.fullmatch(r"[\w.+-]+", term):
            raise BadRequest("term must name a terminal type (xterm-256color)")
        shell = _shell(request.get("shell"))
        folders = self.kernels._folder_list(request, len(fds))
        docker = shutil.which(self.docker_command)
        if docker is None:
            raise SandboxError(
                f"the sandbox service cannot run terminals: the docker CLI "
                f"({self.docker_command!r}) is not on its PATH; install it (docker.io)"
            )
        ident = terminal_id(name)
        rules = self.kernels.rules.current().for_caller(caller)
        prov = self.kernels._provisioner(ident, caller.owner, request, rules)
        policy = prov.policy
        self.kernels._reserve(caller, rules, policy.memory_limit)
        try:
            return await self._start(caller, rules, prov, ident, name, term, shell, folders, fds)
        finally:
            self.kernels._unreserve(caller, policy.memory_limit)

    async def _start(
        self,
        caller: Caller,
        rules: Any,
        prov: Any,
        ident: str,
        name: str,
        term: str,
        shell: list[str],
        folders: list[dict[str, Any]],
        fds: list[int],
    ) -> tuple[dict[str, Any], list[int]]:
        staging = Staging(self.kernels.staging_root)
        received: list[CallerFolder] = []
        resources = attach = None
        master = slave = -1
        try:
            workspace, notes = self.kernels.stage_folders(
                prov, caller, rules, folders, fds, staging, received
            )
            if prov._identity is not None:  # a folder mounted read-write: the caller's uid
                identity = prov._identity
            else:
                identity = Identity(0, 0, "a uid of its own from uid_range", pooled=True)
                if prov.checked_uid_range() is None:
                    identity = Identity(caller.uid, caller.gid, "uid_range is off: the caller's")
            resources = await create_terminal_sandbox(
                prov,
                ident,
                name,
                identity,
                shell,
                term,
                prov.log,
                workspace=workspace[0] if workspace else None,
                workspace_path=workspace[1] if workspace else None,
            )
            master, slave = os.openpty()
            os.set_inheritable(master, False)
            attach = subprocess.Popen(
                [
                    "setsid",
                    "--ctty",
                    *attach_command(self.docker_command, str(resources.container_id)),
                ],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                close_fds=True,
                cwd="/",
            )
            os.set_inheritable(slave, False)
            await self._wait_started(resources, attach)
        except BaseException:
            if attach is not None:
                attach.kill()
                await asyncio.to_thread(attach.wait)
            if master >= 0:
                os.close(master)
            if resources is not None:
                await resources.aclose()
            if slave >= 0:
                os.close(slave)
            raise
        finally:
            staging.release()  # the running container keeps its own mounts
            for got in received:
                got.close()
            for index, fd in enumerate(fds):
                if fd >= 0:
                    os.close(fd)
                    fds[index] = -1
        served = ServedTerminal(
            ident,
            name,
            caller.uid,
            self.kernels._owner(caller),
            prov._spec_name,
            prov.profile,
            resources,
            attach,
            memory=prov.policy.memory_limit,
            policy=_policy_summary(prov) | {"user": identity.user if not identity.pooled else ""},
        )
        self.terminals[ident] = served
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._wait_attach,
            args=(served, slave, loop),
            name=f"attach-{ident}",
            daemon=True,
        ).start()
        log.info(
            "terminal %s of %s: container %s",
            ident,
            caller.describe(),
            resources.container_name,
        )
        reply = {
            "terminal_id": ident,
            "container": resources.container_name,
            "notes": notes,
            "policy": served.policy,
        }
        return reply, [master]

    async def _wait_started(self, resources: Any, attach: subprocess.Popen[bytes]) -> None:
        """Wait until the attach has started the container (its mounts are then its own,
        and the staged folders may go)."""
        deadline = time.monotonic() + START_TIMEOUT
        backend = resources.backend
        while True:
            try:
                attrs = await asyncio.to_thread(
                    backend.client.api.inspect_container, resources.container_id
                )
                status = attrs["State"].get("Status")
            except Exception as exc:  # gone, or the engine hiccuped: said below
                status = f"unknown ({exc})"
            if status == "running":
                return
            if attach.poll() is not None or status not in ("created", "restarting"):
                logs = await backend.logs_tail(resources.container_id)
                raise SandboxError(
                    f"the terminal's container {resources.container_name} did not start "
                    f"(state {status}, attach exit status {attach.returncode}); last log "
                    f"lines:\n{logs or '(none)'}"
                )
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"the terminal's container {resources.container_name} did not start "
                    f"within {START_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.02)

    def _wait_attach(
        self, terminal: ServedTerminal, slave: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        """In a thread: when the attach ends (the shell exited) or the caller's side of the
        pty closes (the terminal closed, the caller died: a hangup on our copy of the slave,
        which the docker CLI does not end on by itself), remove the terminal's container."""
        pidfd = -1
        try:
            poller = select.poll()
            poller.register(slave, select.POLLHUP)
            try:
                pidfd = os.pidfd_open(terminal.attach.pid)
                poller.register(pidfd, select.POLLIN)
            except OSError:  # already reaped: it ended
                pass
            else:
                while not poller.poll():
                    pass
        finally:
            os.close(slave)  # the caller's master sees the hangup once the attach is gone too
            if pidfd >= 0:
                os.close(pidfd)
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._close(terminal, "its attach ended"), loop)

    async def _close(self, terminal: ServedTerminal, why: str) -> None:
        """End the attach, remove the container and runtime directory (idempotent, never
        raises)."""
        if terminal.closed:
            return
        terminal.closed = True
        self.terminals.pop(terminal.terminal_id, None)
        log.info("terminal %s of uid %d: closing (%s)", terminal.terminal_id, terminal.uid, why)
        try:
            await terminal.resources.aclose()
        except Exception as exc:
            log.warning("terminal %s: cleanup failed: %s", terminal.terminal_id, exc)
        if terminal.attach.poll() is None:
            terminal.attach.kill()
            await asyncio.to_thread(terminal.attach.wait)

    async def close(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """The caller's ``terminal_close`` (idempotent: an unknown id is already closed)."""
        ident = _text(request.get("terminal_id"), "terminal_id", 200)
        if not ident:
            raise BadRequest("terminal_id must be a non-empty string")
        terminal = self.terminals.get(ident)
        if terminal is None:
            return {}
        terminal = self._mine(caller, ident)
        await self._close(terminal, f"closed by {caller.describe()}")
        return {"closed": ident}

    async def stop(self, caller: Caller, terminal: ServedTerminal) -> dict[str, Any]:
        """An operator's (or the owner's) ``kernel-sandbox stop`` of a terminal."""
        await self._close(terminal, f"stopped by {caller.describe()}")
        return {
            "stopped": terminal.terminal_id,
            "user": _user_name(terminal.uid),
            "kernelspec": terminal.kernelspec,
            "container": terminal.resources.container_name,
            "ended": True,
        }

    async def sweep(self) -> None:
        """Close the terminals whose caller's process is gone (no adoption: its pty is gone)."""
        for terminal in list(self.terminals.values()):
            if terminal.owner.is_alive() is False:
                await self._close(terminal, f"its owner (pid {terminal.owner.pid}) is gone")

    async def close_all(self) -> None:
        for terminal in list(self.terminals.values()):
            await self._close(terminal, "the service stops")

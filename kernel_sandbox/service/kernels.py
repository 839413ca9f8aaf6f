"""The kernels the service runs for its callers: start, act on, remember, re-adopt.

Each kernel is the same :class:`~kernel_sandbox.provisioner.DockerSandboxProvisioner` a
single-user server runs, hosted here on the caller's behalf: what the caller's kernelspec asks
for is layered under the operator's rules for that caller (:mod:`.rules`), folders come only as
descriptors the caller opened (:mod:`.folders`), and the client links are given to the caller's
uid alone. A kernel belongs to the uid that started it: every other operation checks that
(operators excepted). The kernel lives as long as its owner process (the caller's Jupyter
Server, nbclient run, ...) does: one that vanishes and is not replaced by a restarted one
(``adopt``) within ``orphan_timeout`` loses its kernels.

Each kernel's record (the request, the provisioner's state) is kept in ``state_dir`` so that a
restarted service (``systemctl restart``, even SIGKILL) adopts its kernels again: they keep
running meanwhile (their watchdogs wait ``orphan_timeout`` for the lifeline to come back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pwd
import secrets
import shutil
import socket
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from traitlets.config import Config

from kernel_sandbox.errors import BadRequest, NoSuchKernel, PolicyError, ServiceRefused
from kernel_sandbox.host.exits import ExitRegistry
from kernel_sandbox.host.owner import Owner, process_start_time
from kernel_sandbox.host.reap import SweepOnce
from kernel_sandbox.policy.model import SandboxPolicy
from kernel_sandbox.provisioner.identity import Identity
from kernel_sandbox.service.callers import Caller
from kernel_sandbox.service.folders import CallerFolder, NotMountable, Staging, receive_folder
from kernel_sandbox.service.rules import CallerRules, RulesFile

__all__ = ["KernelRegistry", "ServedKernel"]

log = logging.getLogger("kernel_sandbox.service")

# Policy keys a caller may not ask for at all: the operator decides them (``egress_hosts``
# could point an allowed name at any address; ``egress_secrets`` would hand the service's own
# credentials to a host the caller chose).
OPERATOR_KEYS = frozenset({"user", "egress_hosts", "egress_secrets"})
# Keys a caller's kernelspec may carry but the service ignores: its warm pool is the operator's.
POOL_KEYS = frozenset({"pool_size", "pool_max_idle"})
# A kernel the service ended (idle_timeout, a stop) is cleaned by the service this long after
# its container ended (its clients have polled and been told why by then), whatever its client
# does; its end is still reported to polls for ENDED_KEPT seconds after.
ENDED_GRACE = 10.0
ENDED_KEPT = 600.0


class KeptAtExit(ExitRegistry):
    """The service's kernels outlive it (a restarted service adopts them): nothing is closed
    at interpreter exit; the watchdogs end what no service adopts in time."""

    def add(self, resources: Any) -> None:
        return None


@dataclass
class ServedKernel:
    """One kernel the service runs for a caller."""

    kernel_id: str
    uid: int
    gid: int
    owner: Owner  # the caller's process the kernel lives for
    request: dict[str, Any]  # what was asked: kernelspec, config, cwd (for restarts, restore)
    provisioner: Any  # DockerSandboxProvisioner
    started: float = field(default_factory=time.time)
    memory: int = 0
    owner_lost: float | None = None
    ended: float | None = None  # when the sweep first saw it ended by the service
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    relays: Any = None  # a pod kernel's relays (service/pods.py): the caller's sockets

    def summary(self) -> dict[str, Any]:
        prov = self.provisioner
        policy = prov._policy
        kube = prov._kube
        if kube is not None:  # backend kubernetes: the pod, as `kernel-sandbox ps` shows pods
            container = f"pod/{kube.pod_name}" if kube.pod_name else None
            return {**self._summary(prov, policy), "container": container, "container_id": None}
        return self._summary(prov, policy)

    def _summary(self, prov: Any, policy: Any) -> dict[str, Any]:
        return {
            "kernel_id": self.kernel_id,
            "uid": self.uid,
            "user": _user_name(self.uid),
            "kernelspec": self.request.get("kernelspec", {}).get("name", ""),
            "profile": prov.profile,
            "container": prov.container_name,
            "container_id": prov.container_id,
            "memory_limit": self.memory,
            "runtime": policy.runtime if policy else "",
            "network": policy.network if policy else "",
            "started": self.started,
            "owner_pid": self.owner.pid,
        }


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _text_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{what} must be an object of strings")
    return dict(value)


def _text_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what} must be a list of strings")
    return list(value)


def _text(value: Any, what: str, limit: int = 1024) -> str | None:
    """An optional string field of a request, bounded (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f"{what} must be a string of at most {limit} characters")
    return value


KERNEL_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_")


def _kernel_id(request: dict[str, Any]) -> str:
    kernel_id = request.get("kernel_id")
    if (
        not isinstance(kernel_id, str)
        or not kernel_id
        or len(kernel_id) > 64
        or not set(kernel_id) <= KERNEL_ID_CHARS
    ):
        raise BadRequest("kernel_id must be 1-64 letters, digits, '-' or '_'")
    return kernel_id


class KernelRegistry:
    """Every kernel of every caller, on the service's one event loop."""

    def __init__(
        self,
        rules: RulesFile,
        provisioner_config: dict[str, Any],
        state_dir: str,
        staging_root: str,
        orphan_timeout: float = 30.0,
        backend: Any = None,
    ):
        self.rules = rules
        self.provisioner_config = provisioner_config
        self.state_dir = Path(state_dir)
        self.staging_root = staging_root
        self.orphan_timeout = orphan_timeout
        self.kernels: dict[str, ServedKernel] = {}
        # the terminals' sandboxes (service/terminals.py): they count against max_kernels too
        self.terminals: dict[str, Any] = {}
        self.starting: dict[int, list[int]] = {}  # uid -> memory of starts under way
        # kernels the service ended and cleaned: kernel id -> (uid, exit code, reason, when)
        self.ended: dict[str, tuple[int, int, str, float]] = {}
        self._exits = KeptAtExit()
        self._sweeps = SweepOnce()
        self._backend = backend
        self._broker: Any = None

    # -- the provisioner, as the caller's kernelspec asks and the operator's rules allow -----

    def _provisioner(
        self,
        kernel_id: str,
        caller_owner: tuple[int, int],
        request: dict[str, Any],
        rules: CallerRules,
        enforce: bool = True,
    ) -> Any:
        """The provisioner for ``request``, held to ``rules`` (``enforce`` False: a running
        kernel adopted after a restart, which the rules allowed when it started)."""
        from kernel_sandbox.provisioner import DockerSandboxProvisioner

        spec_request = request.get("kernelspec") or {}
        if not isinstance(spec_request, dict):
            raise BadRequest("kernelspec must be an object")
        name = _text(spec_request.get("name"), "kernelspec.name", 255)
        if not name:
            raise BadRequest("kernelspec.name must be a non-empty string")
        argv = _text_list(spec_request.get("argv"), "kernelspec.argv")
        if not argv:
            raise BadRequest("kernelspec.argv must not be empty")
        spec = KernelSpec(
            argv=argv,
            env=_text_map(spec_request.get("env"), "kernelspec.env"),
            display_name=_text(spec_request.get("display_name"), "kernelspec.display_name") or name,
            language=_text(spec_request.get("language"), "kernelspec.language", 64) or "python",
        )
        spec.name = name
        asked = request.get("config") or {}
        if not isinstance(asked, dict):
            raise BadRequest("config must be an object of policy keys")
        not_policy = sorted(set(asked) - set(SandboxPolicy.keys()) - POOL_KEYS - {"profile"})
        if not_policy:  # kube_config, kube_namespace, engine, ...: the service's, not the caller's
            raise PolicyError(
                f"kernelspec {name}: {', '.join(not_policy)}: not a policy key; through the "
                "sandbox service only policy keys may be asked for (where and how kernels "
                "run is the service's configuration)"
            )
        refused = sorted(OPERATOR_KEYS & set(asked))
        if refused:
            raise PolicyError(
                f"kernelspec {name}: {', '.join(refused)} is decided by the sandbox service's "
                "operator, not by a kernelspec"
            )
        # the warm pool is the operator's (`kernel-sandbox serve --pool-size`), one for all
        config = {k: v for k, v in asked.items() if k not in POOL_KEYS}
        profile = _text(config.pop("profile", None), "config.profile", 255) or _default_profile(
            rules
        )
        if enforce:
            rules.check_profile(profile)
            rules.check_kernelspec(name)
        if config.get("datasets"):
            names = config["datasets"]
            names = list(names) if isinstance(names, (dict, list)) else [names]
            if not all(isinstance(n, str) for n in names) or (
                isinstance(config["datasets"], dict)
                and not all(isinstance(v, str) for v in config["datasets"].values())
            ):
                raise BadRequest("config.datasets must name datasets (strings)")
            config["datasets"] = {
                d.name: f"{d.source}:{d.access}"
                for d in rules.check_datasets([str(n) for n in names])
            }
        if (
            config.get("network") == "allowlist"
            and not config.get("egress")
            and config.get("egress_mode") != "ask"  # ask: each host is a person's decision
        ):
            config["egress"] = list(rules.egress)  # the operator's allowlist for the caller
        if config.get("egress") and enforce:
            egress = config["egress"]
            egress = [egress] if isinstance(egress, str) else egress
            if not isinstance(egress, list) or not all(isinstance(e, str) for e in egress):
                raise BadRequest("config.egress must be a pattern or a list of patterns")
            rules.check_egress(egress)
        settings = {**self.provisioner_config, "service": "off"}
        prov = DockerSandboxProvisioner(
            kernel_id=kernel_id,
            kernel_spec=spec,
            config=Config({"DockerSandboxProvisioner": settings}),
            exit_registry=self._exits,
            orphan_sweeps=self._sweeps,
            profile=profile,
            **({"engine": self._backend} if self._backend is not None else {}),
            **({"data_broker": self._broker} if self._broker is not None else {}),
            **config,
        )
        prov.client_owner = caller_owner
        claimed = _text(request.get("client"), "client", 200)  # the caller's word: audit label
        prov.audit_client = f"{claimed or 'unnamed client'} (through the service)"
        if enforce:  # the operator's ceilings for this caller, a refusal naming the rule
            policy, sources = rules.apply_ceilings(prov.policy, prov.policy_sources)
            prov._policy, prov._sources = policy, sources
        return prov

    # -- operations -------------------------------------------------------------------------

    def _mine(
        self, caller: Caller, kernel_id: str, rules: CallerRules | None = None
    ) -> ServedKernel:
        kernel = self.kernels.get(kernel_id)
        operator = (rules or self.rules.current().for_caller(caller)).operator
        if kernel is None or (kernel.uid != caller.uid and not operator):
            raise NoSuchKernel(
                f"no kernel {kernel_id} of {caller.describe()} (see kernel-sandbox ps)"
            )
        return kernel

    async def start(
        self, caller: Caller, request: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        """Start (or, for a kernel of the caller's, restart) a kernel; its connection info."""
        kernel_id = _kernel_id(request)
        folders = self._folder_list(request, len(fds))
        _text(request.get("cwd"), "cwd", 4096)  # the workspace comes as a descriptor
        if not isinstance(request.get("restart", False), bool):
            raise BadRequest("restart must be true or false")
        existing = self.kernels.get(kernel_id)
        rules = self.rules.current().for_caller(caller)
        if existing is not None and existing.uid != caller.uid:
            raise NoSuchKernel(f"kernel id {kernel_id} is taken; use a new one")
        if existing is None:
            prov = self._provisioner(kernel_id, caller.owner, request, rules)
            policy = prov.policy  # layered and capped: PolicyError names the rule
            kernel = ServedKernel(
                kernel_id,
                caller.uid,
                caller.gid,
                self._owner(caller),
                request,
                prov,
                memory=policy.memory_limit,
            )
            self._reserve(caller, rules, policy.memory_limit)
        else:
            kernel = existing
            kernel.owner, kernel.owner_lost = self._owner(caller), None
        try:
            async with kernel.lock:
                launched = await self._launch(kernel, caller, rules, request, folders, fds)
        except BaseException:
            if existing is None:
                self._unreserve(caller, kernel.memory)
            raise
        if existing is None:
            self._unreserve(caller, kernel.memory)
            self.kernels[kernel_id] = kernel
            self.ended.pop(kernel_id, None)
        self._save(kernel)
        return {**launched, "policy": _policy_summary(kernel.provisioner)}

    def _folder_list(self, request: dict[str, Any], count: int) -> list[dict[str, Any]]:
        folders = request.get("folders")
        folders = [] if folders is None else folders
        if not isinstance(folders, list) or len(folders) != count:
            raise BadRequest(f"folders must describe each of the {count} descriptor(s) sent")
        for folder in folders:
            if not isinstance(folder, dict) or folder.get("for") not in ("workspace", "mount"):
                raise BadRequest("each folder is {'for': 'workspace'|'mount', 'index': N}")
        return folders

    async def _launch(
        self,
        kernel: ServedKernel,
        caller: Caller,
        rules: CallerRules,
        request: dict[str, Any],
        folders: list[dict[str, Any]],
        fds: list[int],
    ) -> dict[str, Any]:
        prov = kernel.provisioner
        policy = prov.policy
        staging = Staging(self.staging_root)
        received: list[CallerFolder] = []
        try:
            notes: list[str] = []
            if policy.backend == "kubernetes":
                staged = None
                if policy.mounts:  # a node's folder is not the caller's to open and send
                    raise PolicyError(
                        f"kernelspec {prov._spec_name}: mounts: through the sandbox service a "
                        "kernel pod mounts no folders (backend 'kubernetes'); use backend "
                        "'docker' for this kernelspec"
                    )
            else:
                staged, notes = self.stage_folders(
                    prov, caller, rules, folders, fds, staging, received
                )
            prov.staged_workspace = staged
            cwd = staged[1] if staged is not None else None
            env = _text_map(request.get("env"), "env")
            extra = _text_list(request.get("extra_arguments"), "extra_arguments")
            if (
                cwd is None
                and policy.workspace != "none"
                and not notes
                and policy.backend != "kubernetes"
            ):
                asked = str(request.get("cwd") or "")[:200]
                notes.append(f"the workspace is not mounted: the client could not open {asked}")
            # The provisioner mounts only the staged folder; cwd names it in its messages.
            cwd = cwd or str(request.get("cwd") or "/")[:4096]
            kwargs = await prov.pre_launch(env=env, cwd=cwd, extra_arguments=extra)
            cmd = kwargs.pop("cmd")
            info = await prov.launch_kernel(cmd, **kwargs)
            await prov.post_launch(**kwargs)
            if prov._kube is not None:
                try:
                    info = await self._relay_pod(kernel)
                except BaseException:  # no pod the caller cannot reach (nor anyone reap)
                    await prov.cleanup(restart=False)
                    raise
            for note in notes:
                prov.log.warning("kernel %s: %s", kernel.kernel_id, note)
        finally:
            staging.release()
            for got in received:
                got.close()
            for index, fd in enumerate(fds):
                if fd >= 0:  # taken: the server closes what is left in fds after the request
                    os.close(fd)
                    fds[index] = -1
        info = dict(info)
        key = info.get("key")
        if isinstance(key, bytes):
            info["key"] = key.decode()
        return {"connection_info": info, "notes": notes}

    async def _relay_pod(self, kernel: ServedKernel, directory: str | None = None) -> dict:
        """Relay a pod kernel's sockets to ipc sockets of the caller's (service/pods.py): the
        caller gets those and the HMAC key, never the Curve keys or the pod's address."""
        from kernel_sandbox.service.pods import PodRelays, audit_observer

        prov = kernel.provisioner
        kube = prov._kube
        assert kube is not None and kube.info is not None
        if kernel.relays is None:
            where = directory or os.path.join(
                prov.runtime_root, f"p-{kernel.kernel_id[:8]}-{secrets.token_hex(4)}"
            )
            owner = prov.client_owner or (kernel.uid, kernel.gid)
            limits = prov.relay_limits
            kernel.relays = PodRelays(
                where,
                owner,
                audit_observer(prov),
                kernel.kernel_id,
                prov.log,
                limits.max_message,
                limits.hwm,
            )
        await asyncio.to_thread(kernel.relays.start, kube.address, kube.info)
        return kernel.relays.connection_info(kube.info)

    def stage_folders(
        self,
        prov: Any,
        caller: Caller,
        rules: CallerRules,
        folders: list[dict[str, Any]],
        fds: list[int],
        staging: Staging,
        received: list[CallerFolder],
    ) -> tuple[tuple[str, str] | None, list[str]]:
        """Check the folders the caller sent and bind them in ``staging``: the workspace,
        then each mount (put in ``prov``'s policy
        in place of the caller's path). Takes the descriptors (``fds`` entries set to -1);
        what was received goes in ``received`` (the caller closes those). Returns the
        workspace as (staged folder, its path; None: not mounted) and notes for the caller;
        sets the caller's uid as the sandbox's when a folder is mounted read-write.

        Raises:
            PolicyError, ServiceRefused: a mount the rules or the caller's rights refuse.
        """
        policy = prov.policy
        mounts = list(policy.mounts)
        rw = policy.workspace == "rw" or any(not m.read_only for m in mounts)
        workspace: tuple[str, str] | None = None
        notes: list[str] = []
        staged_mounts = []
        order = sorted(range(len(folders)), key=lambda i: folders[i]["for"] != "workspace")
        for index in order:
            folder, fd = folders[index], fds[index]
            fds[index] = -1  # ours now: receive_folder closes it on refusal
            if folder["for"] == "workspace":
                if policy.workspace == "none" or workspace is not None:
                    os.close(fd)
                    continue
                try:  # as in direct mode: a folder no sandbox may see is not mounted
                    got = receive_folder(fd, caller, policy.workspace, "workspace")
                    received.append(got)
                    rules.check_mount(got.path, got.mode)
                except (NotMountable, ServiceRefused) as exc:
                    notes.append(f"the workspace is not mounted: {exc}")
                    continue
                workspace = (staging.bind(got), got.path)
            else:
                which = folder.get("index")
                if not isinstance(which, int) or not 0 <= which < len(mounts):
                    raise BadRequest(f"folder index {which!r}: no such mount")
                mount = mounts[which]
                mode = "ro" if mount.read_only else "rw"
                got = receive_folder(fd, caller, mode, f"mounts[{which}]")
                received.append(got)
                rules.check_mount(got.path, mode)
                staged_mounts.append((which, staging.bind(got)))
        if len(staged_mounts) != len(mounts):
            raise PolicyError(
                "mounts: through the sandbox service each mounted folder must be opened "
                "by you (the client sends it); this client sent "
                f"{len(staged_mounts)} of {len(mounts)}"
            )
        if staged_mounts:
            replaced = list(mounts)
            for which, source in staged_mounts:
                replaced[which] = type(mounts[which])(
                    source, mounts[which].target, mounts[which].read_only
                )
            prov._policy = dataclasses.replace(policy, mounts=tuple(replaced))
        if rw and prov._identity is None:
            prov._identity = Identity(
                caller.uid, caller.gid, "the caller's own uid (it writes the caller's folders)"
            )
        return workspace, notes

    def _reserve(self, caller: Caller, rules: CallerRules, memory: int) -> None:
        live = [
            s for s in [*self.kernels.values(), *self.terminals.values()] if s.uid == caller.uid
        ]
        starting = self.starting.setdefault(caller.uid, [])
        rules.check_count(
            len(live) + len(starting), sum(k.memory for k in live) + sum(starting), memory
        )
        starting.append(memory)

    def _unreserve(self, caller: Caller, memory: int) -> None:
        starting = self.starting.get(caller.uid, [])
        if memory in starting:
            starting.remove(memory)

    def _owner(self, caller: Caller) -> Owner:
        return Owner(socket.gethostname(), caller.pid, process_start_time(caller.pid))

    def _ended_of(self, caller: Caller, kernel_id: str) -> tuple[int, int, str, float] | None:
        """The end of a kernel of the caller's that the service ended and cleaned, if any."""
        ended = self.ended.get(kernel_id)
        if ended is None or kernel_id in self.kernels:
            return None
        if ended[0] != caller.uid and not self.rules.current().for_caller(caller).operator:
            return None
        return ended

    async def poll(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        ended = self._ended_of(caller, _kernel_id(request))
        if ended is not None:
            return {"exit_code": ended[1], "end_reason": ended[2]}
        kernel = self._mine(caller, _kernel_id(request))
        prov = kernel.provisioner
        code = await prov.poll()
        reply: dict[str, Any] = {"exit_code": code}
        if code is not None and prov._end_reason:
            reply["end_reason"] = prov._end_reason
        return reply

    async def signal(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        if self._ended_of(caller, _kernel_id(request)) is not None:
            return {}  # nothing left to signal
        kernel = self._mine(caller, _kernel_id(request))
        signum = request.get("signum")
        if not isinstance(signum, int) or not 0 < signum < 65:
            raise BadRequest("signum must be a signal number")
        await kernel.provisioner.send_signal(signum)
        return {}

    async def cleanup(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        kernel_id = _kernel_id(request)
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            if self._ended_of(caller, kernel_id) is not None:
                self.ended.pop(kernel_id, None)
            return {}  # cleanup is idempotent
        kernel = self._mine(caller, kernel_id)
        restart = bool(request.get("restart"))
        async with kernel.lock:
            await self._cleanup(kernel, restart)
        return {}

    async def _cleanup(self, kernel: ServedKernel, restart: bool) -> None:
        await kernel.provisioner.cleanup(restart=restart)
        if not restart and kernel.relays is not None:
            await asyncio.to_thread(kernel.relays.close)
        if not restart:
            self.kernels.pop(kernel.kernel_id, None)
            self._record(kernel.kernel_id).unlink(missing_ok=True)

    async def adopt(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """A restarted client (same uid) takes its running kernel back: it now lives as long
        as that client does."""
        kernel = self.kernels.get(_kernel_id(request))
        if kernel is None or kernel.uid != caller.uid:
            raise NoSuchKernel(f"no running kernel {_kernel_id(request)} of {caller.describe()}")
        kernel.owner, kernel.owner_lost = self._owner(caller), None
        self._save(kernel)
        if kernel.relays is not None and kernel.provisioner._kube is not None:
            return {"connection_info": kernel.relays.connection_info(kernel.provisioner._kube.info)}
        info = dict(kernel.provisioner.connection_info)
        if isinstance(info.get("key"), bytes):
            info["key"] = info["key"].decode()
        return {"connection_info": info}

    def list(self, caller: Caller) -> dict[str, Any]:
        rules = self.rules.current().for_caller(caller)
        return {
            "kernels": [
                k.summary() for k in self.kernels.values() if k.uid == caller.uid or rules.operator
            ],
            "all": rules.operator,
        }

    async def stop(self, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
        """End a kernel as an operator's stop does: its clients are told why."""
        kernel = self._mine(caller, _kernel_id(request))
        reason = f"stopped by {caller.describe()} through the sandbox service"
        kernel.provisioner._end_reason = reason
        await kernel.provisioner.send_signal(15)
        return {"stopped": kernel.kernel_id}

    # -- owners that vanish, and the service's own restart -----------------------------------

    async def sweep(self) -> None:
        """End the kernels whose owner process has been gone for orphan_timeout; clean those
        the service ended (:meth:`_clean_ended`)."""
        now = time.monotonic()
        await self._clean_ended(now)
        for kernel in list(self.kernels.values()):
            if kernel.owner.is_alive() is not False:
                kernel.owner_lost = None
                continue
            if kernel.owner_lost is None:
                kernel.owner_lost = now
            elif now - kernel.owner_lost >= self.orphan_timeout:
                log.warning(
                    "kernel %s of uid %d: its owner (pid %d) is gone; ending it",
                    kernel.kernel_id,
                    kernel.uid,
                    kernel.owner.pid,
                )
                try:
                    async with kernel.lock:
                        await self._cleanup(kernel, restart=False)
                except Exception as exc:
                    log.warning("kernel %s: cleanup failed: %s", kernel.kernel_id, exc)

    async def _clean_ended(self, now: float) -> None:
        """Remove the container and runtime directory of each kernel the service ended
        (idle_timeout, an operator's stop) ENDED_GRACE after its container ended: its client
        does not restart it, and may never send the cleanup (a Jupyter Server that forgets a
        dead kernel does not). Polls are still answered with its end for ENDED_KEPT."""
        for kernel_id, ended in list(self.ended.items()):
            if now - ended[3] > ENDED_KEPT:
                del self.ended[kernel_id]
        for kernel in list(self.kernels.values()):
            prov = kernel.provisioner
            if prov._end_reason is None or kernel.lock.locked():
                kernel.ended = None
                continue
            try:
                code = await prov.poll()  # the first that sees it ended tells its clients why
            except Exception as exc:
                log.warning("kernel %s: cannot poll it: %s", kernel.kernel_id, exc)
                continue
            if code is None:
                continue
            if kernel.ended is None:
                kernel.ended = now
            if now - kernel.ended < ENDED_GRACE or prov._end_reason is None:
                continue
            reason = str(prov._end_reason)
            log.info(
                "kernel %s of uid %d: ended (%s); cleaning up", kernel.kernel_id, kernel.uid, reason
            )
            try:
                async with kernel.lock:
                    await self._cleanup(kernel, restart=False)
            except Exception as exc:
                log.warning("kernel %s: cleanup failed: %s", kernel.kernel_id, exc)
                continue
            self.ended[kernel.kernel_id] = (kernel.uid, int(code), reason, now)

    def _record(self, kernel_id: str) -> Path:
        return self.state_dir / f"{kernel_id}.json"

    def _save(self, kernel: ServedKernel) -> None:
        """Write the kernel's record (atomically, root-only) for a restarted service."""
        asyncio.get_running_loop().create_task(self._save_async(kernel))

    async def _save_async(self, kernel: ServedKernel) -> None:
        info = await kernel.provisioner.get_provisioner_info()
        record = {
            "kernel_id": kernel.kernel_id,
            "uid": kernel.uid,
            "gid": kernel.gid,
            "owner": {
                "host": kernel.owner.host,
                "pid": kernel.owner.pid,
                "start": kernel.owner.start,
            },
            "request": {k: v for k, v in kernel.request.items() if k not in ("env", "op")},
            "started": kernel.started,
            "memory": kernel.memory,
            "provisioner_info": info,
            "relays": str(kernel.relays.directory) if kernel.relays is not None else None,
        }
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.state_dir / f".{kernel.kernel_id}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        os.rename(staging, self._record(kernel.kernel_id))

    async def restore(self) -> int:
        """Adopt the kernels a previous run of the service left running; drop the records of
        those that ended. Returns how many were adopted."""
        adopted = 0
        for path in sorted(self.state_dir.glob("*.json")) if self.state_dir.is_dir() else []:
            try:
                record = json.loads(path.read_text())
                caller = Caller.for_uid(int(record["uid"]), int(record["gid"]))
                rules = self.rules.current().for_caller(caller)
                kernel_id = str(record["kernel_id"])
                prov = self._provisioner(
                    kernel_id, caller.owner, record["request"], rules, enforce=False
                )
                await prov.load_provisioner_info(record["provisioner_info"])
                if prov._kube is not None:
                    adopted += await self._restore_pod(path, record, caller, prov)
                    continue
                state = prov.container_id and await prov.poll()
                if prov.runtime_dir is None or not prov.runtime_dir.exists() or state is not None:
                    await prov.cleanup(restart=False)
                    path.unlink(missing_ok=True)
                    continue
                prov.runtime_dir.give_client_sockets(prov.connection_info, caller.owner)
                owner = Owner(**record["owner"])
                self.kernels[kernel_id] = ServedKernel(
                    kernel_id,
                    caller.uid,
                    caller.gid,
                    owner,
                    record["request"],
                    prov,
                    started=float(record.get("started") or time.time()),
                    memory=int(record.get("memory") or 0),
                )
                adopted += 1
            except Exception as exc:  # one bad record must not keep the service down
                log.warning("service: cannot adopt the kernel of %s: %s", path.name, exc)
        if self.provisioner_config.get("kube_namespace"):
            keep = frozenset(
                k.provisioner._kube.pod_name
                for k in self.kernels.values()
                if k.provisioner._kube is not None and k.provisioner._kube.pod_name
            )
            from kernel_sandbox.service.pods import sweep_service_pods

            asyncio.get_running_loop().create_task(
                sweep_service_pods(self.provisioner_config, keep, log)
            )
        return adopted

    async def _restore_pod(
        self, path: Path, record: dict[str, Any], caller: Caller, prov: Any
    ) -> int:
        """Adopt a pod kernel whose pod still runs: its relays again, at the same paths (the
        caller's sockets reconnect). 1 when adopted, 0 when it had ended (cleaned)."""
        if prov._kube.pod_name is None or await prov.poll() is not None:
            await prov.cleanup(restart=False)
            path.unlink(missing_ok=True)
            if record.get("relays"):
                shutil.rmtree(record["relays"], ignore_errors=True)
            return 0
        kernel = ServedKernel(
            str(record["kernel_id"]),
            caller.uid,
            caller.gid,
            Owner(**record["owner"]),
            record["request"],
            prov,
            started=float(record.get("started") or time.time()),
            memory=int(record.get("memory") or 0),
        )
        await self._relay_pod(kernel, record.get("relays") or None)
        self.kernels[kernel.kernel_id] = kernel
        return 1

    async def close_all(self) -> None:
        """End every kernel (an operator's `serve --stop-kernels-at-exit`, and tests)."""
        for kernel in list(self.kernels.values()):
            try:
                await self._cleanup(kernel, restart=False)
            except Exception as exc:
                log.warning("kernel %s: cleanup failed: %s", kernel.kernel_id, exc)


def _default_profile(rules: CallerRules) -> str:
    """The profile of a start that names none: ``strict`` where the caller may use it, else
    the caller's only profile (several: the check then names them)."""
    if rules.profiles is None or "strict" in rules.profiles or len(rules.profiles) != 1:
        return "strict"
    return next(iter(rules.profiles))


def _policy_summary(prov: Any) -> dict[str, Any]:
    policy = prov.policy
    return {
        "image": policy.image,
        "memory_limit": policy.memory_limit,
        "cpu_limit": policy.cpu_limit,
        "workspace": policy.workspace,
        "network": policy.network,
        "runtime": policy.runtime,
        "idle_timeout": policy.idle_timeout,
        "user": prov._user,
    }

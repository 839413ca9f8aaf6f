"""The ``docker-sandbox`` kernel provisioner: one kernel, one ephemeral hardened container.

``jupyter_client``'s KernelManager calls these coroutines; it never learns that the kernel
runs in a container. The kernel talks ZeroMQ over ``ipc://`` sockets in a private runtime
directory bind-mounted into a container that has no network interface but loopback. What the
kernel holds on the host (that directory, its lifeline, container, data token, egress proxy
and monitor) is a :class:`~kernel_sandbox.host.resources.KernelResources`, with one close.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase

from kernel_sandbox.egress.service import is_ipython_kernel
from kernel_sandbox.engine.backend import ContainerRequest
from kernel_sandbox.engine.backend import start_error as container_start_error
from kernel_sandbox.engine.container import workspace_note
from kernel_sandbox.errors import EngineUnavailable, KernelStartError, PolicyError
from kernel_sandbox.host.notices import DELIVERY, Notice, memory_notice, publish, stopped_notice
from kernel_sandbox.host.pool import PooledSandbox, PoolRecipe, process_pool
from kernel_sandbox.host.resources import KernelResources
from kernel_sandbox.host.rundir import (
    RuntimeDir,
    hardlinks_allowed,
    ipc_connection_info,
)
from kernel_sandbox.host.uids import (
    UidPool,
    UidRange,
)
from kernel_sandbox.inside.contract import (
    HINTS_MODULE,
    IMAGE_KIND_KERNEL,
    NETWORK_ENV,
    RUNTIME_MOUNT,
    SANDBOX_HOME,
    label,
)
from kernel_sandbox.kube.settings import KubeSettings
from kernel_sandbox.policy import PROFILES, SandboxPolicy, layer_policy, resolve_workspace
from kernel_sandbox.policy.traits import PolicyTraits
from kernel_sandbox.policy.values import format_size
from kernel_sandbox.provisioner.auditing import (
    RELAYED,
    link_shell,
    note,
    note_signal,
    start_shell_audit,
)
from kernel_sandbox.provisioner.container import (
    check_datasets_not_writable,
    check_exposure,
    container_env,
    container_labels,
    with_watchdog,
)
from kernel_sandbox.provisioner.identity import Identity, decide_identity
from kernel_sandbox.provisioner.pooling import pool_recipe, why_not_pooled
from kernel_sandbox.provisioner.settings import ProvisionerSettings
from kernel_sandbox.provisioner.via_service import ServiceKernel
from kernel_sandbox.service.client import choose_service

if TYPE_CHECKING:
    from kernel_sandbox.broker.server import DataBroker
    from kernel_sandbox.kube.kernel import KubeKernel

__all__ = ["DockerSandboxProvisioner"]

# poll()'s exit code for a kernel whose engine cannot be reached.
ENGINE_GONE = -1
# Seconds launch_kernel waits for the IOPub relay to reach the kernel's socket.
RELAY_ATTACH_TIMEOUT = 5.0
# Constructor kwargs that come from jupyter_client itself, not from a kernelspec's config.
_FRAMEWORK_KWARGS = {"kernel_id", "kernel_spec", "parent", "config", "log"}
# Collaborators a caller (a test) may hand in as constructor kwargs instead of the defaults.
_INJECTED_KWARGS = {"engine", "data_broker", "exit_registry", "orphan_sweeps"}


class DockerSandboxProvisioner(
    ProvisionerSettings, KubeSettings, PolicyTraits, KernelProvisionerBase
):  # type: ignore[misc]
    """Launch the kernelspec's argv inside an ephemeral, network-less Docker container.

    Every policy key is a trait here, so it can be set in Jupyter config
    (``c.DockerSandboxProvisioner.memory_limit = "4g"``) or in a kernelspec's
    ``metadata.kernel_provisioner.config``; the kernelspec wins. Unset traits (None) fall
    back to the chosen profile, then to the strict built-in defaults.
    """

    def __init__(self, **kwargs: Any):
        # a kernelspec may name its cluster and namespace (kube_*): settings, not policy keys
        framework = _FRAMEWORK_KWARGS | _INJECTED_KWARGS | set(KubeSettings.class_trait_names())
        spec_config = {k: kwargs.pop(k) for k in list(kwargs) if k not in framework}
        super().__init__(**kwargs)
        self._service_setting = str(spec_config.pop("service", "") or "")
        self._via_service: ServiceKernel | None | bool = False  # False: not decided yet
        self._spec_config = spec_config
        self._policy: SandboxPolicy | None = None
        self._sources: dict[str, str] = {}
        self._launched = False  # True once a container has started (later starts are restarts)
        self._image_is_ours: bool | None = None  # built by `kernel-sandbox image build`
        self._resources: KernelResources | None = None
        self._identity: Identity | None = None  # decided before the first start, kept
        self._user: str | None = None  # the uid:gid the container runs as
        self._loop: asyncio.AbstractEventLoop | None = None
        self.cwd: str | None = None
        self._end_reason: str | None = None  # why the monitor ended the running container
        self._ending: asyncio.Task[None] | None = None  # a served kernel's end (ending.py)
        self._told: str | None = None  # the container whose end has been explained
        self._telling = False
        self.notice: Notice | None = None  # why the last container ended, when the host knows
        # Set by the sandbox service for its caller's kernels (kernel_sandbox.service):
        self.client_owner: tuple[int, int] | None = None  # who connects (uid, gid)
        self.staged_workspace: tuple[str, str] | None = None  # (bind source, path inside)
        self._pooled: PooledSandbox | None = None  # claimed in pre_launch, started by launch
        self._pool_reason: str | None = None  # why starts are not served by a pool (logged once)
        self._kube: KubeKernel | None = None  # the pod half, with backend 'kubernetes'

    @property
    def via_service(self) -> ServiceKernel | None:
        """The sandbox service this kernel is started through, or None (direct mode): decided
        once (:func:`~kernel_sandbox.service.client.choose_service`)."""
        if self._via_service is False:
            path, why = choose_service(self._service_setting or self.service)
            self._via_service = ServiceKernel(self, path) if path else None
            self.log.debug("kernel %s: %s", self.kernel_id, why)
        return self._via_service if isinstance(self._via_service, ServiceKernel) else None

    @property
    def kube(self) -> KubeKernel | None:
        """The pod half of this kernel when the policy says ``backend: kubernetes`` (and no
        sandbox service starts it), else None (:mod:`kernel_sandbox.kube.kernel`)."""
        if self._kube is None and self.policy.backend == "kubernetes":
            from kernel_sandbox.kube.kernel import KubeKernel

            self._kube = KubeKernel(self)
        return self._kube

    @property
    def resources(self) -> KernelResources:
        """What the kernel holds on the host: runtime dir, lifeline, container, data, egress,
        monitor."""
        if self._resources is None:
            self._resources = KernelResources(
                self.kernel_id or "", self.engine, self.log, self.exit_registry
            )
        return self._resources

    @property
    def container_id(self) -> str | None:
        return self._resources.container_id if self._resources else None

    @property
    def container_name(self) -> str | None:
        return self._resources.container_name if self._resources else None

    @property
    def runtime_dir(self) -> RuntimeDir | None:
        return self._resources.runtime_dir if self._resources else None

    # -- policy -----------------------------------------------------------------------------

    @property
    def policy(self) -> SandboxPolicy:
        """The effective policy, validated once (PolicyError before any container exists)."""
        if self._policy is None:
            self._policy, self._sources = self.resolve_policy()
        return self._policy

    @property
    def policy_sources(self) -> dict[str, str]:
        """Where each policy value came from (default, profile X, jupyter config, kernelspec)."""
        self.policy  # noqa: B018 - resolves and validates
        return dict(self._sources)

    def resolve_policy(self) -> tuple[SandboxPolicy, dict[str, str]]:
        spec = dict(self._spec_config)
        profile = spec.pop("profile", None) or self.profile
        allowed = set(SandboxPolicy.keys())
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise PolicyError(
                f"kernelspec {self._spec_name}: unknown provisioner config key "
                f"{', '.join(map(repr, unknown))}; known keys: profile, "
                f"{', '.join(sorted(allowed))}"
            )
        config_values = {
            key: getattr(self, key)
            for key in SandboxPolicy.keys()
            if getattr(self, key) is not None
        }
        profiles = {**PROFILES, **self.profiles}
        try:
            return layer_policy(profile, profiles, config_values, spec, self.ceilings)
        except PolicyError as exc:
            raise PolicyError(f"kernelspec {self._spec_name}: {exc}") from exc

    @property
    def _spec_name(self) -> str:
        spec = self.kernel_spec
        if spec is None:
            return "(unnamed)"
        return spec.name or os.path.basename(spec.resource_dir or "") or "(unnamed)"

    def _decide_identity(self, workspace: str | None) -> Identity:
        """Who the kernel runs as (:mod:`~kernel_sandbox.provisioner.identity`), decided on
        the first start and kept across restarts."""
        if self._identity is None:
            uid_range = self.checked_uid_range() if os.getuid() == 0 else None
            self._identity = decide_identity(self.policy, workspace, uid_range, self._spec_name)
        return self._identity

    # -- launch -----------------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        if self.via_service is not None:
            return self.via_service.started
        if self._kube is not None:
            return self._kube.started
        return self.container_id is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Validate the policy, prepare the runtime directory and the connection info.

        Called by ``KernelManager.pre_start_kernel`` on every start, restarts included; on a
        restart the runtime directory and connection info are kept so clients stay connected.
        A failure leaves nothing behind (but a restarting kernel's directory).
        """
        if self.via_service is not None:
            return await self.via_service.pre_launch(await super().pre_launch(**kwargs))
        if self.kube is not None:
            cwd, extra = kwargs.pop("cwd", None), kwargs.pop("extra_arguments", [])
            kwargs = await super().pre_launch(**kwargs)
            return await self.kube.pre_launch({**kwargs, "cwd": cwd, "extra_arguments": extra})
        policy = self.policy
        protected = [self.token_db, self.audit_log, self.data_credentials]
        check_exposure(policy, protected, self._spec_name)
        extra_arguments = kwargs.pop("extra_arguments", [])
        self.cwd = str(kwargs.pop("cwd", None) or os.getcwd())
        workspace = resolve_workspace(self.cwd) if policy.workspace == "rw" else None
        check_datasets_not_writable(policy, workspace, self.runtime_root, self._spec_name)
        identity = self._decide_identity(workspace)
        kwargs = await super().pre_launch(**kwargs)
        host_env = kwargs.pop("env")

        if self.reap_orphans:
            self.orphan_sweeps.start(self.engine, self.runtime_root, self.log)
        size = self.runtime_dir_bytes()
        resources = self.resources
        recipe = await self._pool_recipe(identity)
        pooled = await process_pool().claim_or_wait(recipe) if recipe is not None else None
        try:
            if pooled is not None:
                if identity.pooled:  # the pooled sandbox's own uid from the range
                    identity = identity.with_uid(pooled.uid)
                created = resources.take_pooled(pooled)
                self._pooled = pooled
            elif identity.pooled:  # the same uid across restarts (the runtime dir is its)
                pool = UidPool(UidRange.parse(self.uid_range), self.uid_claims)
                identity = identity.with_uid(await asyncio.to_thread(resources.claim_uid, pool))
            if not self._launched:
                self.log.info(
                    "kernel %s: runs as uid %d, gid %d: %s",
                    self.kernel_id,
                    identity.uid,
                    identity.gid,
                    identity.reason,
                )
            self._user = identity.user
            owner = (identity.uid, identity.gid)
            reachable = self.client_owner is not None
            if pooled is None:
                created = resources.open_runtime_dir(self.runtime_root, owner, size, reachable)
                assert resources.runtime_dir is not None
                if created and recipe is not None:  # so that restarts can claim (pooling.py)
                    resources.runtime_dir.make_handle()
            if created:
                assert resources.runtime_dir is not None
                key = uuid.uuid4().hex.encode()
                info = ipc_connection_info(self._client_prefix(owner[0]), key, self._spec_name)
                self.connection_info = cast(KernelConnectionInfo, info)
            self._start_relay(owner[0])
            start_shell_audit(self)
            if policy.datasets:
                record = await asyncio.to_thread(
                    resources.grant_data, self._broker(), policy.datasets, policy.token_ttl, owner
                )
                names = ", ".join(d.name for d in policy.datasets)
                self.log.debug(
                    "kernel %s: data token %s for %s", self.kernel_id, record.token_id, names
                )
            kwargs["cmd"], egress_env = await self._container_command(
                resources, list(extra_arguments), owner, pooled=pooled is not None
            )
        except BaseException:
            self._pooled = None
            await resources.aclose(restart=self._launched)
            raise
        allowed = (*self.env_allowlist, *policy.env_passthrough)
        env = container_env(
            host_env, allowed, self.kernel_spec.env or {}, policy.env, policy.cpu_limit
        )
        kwargs["env"] = {**env, **egress_env, NETWORK_ENV: policy.network}
        kwargs["user"] = identity.user
        return kwargs

    def _start_relay(self, kernel_uid: int | None) -> None:
        """Start the host-side IOPub relay (once: it outlives restarts; clients reach it once
        :meth:`_link_client_sockets` has run). Not where clients connect to the kernel's own
        sockets (links refused, or a kernel adopted from an older version): IOPub is not
        bounded there (logged)."""
        runtime_dir, info = self.resources.runtime_dir, self.connection_info
        assert runtime_dir is not None
        if info["ip"] != runtime_dir.client_prefix:
            self.log.warning(
                "kernel %s: clients connect to the kernel's own sockets, so its IOPub is not "
                "relayed: what it publishes is not bounded (see docs/threat-model.md)",
                self.kernel_id,
            )
            return
        port, key = info["iopub_port"], info["key"]
        self.resources.start_relay(
            str(runtime_dir.kernel_socket(port)),
            str(runtime_dir.relay_socket(port)),
            key if isinstance(key, bytes) else key.encode(),
            info.get("signature_scheme", "hmac-sha256"),
            self.relay_limits,
            kernel_uid,
        )

    def _link_client_sockets(self, kernel_uid: int | None) -> None:
        """Give clients their paths (again: jupyter_client removes them on every restart):
        links to the kernel's sockets, and the relay's socket for IOPub.

        Raises:
            KernelStartError: a kernel socket cannot be linked (see RuntimeDir).
        """
        runtime_dir, info, relay = (
            self.resources.runtime_dir,
            self.connection_info,
            self.resources.relay,
        )
        assert runtime_dir is not None
        skip = ("iopub_port",) if relay is not None else ()
        if self.resources.shell_relays:
            skip = (*skip, *RELAYED)
        runtime_dir.link_client_sockets(info, kernel_uid, skip)
        link_shell(self, kernel_uid)
        if relay is not None:
            relay.expose(str(runtime_dir.client_socket(info["iopub_port"])))
        if self.client_owner is not None and info["ip"] == runtime_dir.client_prefix:
            try:
                runtime_dir.give_client_sockets(info, self.client_owner)
            except OSError as exc:
                raise KernelStartError(
                    f"kernel {self.kernel_id}: cannot give its sockets to uid "
                    f"{self.client_owner[0]}: {exc}"
                ) from exc

    def _client_prefix(self, kernel_uid: int) -> str:
        """Where clients connect: links in a host-only directory to the kernel's sockets, or
        (where this process may not link them) the kernel's own paths, checked before use."""
        runtime_dir = self.resources.runtime_dir
        assert runtime_dir is not None
        if hardlinks_allowed(kernel_uid):
            return runtime_dir.client_prefix
        self.log.warning(
            "kernel %s: cannot hard-link the sockets of uid %d (fs.protected_hardlinks); "
            "clients connect to the kernel's own socket paths (see docs/threat-model.md)",
            self.kernel_id,
            kernel_uid,
        )
        return runtime_dir.socket_prefix

    async def _container_command(
        self,
        resources: KernelResources,
        extra_arguments: list[str],
        owner: tuple[int, int],
        pooled: bool = False,
    ) -> tuple[list[str], dict[str, str]]:
        """The container's command (the kernel under the watchdog, behind the egress bridge)
        and the variables the egress bridge adds; ``pooled``: the kernel's own argv, which a
        pooled sandbox's waiter runs (already under the watchdog, never with egress)."""
        runtime_dir = resources.runtime_dir
        assert runtime_dir is not None
        runtime_dir.clear_sockets(self.connection_info)
        inside_file = runtime_dir.write_container_connection_file(
            self.connection_info, RUNTIME_MOUNT, owner
        )
        argv = [arg.replace("{connection_file}", inside_file) for arg in self.kernel_spec.argv]
        egress, kernel_args = None, []
        if is_ipython_kernel(argv) and await self._image_built_by_us():
            kernel_args.append(f"--ext={HINTS_MODULE}")  # explains no network, no pip
        if self.policy.network == "allowlist":
            if not await self._image_built_by_us():
                raise PolicyError(
                    f"kernelspec {self._spec_name}: network 'allowlist' needs an image built by "
                    f"`kernel-sandbox image build` (it carries the egress bridge); "
                    f"{self.policy.image} is not one"
                )
            # listening by the time the container is up (launch_kernel waits)
            egress = resources.start_egress(
                self.policy,
                self.egress_log,
                self.egress_port,
                self.log_limits,
                self.egress_upstream_ca,
            )
            kernel_args += egress.kernel_arguments(argv)
        argv = argv + extra_arguments + kernel_args
        if pooled:
            return argv, {}
        if self.orphan_timeout > 0 and await self._image_built_by_us():
            argv = with_watchdog(argv, self.orphan_timeout)
        if egress is None:
            return argv, {}
        return egress.container_command(argv), egress.container_env()

    async def _image_built_by_us(self) -> bool:
        """Whether the image carries our in-sandbox code (watchdog, egress bridge)."""
        if self._image_is_ours is None:
            labels = await self.engine.image_labels(self.policy.image) or {}
            self._image_is_ours = labels.get(label("image")) == IMAGE_KIND_KERNEL
        return self._image_is_ours

    def _broker(self) -> DataBroker:
        if self.data_broker is None:
            from kernel_sandbox.broker import shared_broker

            self.data_broker = shared_broker(
                self.token_db, self.audit_log, self.data_credentials, self.log_limits
            )
        return self.data_broker

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the container and wait until the kernel has bound its sockets.

        A failure leaves nothing behind (but a restarting kernel's directory).

        Raises:
            KernelStartError: the container ended (its last log lines are in the message) or
                did not bind its sockets within ``launch_timeout``.
            ImageMissing, RuntimeUnavailable, EngineUnavailable: from the backend.
        """
        if self.via_service is not None:
            return await self.via_service.launch_kernel(cmd, kwargs)
        if self._kube is not None:
            connection_info = await self._kube.launch_kernel(cmd, kwargs)
            self._launched = True
            return connection_info
        resources = self.resources
        assert resources.runtime_dir is not None
        if self._pooled is not None:
            return await self._launch_pooled(cmd, kwargs)
        policy = self.policy
        workspace, workspace_path = self._workspace_mount()
        if policy.workspace != "none" and workspace is None and self.client_owner is None:
            self.log.warning(
                "kernel %s: not mounting %s as the workspace (a host path no sandbox may see); "
                "the kernel starts in %s",
                self.kernel_id,
                self.cwd,
                SANDBOX_HOME,
            )
        self._log_workspace_note(workspace, workspace_path)
        name = f"ks-{(self.kernel_id or uuid.uuid4().hex)[:8]}-{uuid.uuid4().hex[:6]}"
        profile = self._spec_config.get("profile") or self.profile
        labels = container_labels(
            self.kernel_id or "", self._spec_name, profile, str(resources.runtime_dir.path)
        )
        if self.client_owner is not None:  # reaped only by the service (see host/reap.py)
            labels[label("service")] = "true"
            labels[label("caller-uid")] = str(self.client_owner[0])
        request = ContainerRequest(
            name=name,
            policy=policy,
            command=cmd,
            env=kwargs.get("env", {}),
            labels=labels,
            runtime_dir=str(resources.runtime_dir.shared),
            user=kwargs["user"],
            workspace=workspace,
            workspace_path=workspace_path,
            host_dir=str(resources.runtime_dir.host_dir),
        )
        started = time.monotonic()
        try:
            resources.container_id = await self.engine.start(request)
            resources.container_name = name
            await resources.wait_egress_ready()
            await self._until_ready(int(kwargs["user"].split(":")[0]))
        except BaseException:
            await resources.aclose(restart=self._launched)
            raise
        return self._launched_in(started)

    async def _launch_pooled(self, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        """Hand the claimed sandbox its argv and environment; its waiter becomes the kernel
        (the connection file was written by pre_launch)."""
        pooled, self._pooled = self._pooled, None
        assert pooled is not None
        self._log_workspace_note(*self._workspace_mount())
        started = time.monotonic()
        try:
            await asyncio.to_thread(pooled.send_claim, cmd[3:], dict(kwargs.get("env", {})))
            await self._until_ready(pooled.uid)
        except BaseException:
            await self.resources.aclose(restart=self._launched)
            raise
        self.log.debug("kernel %s: claimed sandbox %s", self.kernel_id, pooled.container_name)
        return self._launched_in(started)

    async def _until_ready(self, kernel_uid: int) -> None:
        """Wait for the kernel's sockets, give clients theirs, wait for the IOPub relay."""
        await self._wait_until_listening(kernel_uid)
        self._link_client_sockets(kernel_uid)
        await self.resources.wait_relay(RELAY_ATTACH_TIMEOUT)

    def _launched_in(self, started: float) -> KernelConnectionInfo:
        note(
            self,
            "kernel_start",
            restart=self._launched,
            image=self.policy.image,
            container=self.container_name,
            spec=self._spec_name,
        )
        self._launched = True
        self._end_reason = self.notice = None
        self._watch()
        self.log.debug(
            "kernel %s: container %s ready in %.2fs",
            self.kernel_id,
            self.container_name,
            time.monotonic() - started,
        )
        return self.connection_info

    def _log_workspace_note(self, workspace: str | None, workspace_path: str | None) -> None:
        """Say where the workspace appears when it cannot keep its host path (the notebook
        shows it too: inside/hints.py)."""
        moved = workspace_note(workspace_path or workspace) if workspace else None
        if moved and self.policy.workspace != "none":
            self.log.info("kernel %s: %s", self.kernel_id, moved.removeprefix("kernel-sandbox: "))

    def _workspace_mount(self) -> tuple[str | None, str | None]:
        """(host folder, path inside or None for its own) of the workspace mount, if any."""
        policy = self.policy
        if policy.workspace == "none":
            return None, None
        if self.client_owner is not None:  # the service's caller: only a folder it sent
            return self.staged_workspace or (None, None)
        return resolve_workspace(self.cwd), None

    async def _pool_recipe(self, identity: Identity) -> PoolRecipe | None:
        """The recipe of this start's sandbox when a warm pool may serve it, else None (the
        reason is logged once)."""
        reason = why_not_pooled(self, await self._image_built_by_us())
        if reason is None and not hardlinks_allowed(identity.uid if not identity.pooled else 0):
            reason = "clients cannot be given links to the kernel's sockets"
        if reason is not None:
            if self.policy.pool_size > 0 and reason != self._pool_reason:
                self.log.info("kernel %s: starts cold: %s", self.kernel_id, reason)
            self._pool_reason = reason
            return None
        workspace, workspace_path = self._workspace_mount()
        return pool_recipe(self, identity, workspace, workspace_path)

    async def _wait_until_listening(self, kernel_uid: int | None = None) -> None:
        runtime_dir, container_id = self.runtime_dir, self.container_id
        assert runtime_dir is not None and container_id is not None
        deadline = time.monotonic() + self.launch_timeout
        next_state_check = time.monotonic() + 0.2
        while not runtime_dir.sockets_ready(self.connection_info, kernel_uid):
            now = time.monotonic()
            if now >= next_state_check:
                state = await self.engine.state(container_id)
                if not state.running:
                    logs = await self.engine.logs_tail(container_id)
                    raise container_start_error(
                        self.container_name or "", self.policy.image, state, logs, self.policy
                    )
                next_state_check = now + 0.25
            if now >= deadline:
                logs = await self.engine.logs_tail(container_id)
                raise KernelStartError(
                    f"kernel container {self.container_name} (image {self.policy.image}) did not "
                    f"open its sockets within {self.launch_timeout:.0f}s; raise "
                    "c.DockerSandboxProvisioner.launch_timeout or check the image. Last log "
                    f"lines:\n{logs or '(none)'}"
                )
            await asyncio.sleep(0.005)

    # -- life of a running kernel -----------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the container runs, else its exit code (137 for OOM-kill or SIGKILL).

        The first time a container is seen ended for a reason the host knows (out of memory,
        idle_timeout, an operator's stop), its clients are told why first (:meth:`_tell`).
        """
        if self.via_service is not None:
            return await self.via_service.poll()
        if self._kube is not None:
            return await self._kube.poll()
        if self.container_id is None:
            return 0
        if self._telling:
            return None  # the death is reported once its notice is out
        try:
            state = await self.engine.state(self.container_id)
        except EngineUnavailable as exc:
            # Without the engine there is no container to talk to (an engine that stops
            # takes its containers down): report the kernel dead rather than raise.
            self.log.warning("kernel %s: %s", self.kernel_id, exc)
            return ENGINE_GONE
        if state.running:
            return None
        if self._told != self.container_id:
            self._told = self.container_id
            note(
                self,
                "kernel_exit",
                exit_code=state.exit_code,
                oom_killed=state.oom_killed,
                reason=self._end_reason,
            )
            if state.oom_killed:
                self.log.warning(
                    "kernel %s: container %s was killed: out of memory (memory_limit %s)",
                    self.kernel_id,
                    self.container_name,
                    format_size(self.policy.memory_limit),
                )
                await self._tell(memory_notice(self.policy.memory_limit))
            elif self._end_reason is not None:
                await self._tell(stopped_notice(self._end_reason))
        return state.exit_code

    async def _tell(self, notice: Notice) -> None:
        """Show ``notice`` to the kernel's clients, in the cell that was running (never raises:
        a notice that cannot be sent is logged)."""
        self.notice = notice
        resources, info = self.resources, self.connection_info
        if resources.runtime_dir is None or "iopub_port" not in info:
            return
        # Where the clients connect (their host-only link), not the kernel's own socket path.
        path = f"{info['ip']}-{info['iopub_port']}"
        key = info.get("key", b"")
        key = key.encode() if isinstance(key, str) else key

        def send() -> int:
            parent = resources.last_request
            relay = resources.relay
            if relay is not None:  # the clients' socket is the relay's, which outlives the kernel
                relay.publish(notice.msg_type, notice.content, dict(parent) if parent else None)
                return 1
            resources.unwatch()  # its own subscription would count as a listener
            return publish(path, key, info.get("signature_scheme", "hmac-sha256"), notice, parent)

        self._telling = True
        try:
            listeners = await asyncio.to_thread(send)
            if listeners:
                await asyncio.sleep(DELIVERY)  # let a client on this loop read it first
            self.log.info(
                "kernel %s: told %d listener(s) why it ended: %s",
                self.kernel_id,
                listeners,
                notice.text,
            )
        except Exception as exc:  # cosmetic: the kernel's end is reported either way
            self.log.warning(
                "kernel %s: could not tell its clients why it ended: %s", self.kernel_id, exc
            )
        finally:
            self._telling = False

    async def wait(self) -> int | None:
        """Wait until the container has ended; return its exit code."""
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return code

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's process group inside the container (SIGINT interrupts a cell).

        Without the engine there is nothing to signal: the loss is logged (poll() reports the
        kernel dead) instead of raised, so that shutdown and its cleanup still run.
        """
        if self.via_service is not None:
            return await self.via_service.send_signal(signum)
        if self._kube is not None:
            return await self._kube.send_signal(signum)
        if self.container_id is None:
            return
        note_signal(self, signum)
        try:
            await self.engine.signal(self.container_id, signum)
        except EngineUnavailable as exc:
            self.log.warning("kernel %s: cannot signal its container: %s", self.kernel_id, exc)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the container and revoke the data token; on the final cleanup release
        everything else too (runtime directory, lifeline, broker socket, egress proxy).

        Idempotent: a container or directory that is already gone is fine.
        """
        if self.via_service is not None:
            return await self.via_service.cleanup(restart)
        if self._kube is not None:
            await self._kube.cleanup(restart)
            if not restart:
                self._launched = False
            return
        if self._resources is not None:
            await self._resources.aclose(restart)
        if not restart:
            self._launched = False
            self._identity = self._user = None
            if self._shared_backend is None or self.engine is not self._shared_backend:
                self.engine.close()  # its connections to the engine; reopened if used again

    # -- idle_timeout and `kernel-sandbox stop` (kernel_sandbox.host.monitor) -----------------

    def _watch(self) -> None:
        """Start the host-side monitor of the running container (once per container)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.resources.watch(
            self.connection_info["iopub_port"],
            self.policy.idle_timeout,
            self._end_from_monitor,
            str(self.connection_info["ip"]),
        )

    def _shut_down_for(self, reason: str) -> None:
        """End the kernel as the monitor would, from the event loop's own thread (the service
        ended it: idle_timeout, a stop). In a Jupyter Server its clients first see it dead
        with the reason (:mod:`.ending`: JupyterLab shows it), then it is shut down."""
        from jupyter_client.multikernelmanager import MultiKernelManager

        from kernel_sandbox.provisioner.ending import end_with_reason

        self._loop = asyncio.get_running_loop()
        manager = self.parent
        multi = getattr(manager, "parent", None)
        if (
            isinstance(multi, MultiKernelManager)
            and self.kernel_id in multi
            and multi.get_kernel(self.kernel_id) is manager
            and hasattr(multi, "cull_idle_timeout")  # jupyter_server's: it serves websockets
        ):
            self.log.warning("kernel %s: %s; shutting it down", self.kernel_id, reason)
            self._end_reason = reason
            text = stopped_notice(reason).text.replace(". Its variables", ".\nIts variables")
            self._ending = self._loop.create_task(
                end_with_reason(multi, self.kernel_id, manager, text, self.log)
            )
            return
        self._end_from_monitor(reason)

    def _end_from_monitor(self, reason: str) -> None:
        """End the kernel for the monitor (called from its thread).

        Through the kernel's manager when an event loop runs it (Jupyter Server, nbclient):
        Jupyter Server then forgets the kernel as its own culler would, instead of restarting
        it. A blocking KernelManager has no loop running between calls: the container is
        stopped and the manager sees the kernel dead.
        """
        from inspect import iscoroutinefunction

        from jupyter_client.manager import KernelManager
        from jupyter_client.multikernelmanager import MultiKernelManager

        self.log.warning("kernel %s: %s; shutting it down", self.kernel_id, reason)
        self._end_reason = reason  # told to its clients once the container has ended (poll)
        loop, manager = self._loop, self.parent
        multi = getattr(manager, "parent", None)
        if loop is not None and loop.is_running():
            if (
                isinstance(multi, MultiKernelManager)
                and iscoroutinefunction(multi.shutdown_kernel)
                and self.kernel_id in multi
                and multi.get_kernel(self.kernel_id) is manager
            ):
                asyncio.run_coroutine_threadsafe(multi.shutdown_kernel(self.kernel_id), loop)
                return
            if isinstance(manager, KernelManager) and iscoroutinefunction(manager.shutdown_kernel):
                asyncio.run_coroutine_threadsafe(manager.shutdown_kernel(), loop)
                return
        if self._kube is not None:  # a pod: deleted (its kube half never raises)
            asyncio.run(self._kube.send_signal(signal.SIGTERM))
            return
        if self.container_id is not None:
            try:
                asyncio.run(self.engine.signal(self.container_id, signal.SIGTERM))
            except EngineUnavailable as exc:
                self.log.warning("kernel %s: cannot stop its container: %s", self.kernel_id, exc)

    # -- persistence across a Jupyter Server restart ----------------------------------------

    def _adopt_identity(self, provisioner_info: dict) -> None:
        """Keep an adopted kernel's uid: take over its claim when it came from uid_range."""
        user = provisioner_info.get("user")
        if not user:
            return
        uid, gid = (int(x) for x in str(user).split(":"))
        self._identity = Identity(uid, gid, "adopted: the uid it was started with")
        self._user = f"{uid}:{gid}"
        if provisioner_info.get("uid_claimed") and os.getuid() == 0 and self.uid_range.strip():
            pool = UidPool(UidRange.parse(self.uid_range), self.uid_claims)
            if not self.resources.adopt_uid(pool, uid):
                self.log.warning(
                    "kernel %s: its uid %d is claimed by another running sandbox; the two "
                    "share per-user limits until one ends",
                    self.kernel_id,
                    uid,
                )

    async def get_provisioner_info(self) -> dict[str, Any]:
        """JSON-safe state (the key as text) from which load_provisioner_info reconnects."""
        info = await super().get_provisioner_info()
        if self.via_service is not None:
            key = self.connection_info.get("key")
            if isinstance(key, bytes):
                info["connection_info"] = {**self.connection_info, "key": key.decode()}
            return {**info, **self.via_service.provisioner_info()}
        if self._kube is not None:
            key = self.connection_info.get("key")
            if isinstance(key, bytes):
                info["connection_info"] = {**self.connection_info, "key": key.decode()}
            return {**info, **self._kube.provisioner_info(), "cwd": self.cwd}
        key = self.connection_info.get("key")
        if isinstance(key, bytes):
            info["connection_info"] = {**self.connection_info, "key": key.decode()}
        info.update(
            {
                "container_id": self.container_id,
                "container_name": self.container_name,
                "runtime_dir": str(self.runtime_dir.path) if self.runtime_dir else None,
                "runtime_handle": (
                    str(self.runtime_dir.handle)
                    if self.runtime_dir and self.runtime_dir.handle
                    else None
                ),
                "cwd": self.cwd,
                "user": self._user,
                "uid_claimed": bool(self._resources and self._resources.uid_claim),
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Adopt a still-running sandbox (e.g. after a Jupyter Server restart): serve its
        lifeline, watch it, restart its egress proxy and serve its data socket again."""
        await super().load_provisioner_info(provisioner_info)
        if provisioner_info.get("service"):
            self._service_setting = str(provisioner_info["service"])
            self._via_service = False
        if self.via_service is not None:
            await self.via_service.adopt(provisioner_info)
            return
        if provisioner_info.get("kube") and self.kube is not None:
            key = self.connection_info.get("key")
            if isinstance(key, str):
                info = {**self.connection_info, "key": key.encode()}
                self.connection_info = cast(KernelConnectionInfo, info)
            self.cwd = provisioner_info.get("cwd")
            self._launched = True
            self.kube.adopt(provisioner_info)
            return
        key = self.connection_info.get("key")
        if isinstance(key, str):
            info = {**self.connection_info, "key": key.encode()}  # bytes, as jupyter_client uses
            self.connection_info = cast(KernelConnectionInfo, info)
        self.cwd = provisioner_info.get("cwd")
        self._launched = True
        resources = self.resources
        present = resources.adopt(
            provisioner_info.get("container_id"),
            provisioner_info.get("container_name"),
            provisioner_info.get("runtime_dir"),
            provisioner_info.get("runtime_handle"),
        )
        if not present:
            return
        self._adopt_identity(provisioner_info)
        # the old owner's relay ended with it
        self._start_relay(self._identity.uid if self._identity else None)
        if resources.relay is not None and resources.runtime_dir is not None:
            port = self.connection_info["iopub_port"]  # its link names the old relay's socket
            resources.relay.expose(str(resources.runtime_dir.client_socket(port)))
        start_shell_audit(self)
        link_shell(self, self._identity.uid if self._identity else None)
        self._watch()
        if self.policy.network == "allowlist":  # the old owner's proxy ended with it
            resources.start_egress(
                self.policy,
                self.egress_log,
                self.egress_port,
                self.log_limits,
                self.egress_upstream_ca,
            )
            await resources.wait_egress_ready()
        if self.policy.datasets and self.kernel_id:  # the token lives on in the database
            await asyncio.to_thread(resources.serve_data, self._broker())

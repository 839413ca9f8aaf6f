"""The ``docker-sandbox`` kernel provisioner: one kernel, one ephemeral hardened container.

``jupyter_client``'s KernelManager calls these coroutines; it never learns that the kernel
runs in a container. The kernel talks ZeroMQ over ``ipc://`` sockets in a private runtime
directory bind-mounted into a container that has no network interface but loopback.
"""

from __future__ import annotations

import asyncio
import atexit
import getpass
import os
import signal
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Bool, Dict, Float, Instance, Integer, List, Unicode, default

from kernel_sandbox.broker.tokens import default_state_dir
from kernel_sandbox.egress.service import EgressEndpoint, default_log_path
from kernel_sandbox.engine.backend import ContainerRequest, DockerBackend, shared_backend
from kernel_sandbox.engine.backend import start_error as container_start_error
from kernel_sandbox.errors import EngineUnavailable, KernelStartError, PolicyError
from kernel_sandbox.host.monitor import KernelMonitor
from kernel_sandbox.host.owner import Lifeline, Owner
from kernel_sandbox.host.reap import sweep
from kernel_sandbox.host.rundir import RuntimeDir, default_root, ipc_connection_info
from kernel_sandbox.inside.contract import (
    IMAGE_KIND_KERNEL,
    LIFELINE,
    RUNTIME_MOUNT,
    SANDBOX_HOME,
    WATCHDOG_MODULE,
    label,
)
from kernel_sandbox.policy import PROFILES, SandboxPolicy, layer_policy, resolve_workspace
from kernel_sandbox.policy.traits import PolicyTraits

__all__ = ["DockerSandboxProvisioner"]

# Host variables a kernel gets without asking: none that could carry a secret.
BASE_ENV_ALLOWLIST = ("JPY_SESSION_NAME",)
# poll()'s exit code for a kernel whose engine cannot be reached.
ENGINE_GONE = -1
# Runtime roots already swept for orphans by this process.
_SWEPT_ROOTS: set[str] = set()
# Constructor kwargs that come from jupyter_client itself, not from a kernelspec's config.
_FRAMEWORK_KWARGS = {"kernel_id", "kernel_spec", "parent", "config", "log"}
# Provisioners with a container not yet cleaned up, and the pid of the process that owns them
# (a forked child that exits must not end its parent's kernels).
_LIVE: dict[DockerSandboxProvisioner, int] = {}


@atexit.register
def _end_live_kernels_at_exit() -> None:
    for provisioner, owner_pid in list(_LIVE.items()):
        if owner_pid != os.getpid():
            continue
        try:
            provisioner._end_at_exit()
        except Exception as exc:  # one failure must not keep the others running
            provisioner.log.warning(
                "kernel %s: not cleaned up at exit: %s", provisioner.kernel_id, exc
            )


class DockerSandboxProvisioner(PolicyTraits, KernelProvisionerBase):  # type: ignore[misc]
    """Launch the kernelspec's argv inside an ephemeral, network-less Docker container.

    Every policy key is a trait here, so it can be set in Jupyter config
    (``c.DockerSandboxProvisioner.memory_limit = "4g"``) or in a kernelspec's
    ``metadata.kernel_provisioner.config``; the kernelspec wins. Unset traits (None) fall
    back to the chosen profile, then to the strict built-in defaults.
    """

    profile = Unicode("strict", config=True, help="Named policy profile to start from.")
    profiles = Dict(
        config=True,
        help="Extra named profiles (name -> policy values), added to the built-in ones.",
    )
    ceilings = Dict(
        config=True,
        help="Operator ceilings no kernelspec may exceed, e.g. {'memory_limit': '8g'}. "
        "Only settable in Jupyter config, never from a kernelspec.",
    )
    runtime_root = Unicode(
        config=True, help="Directory holding the per-kernel runtime directories (keep it short)."
    )
    launch_timeout = Float(
        60.0, config=True, help="Seconds to wait for the kernel to bind its sockets."
    )
    orphan_timeout = Float(
        30.0,
        config=True,
        help="Seconds a kernel keeps running after its owner process vanished (so a restarted "
        "server can re-adopt it) before it ends itself; 0 disables the in-sandbox watchdog.",
    )
    reap_orphans = Bool(
        True,
        config=True,
        help="Remove sandboxes whose owner process is dead when the first kernel of a process "
        "starts (in the background).",
    )
    env_allowlist = List(
        Unicode(),
        default_value=list(BASE_ENV_ALLOWLIST),
        config=True,
        help="Host variables always passed in (the policy's env_passthrough adds more).",
    )

    egress_log = Unicode(
        config=True,
        help="JSON-lines log of every egress decision (default "
        "$XDG_STATE_HOME/kernel-sandbox/egress.jsonl, i.e. ~/.local/state/...).",
    )
    egress_port = Integer(
        3128, config=True, help="Port of the egress bridge on the container's loopback."
    )
    token_db = Unicode(
        config=True,
        help="SQLite file of the data tokens (only their hashes, scope, expiry and revocation; "
        "default ~/.local/share/kernel-sandbox/tokens.sqlite). Host-only: no policy may mount it.",
    )
    audit_log = Unicode(
        config=True,
        help="JSON-lines audit log of every data broker request (default "
        "~/.local/share/kernel-sandbox/audit.jsonl). Host-only: no policy may mount it.",
    )
    data_credentials = Unicode(
        "",
        config=True,
        help="Host-only JSON file (mode 0600) mapping source URL prefixes to fsspec storage "
        "options, i.e. the credentials of remote datasets; the keyring (service "
        "'kernel-sandbox') is consulted too. Kernels only ever get a scoped token.",
    )
    data_broker = Instance(
        "kernel_sandbox.broker.DataBroker",
        allow_none=True,
        help="The data broker serving this kernel's datasets (default: the one this process "
        "shares among all its kernels for the same token_db, audit_log and data_credentials).",
    )

    backend = Instance(DockerBackend)

    @default("backend")
    def _default_backend(self) -> DockerBackend:
        return shared_backend()

    @default("token_db")
    def _default_token_db(self) -> str:
        return str(default_state_dir() / "tokens.sqlite")

    @default("audit_log")
    def _default_audit_log(self) -> str:
        return str(default_state_dir() / "audit.jsonl")

    @default("runtime_root")
    def _default_runtime_root(self) -> str:
        return default_root()

    @default("egress_log")
    def _default_egress_log(self) -> str:
        return default_log_path()

    container_id: str | None = None
    container_name: str | None = None
    runtime_dir: RuntimeDir | None = None
    cwd: str | None = None

    def __init__(self, **kwargs: Any):
        spec_config = {k: kwargs.pop(k) for k in list(kwargs) if k not in _FRAMEWORK_KWARGS}
        super().__init__(**kwargs)
        self._spec_config = spec_config
        self._policy: SandboxPolicy | None = None
        self._sources: dict[str, str] = {}
        self._launched = False  # True once a container has started (later starts are restarts)
        self._lifeline: Lifeline | None = None
        self._image_has_watchdog: bool | None = None
        self._egress: EgressEndpoint | None = None
        self._monitor: KernelMonitor | None = None  # idle_timeout, `kernel-sandbox stop`
        self._loop: asyncio.AbstractEventLoop | None = None

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
                f"{', '.join(map(repr, unknown))}; known keys: profile, {', '.join(sorted(allowed))}"
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

    def _kernel_user(self) -> tuple[str, tuple[int, int]]:
        if self.policy.user:
            uid, gid = (int(x) for x in self.policy.user.split(":"))
        elif os.getuid() == 0:
            uid, gid = 1000, 1000
        else:
            uid, gid = os.getuid(), os.getgid()
        if os.getuid() not in (0, uid):
            raise PolicyError(
                f"user: {uid}:{gid} differs from your uid {os.getuid()}; without root the "
                "kernel must run as your own uid (leave 'user' unset)"
            )
        return f"{uid}:{gid}", (uid, gid)

    # -- launch -----------------------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.container_id is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Validate the policy, prepare the runtime directory and the connection info.

        Called by ``KernelManager.pre_start_kernel`` on every start, restarts included; on a
        restart the runtime directory and connection info are kept so clients stay connected.
        """
        policy = self.policy
        user, owner = self._kernel_user()
        self._check_data_paths(policy)
        extra_arguments = kwargs.pop("extra_arguments", [])
        self.cwd = str(kwargs.pop("cwd", None) or os.getcwd())
        kwargs = await super().pre_launch(**kwargs)
        host_env = kwargs.pop("env")

        self._sweep_orphans_once()
        if self.runtime_dir is None or not self.runtime_dir.exists():
            self.runtime_dir = RuntimeDir.create(self.runtime_root, owner)
            key = uuid.uuid4().hex.encode()
            name = self._spec_name
            self.connection_info = ipc_connection_info(self.runtime_dir.socket_prefix, key, name)
        self._own_runtime_dir()
        if policy.datasets:
            await asyncio.to_thread(self._grant_data, owner)
        self.runtime_dir.clear_sockets(self.connection_info)
        inside_file = self.runtime_dir.write_container_connection_file(
            self.connection_info, RUNTIME_MOUNT, owner
        )
        argv = [arg.replace("{connection_file}", inside_file) for arg in self.kernel_spec.argv]
        kernel_args = self._egress_endpoint().kernel_arguments(argv) if self._egress_on else []
        kwargs["cmd"] = await self._with_watchdog(argv + list(extra_arguments) + kernel_args)
        kwargs["env"] = self._container_env(host_env, policy)
        if self._egress_on:
            kwargs["cmd"], kwargs["env"] = await self._start_egress(kwargs["cmd"], kwargs["env"])
        kwargs["user"] = user
        return kwargs

    def _own_runtime_dir(self) -> None:
        """Record this process as the kernel's owner and serve its lifeline."""
        assert self.runtime_dir is not None
        Owner.current().save(self.runtime_dir.path)
        if self._lifeline is None:
            self._lifeline = Lifeline(self.runtime_dir.shared)
        self._lifeline.listen()
        self._lifeline.drop_peers()  # a previous container's watchdog, if this is a restart
        self._lifeline.accept_pending()

    # -- datasets (kernel_sandbox.broker) -----------------------------------------------------

    def _broker(self) -> Any:
        if self.data_broker is None:
            from kernel_sandbox.broker import shared_broker

            self.data_broker = shared_broker(self.token_db, self.audit_log, self.data_credentials)
        return self.data_broker

    def _check_data_paths(self, policy: SandboxPolicy) -> None:
        """No mount or dataset may expose the broker's own state or the host's credentials."""
        protected = [os.path.dirname(os.path.abspath(p)) for p in (self.token_db, self.audit_log)]
        if self.data_credentials:
            protected.append(os.path.abspath(self.data_credentials))
        exposed = [m.source for m in policy.mounts]
        exposed += [d.source for d in policy.datasets if "://" not in d.source]
        for source in exposed:
            real = os.path.realpath(source)
            for path in protected:
                if path == real or path.startswith(real.rstrip("/") + "/"):
                    raise PolicyError(
                        f"kernelspec {self._spec_name}: {source} would expose {path}, the data "
                        "broker's tokens, audit log or credentials; mount or serve another directory"
                    )

    def _grant_data(self, owner: tuple[int, int]) -> None:
        """Mint this start's token (revoking the last one) and serve the kernel's socket."""
        from kernel_sandbox.broker.tokens import Grant

        assert self.runtime_dir is not None and self.kernel_id
        scope = {d.name: Grant(d.source, d.access) for d in self.policy.datasets}
        record = self._broker().grant(
            self.kernel_id, self.runtime_dir.shared, scope, self.policy.token_ttl, owner
        )
        self.log.debug(
            "kernel %s: data token %s for %s", self.kernel_id, record.token_id, ", ".join(scope)
        )

    def _release_data(self, restart: bool) -> None:
        """Revoke the kernel's token; on the final cleanup also close its broker socket."""
        if self.data_broker is None or not self.kernel_id:
            return
        try:
            if restart:
                self.data_broker.revoke(self.kernel_id, "kernel restarted")
            else:
                self.data_broker.release(self.kernel_id, "kernel shut down")
        except Exception as exc:  # cleanup must go on; an unrevoked token still expires
            self.log.warning("kernel %s: could not revoke its data token: %s", self.kernel_id, exc)

    # -- egress (kernel_sandbox.egress) ---------------------------------------------------------

    @property
    def _egress_on(self) -> bool:
        return self.policy.network == "allowlist"

    def _egress_endpoint(self) -> EgressEndpoint:
        assert self.runtime_dir is not None
        if self._egress is None:
            self._egress = EgressEndpoint(
                self.runtime_dir.path,
                self.runtime_dir.shared,
                self.kernel_id or "",
                self.policy,
                self.egress_log,
                RUNTIME_MOUNT,
                self.egress_port,
            )
        return self._egress

    async def _start_egress(
        self, cmd: list[str], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """Start the kernel's host-side proxy; the container runs the bridge before the kernel.

        Raises:
            PolicyError: the image lacks the in-sandbox bridge.
        """
        labels = await self.backend.image_labels(self.policy.image) or {}
        if labels.get(label("image")) != IMAGE_KIND_KERNEL:
            raise PolicyError(
                f"kernelspec {self._spec_name}: network 'allowlist' needs an image built by "
                f"`kernel-sandbox image build` (it carries the egress bridge); "
                f"{self.policy.image} is not one"
            )
        endpoint = self._egress_endpoint()
        endpoint.start()  # listening by the time the container is up (launch_kernel waits)
        return endpoint.container_command(cmd), {**env, **endpoint.container_env()}

    async def _stop_egress(self) -> None:
        if self._egress is not None:
            await self._egress.stop()
            self._egress = None

    async def _with_watchdog(self, argv: list[str]) -> list[str]:
        """Run the kernel under the in-sandbox watchdog when the image has it (our images do)."""
        if self.orphan_timeout <= 0:
            return argv
        if self._image_has_watchdog is None:
            labels = await self.backend.image_labels(self.policy.image) or {}
            self._image_has_watchdog = labels.get(label("image")) == IMAGE_KIND_KERNEL
        if not self._image_has_watchdog:
            return argv
        lifeline = f"{RUNTIME_MOUNT}/{LIFELINE}"
        return [
            "python",
            "-m",
            WATCHDOG_MODULE,
            lifeline,
            str(self.orphan_timeout),
            "--",
            *argv,
        ]

    def _sweep_orphans_once(self) -> None:
        """Reap what killed owners left behind, once per process, without delaying the start."""
        if self.runtime_root in _SWEPT_ROOTS or not self.reap_orphans:
            return
        _SWEPT_ROOTS.add(self.runtime_root)
        root, log = self.runtime_root, self.log

        def run() -> None:
            try:
                report = asyncio.run(sweep(shared_backend(), root))
            except Exception as exc:  # a failed sweep must never break a kernel start
                log.warning("kernel-sandbox: orphan sweep failed: %s", exc)
                return
            if report:
                log.info(
                    "kernel-sandbox: reaped %d orphaned container(s), %d runtime dir(s)",
                    len(report.containers),
                    len(report.runtime_dirs),
                )

        threading.Thread(target=run, name="kernel-sandbox-sweep", daemon=True).start()

    def _container_env(self, host_env: dict[str, str], policy: SandboxPolicy) -> dict[str, str]:
        """Deny by default: only the kernelspec's env, the policy's env and allowlisted names."""
        env = {
            k: host_env[k] for k in (*self.env_allowlist, *policy.env_passthrough) if k in host_env
        }
        env.update({k: host_env.get(k, v) for k, v in (self.kernel_spec.env or {}).items()})
        env.update(policy.env)
        env.update(
            {
                "HOME": SANDBOX_HOME,
                "LANG": env.get("LANG", "C.UTF-8"),
                "TINI_KILL_PROCESS_GROUP": "1",
                "KERNEL_SANDBOX": "1",
            }
        )
        return env

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the container and wait until the kernel has bound its sockets.

        Raises:
            KernelStartError: the container ended (its last log lines are in the message) or
                did not bind its sockets within ``launch_timeout``.
            ImageMissing, RuntimeUnavailable, EngineUnavailable: from the backend.
        """
        assert self.runtime_dir is not None
        policy = self.policy
        workspace = resolve_workspace(self.cwd) if policy.workspace != "none" else None
        if policy.workspace != "none" and workspace is None:
            self.log.warning(
                "kernel %s: not mounting %s as the workspace (a host path no sandbox may see); "
                "the kernel starts in %s",
                self.kernel_id,
                self.cwd,
                SANDBOX_HOME,
            )
        name = f"ks-{(self.kernel_id or uuid.uuid4().hex)[:8]}-{uuid.uuid4().hex[:6]}"
        request = ContainerRequest(
            name=name,
            policy=policy,
            command=cmd,
            env=kwargs.get("env", {}),
            labels=self._labels(),
            runtime_dir=str(self.runtime_dir.shared),
            user=kwargs["user"],
            workspace=workspace,
        )
        started = time.monotonic()
        try:
            self.container_id = await self.backend.start(request)
            self.container_name = name
            if self._egress is not None:
                await self._egress.wait_ready()
            await self._wait_until_listening()
        except BaseException:
            await self._discard_failed_launch()
            raise
        self._launched = True
        _LIVE[self] = os.getpid()
        self._watch()
        self.log.debug(
            "kernel %s: container %s ready in %.2fs",
            self.kernel_id,
            name,
            time.monotonic() - started,
        )
        return self.connection_info

    async def _discard_failed_launch(self) -> None:
        """Leave nothing behind after a failed start (the directory too, unless restarting)."""
        if self.container_id is not None:
            await self.backend.remove(self.container_id)
            self.container_id = None
        if not self._launched and self.runtime_dir is not None:
            await self._stop_egress()
            await asyncio.to_thread(self._release_data, False)
            if self._lifeline is not None:
                self._lifeline.close()
                self._lifeline = None
            self.runtime_dir.remove()
            self.runtime_dir = None

    async def _wait_until_listening(self) -> None:
        assert self.runtime_dir is not None and self.container_id is not None
        deadline = time.monotonic() + self.launch_timeout
        next_state_check = time.monotonic() + 0.2
        while not self.runtime_dir.sockets_ready(self.connection_info):
            now = time.monotonic()
            if now >= next_state_check:
                state = await self.backend.state(self.container_id)
                if not state.running:
                    logs = await self.backend.logs_tail(self.container_id)
                    raise container_start_error(
                        self.container_name or "", self.policy.image, state, logs
                    )
                next_state_check = now + 0.25
            if now >= deadline:
                logs = await self.backend.logs_tail(self.container_id)
                raise KernelStartError(
                    f"kernel container {self.container_name} (image {self.policy.image}) did not "
                    f"open its sockets within {self.launch_timeout:.0f}s; raise "
                    "c.DockerSandboxProvisioner.launch_timeout or check the image. Last log "
                    f"lines:\n{logs or '(none)'}"
                )
            await asyncio.sleep(0.005)

    def _labels(self) -> dict[str, str]:
        assert self.runtime_dir is not None
        values = {
            "managed": "true",
            "kernel-id": self.kernel_id or "",
            "kernelspec": self._spec_name,
            "profile": self._spec_config.get("profile") or self.profile,
            "owner": getpass.getuser(),
            "owner-uid": str(os.getuid()),
            "owner-pid": str(os.getpid()),
            "owner-start": Owner.current().start or "",
            "owner-host": socket.gethostname(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runtime-dir": str(self.runtime_dir.path),
        }
        return {label(k): v for k, v in values.items()}

    # -- life of a running kernel -----------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the container runs, else its exit code (137 for OOM-kill or SIGKILL)."""
        if self.container_id is None:
            return 0
        try:
            state = await self.backend.state(self.container_id)
        except EngineUnavailable as exc:
            # Without the engine there is no container to talk to (an engine that stops
            # takes its containers down): report the kernel dead rather than raise.
            self.log.warning("kernel %s: %s", self.kernel_id, exc)
            return ENGINE_GONE
        if state.running:
            return None
        if state.oom_killed:
            self.log.warning(
                "kernel %s: container %s was killed: out of memory (limit %d bytes)",
                self.kernel_id,
                self.container_name,
                self.policy.memory_limit,
            )
        return state.exit_code

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
        if self.container_id is None:
            return
        try:
            await self.backend.signal(self.container_id, signum)
        except EngineUnavailable as exc:
            self.log.warning("kernel %s: cannot signal its container: %s", self.kernel_id, exc)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the container; on the final cleanup also the runtime directory.

        Idempotent: a container or directory that is already gone is fine.
        """
        self._unwatch()
        if self.container_id is not None:
            try:
                await self.backend.remove(self.container_id)
            except EngineUnavailable as exc:
                # `kernel-sandbox gc` removes it once the engine is back: its runtime
                # directory is gone, which marks it as dead weight.
                self.log.warning(
                    "kernel %s: container %s left for gc: %s",
                    self.kernel_id,
                    self.container_name,
                    exc,
                )
            self.container_id = None
        # synchronous (a revocation in SQLite and a socket close): cleanup also runs at
        # interpreter exit, when no new thread may be started
        self._release_data(restart)
        if not restart:
            await self._stop_egress()
            self._release_host_side()

    def _release_host_side(self) -> None:
        """The final, synchronous part of a cleanup: lifeline, runtime directory, client."""
        _LIVE.pop(self, None)
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        if self.runtime_dir is not None:
            self.runtime_dir.remove()
            self.runtime_dir = None
        if self.backend is not shared_backend():
            self.backend.close()  # its connections to the engine; reopened if used again

    def _end_at_exit(self) -> None:
        """This process exits without having shut the kernel down: end it, leave nothing.

        ``jupyter console`` only sends the kernel a shutdown request, and a script may forget
        its kernels; a local kernel ends with its parent, and so does a sandbox. (A killed
        owner cannot run this: its kernels wait for re-adoption, then the watchdog ends them.)
        Blocking calls only: no worker thread may start at interpreter exit.
        """
        self._unwatch()
        if self.container_id is not None:
            try:
                self.backend.remove_blocking(self.container_id)
            except Exception as exc:  # the engine is gone: `kernel-sandbox gc` removes it later
                self.log.warning(
                    "kernel %s: container %s left for gc: %s",
                    self.kernel_id,
                    self.container_name,
                    exc,
                )
            self.container_id = None
        self._release_data(restart=False)
        self._release_host_side()  # the egress proxy ends by itself when this process does

    # -- idle_timeout and `kernel-sandbox stop` (kernel_sandbox.host.monitor) ---------------------

    def _watch(self) -> None:
        """Start the host-side monitor of the running container (once per container)."""
        assert self.runtime_dir is not None
        self._unwatch()
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        iopub = f"ipc://{self.runtime_dir.socket_prefix}-{self.connection_info['iopub_port']}"
        self._monitor = KernelMonitor(
            self.runtime_dir.path, iopub, self.policy.idle_timeout, self._end_from_monitor
        )
        self._monitor.start()

    def _unwatch(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

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
        if self.container_id is not None:
            try:
                asyncio.run(self.backend.signal(self.container_id, signal.SIGTERM))
            except EngineUnavailable as exc:
                self.log.warning("kernel %s: cannot stop its container: %s", self.kernel_id, exc)

    # -- persistence across a Jupyter Server restart ----------------------------------------

    async def get_provisioner_info(self) -> dict[str, Any]:
        """JSON-safe state (the key as text) from which load_provisioner_info reconnects."""
        info = await super().get_provisioner_info()
        key = self.connection_info.get("key")
        if isinstance(key, bytes):
            info["connection_info"] = {**self.connection_info, "key": key.decode()}
        info.update(
            {
                "container_id": self.container_id,
                "container_name": self.container_name,
                "runtime_dir": str(self.runtime_dir.path) if self.runtime_dir else None,
                "cwd": self.cwd,
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Adopt a still-running sandbox (e.g. after a Jupyter Server restart)."""
        await super().load_provisioner_info(provisioner_info)
        key = self.connection_info.get("key")
        if isinstance(key, str):
            self.connection_info = {**self.connection_info, "key": key.encode()}
        self.container_id = provisioner_info.get("container_id")
        self.container_name = provisioner_info.get("container_name")
        runtime_dir = provisioner_info.get("runtime_dir")
        self.runtime_dir = RuntimeDir(runtime_dir) if runtime_dir else None
        self.cwd = provisioner_info.get("cwd")
        self._launched = True
        if self.container_id is not None:
            _LIVE[self] = os.getpid()
        if self.runtime_dir is not None and self.runtime_dir.exists():
            self._own_runtime_dir()  # this process is the owner now; the watchdog reconnects
            self._watch()
            if self._egress_on:  # the old owner's proxy ended with it
                endpoint = self._egress_endpoint()
                endpoint.start()
                await endpoint.wait_ready()
            if self.policy.datasets and self.kernel_id:  # the token lives on in the database
                shared = self.runtime_dir.shared
                await asyncio.to_thread(self._broker().serve, self.kernel_id, shared)

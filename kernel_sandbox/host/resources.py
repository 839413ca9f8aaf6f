"""One kernel's host-side resources, and the one way to let them go.

A sandboxed kernel holds, on the host: its runtime directory (sockets, connection file, owner
record), the lifeline its in-sandbox watchdog stays connected to, its container, a data token
and the broker's socket (with datasets), an egress proxy (with network 'allowlist') and a
monitor thread (idle_timeout, ``kernel-sandbox stop``), the relays of its IOPub, shell and
control channels, and the claim on its own uid (when it has one from ``uid_range``).
:class:`KernelResources` owns them all, and :meth:`KernelResources.close` releases them on
every path::

    close(restart=True)    a restart, or a failed restart: the container is removed and the
                           data token revoked; the runtime directory (clients stay connected),
                           the lifeline, the broker's socket, the proxy, the IOPub relay,
                           the shell and control relays (the audit's) and the uid are kept
    close()                the final cleanup, a failed first start, interpreter exit:
                           nothing is left

``close`` is synchronous (blocking calls only: it also runs at interpreter exit, when no worker
thread may start) and idempotent (twice, or after the container or directory vanished, is
fine); coroutines call :meth:`KernelResources.aclose`.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kernel_sandbox.egress.service import EgressEndpoint
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import EngineUnavailable
from kernel_sandbox.host.exits import PROCESS_EXITS, ExitRegistry
from kernel_sandbox.host.logtext import LogLimits, clip
from kernel_sandbox.host.monitor import KernelMonitor
from kernel_sandbox.host.owner import Lifeline, Owner
from kernel_sandbox.host.relay import IopubRelay, RelayLimits
from kernel_sandbox.host.rundir import CLAIMED_BY, DEFAULT_SIZE, RuntimeDir
from kernel_sandbox.host.shell_relay import ShellRelay
from kernel_sandbox.host.uids import UidClaim, UidPool
from kernel_sandbox.inside.contract import DATA_SOCKET, DATA_TOKEN, HOST_SOCKETS_MOUNT

if TYPE_CHECKING:
    from kernel_sandbox.audit.executions import ExecutionAudit
    from kernel_sandbox.broker.server import DataBroker
    from kernel_sandbox.broker.tokens import TokenRecord
    from kernel_sandbox.host.pool import PooledSandbox
    from kernel_sandbox.policy.model import Dataset, SandboxPolicy

__all__ = ["KernelResources"]


class KernelResources:
    """What one kernel holds on the host; see the module docstring.

    Args:
        kernel_id: the kernel's id (names its token, proxy and log lines).
        backend: the engine its container runs on.
        log: where warnings go (the provisioner's logger).
        exits: the registry that closes it at interpreter exit (default: this process's).
    """

    def __init__(
        self,
        kernel_id: str,
        backend: DockerBackend,
        log: Any,
        exits: ExitRegistry | None = None,
    ):
        self.kernel_id = kernel_id
        self.backend = backend
        self.log = log
        self.exits = exits if exits is not None else PROCESS_EXITS
        self.runtime_dir: RuntimeDir | None = None
        self.container_id: str | None = None
        self.container_name: str | None = None
        self.egress: EgressEndpoint | None = None  # kept across restarts
        self._lifeline: Lifeline | None = None
        self._broker: DataBroker | None = None
        self._monitor: KernelMonitor | None = None
        self.relay: IopubRelay | None = None  # kept across restarts
        self.shell_relays: dict[str, ShellRelay] = {}  # kept across restarts (but a pool's)
        self.relay_routing_id = b"ks-" + secrets.token_hex(8).encode()  # shell's = stdin's
        self.executions: ExecutionAudit | None = None  # kept across restarts
        self.uid_claim: UidClaim | None = None  # kept across restarts

    # -- the kernel's own uid (kernel_sandbox.host.uids) -------------------------------------

    def claim_uid(self, pool: UidPool) -> int:
        """Claim a uid of the kernel's own, unless it holds one (a restart keeps it).

        Blocking (files): run it in a worker thread.

        Raises:
            UidsExhausted: every uid of the range is held by a running sandbox.
            PolicyError, OSError: the claims directory is unsafe or cannot be written.
        """
        if self.uid_claim is None:
            self.uid_claim = pool.claim(self.kernel_id)
            self.exits.add(self)
        return self.uid_claim.uid

    def adopt_uid(self, pool: UidPool, uid: int) -> bool:
        """Take over an adopted kernel's claim on ``uid``; False when another kernel's owner
        holds it."""
        self.uid_claim = pool.adopt(uid, self.kernel_id)
        return self.uid_claim is not None

    def _release_uid(self) -> None:
        claim, self.uid_claim = self.uid_claim, None
        if claim is None:
            return
        try:
            claim.release()
        except Exception as exc:  # closing must go on; a claim of a dead owner is reclaimed
            self.log.warning(
                "kernel %s: could not release its uid %d: %s", self.kernel_id, claim.uid, clip(exc)
            )

    # -- runtime directory and lifeline -----------------------------------------------------

    def open_runtime_dir(
        self,
        root: str,
        owner: tuple[int, int],
        size: int | None = DEFAULT_SIZE,
        client_reachable: bool = False,
    ) -> bool:
        """Make the runtime directory unless the last start's is still there (its kernel part
        a tmpfs of ``size`` bytes where this process can mount one); serve the lifeline as
        this process.

        Returns:
            True when the directory is new (the kernel then needs new connection info).

        Raises:
            PolicyError: the root is unsafe or too long for unix socket paths.
        """
        created = self.runtime_dir is None or not self.runtime_dir.exists()
        if created:
            if self._lifeline is not None:  # served in a directory that vanished
                self._lifeline.close()
                self._lifeline = None
            self.runtime_dir = RuntimeDir.create(root, owner, size, client_reachable)
        self.exits.add(self)
        self._own()
        return created

    def take_pooled(self, sandbox: PooledSandbox) -> bool:
        """Make a claimed pooled sandbox this kernel's: its runtime directory (behind the
        kernel's handle), lifeline, container and uid. On a restart the previous sandbox's
        directory, lifeline, uid and IOPub relay go (its container went at the restart's
        cleanup); the handle moves, so clients keep their paths.

        Returns:
            True when the kernel needs new connection info (its first start).
        """
        old, new = self.runtime_dir, sandbox.runtime_dir
        first = old is None or old.handle is None or not old.exists()
        if first:
            new.make_handle()
        else:
            assert old is not None and old.handle is not None
            new.take_handle(old.handle)
            if self.relay is not None:  # bound in the old directory; started again there
                self.relay.close()
                self.relay = None
            self._close_shell_relays()  # likewise
            if self._lifeline is not None:
                self._lifeline.close()
            removal = old.remove()
            if not removal.complete:
                self.log.warning(
                    "kernel %s: previous runtime directory not removed completely: %s",
                    self.kernel_id,
                    clip(removal),
                )
            self._release_uid()
        self.runtime_dir = new
        self._lifeline = sandbox.lifeline
        self.container_id, self.container_name = sandbox.container_id, sandbox.container_name
        self.uid_claim = sandbox.uid_claim
        (new.path / CLAIMED_BY).write_text(self.kernel_id)  # for `kernel-sandbox ps`
        self.exits.add(self)
        return first

    def adopt(
        self,
        container_id: str | None,
        container_name: str | None,
        runtime_dir: str | None,
        handle: str | None = None,
    ) -> bool:
        """Take over a sandbox a previous owner left running (a restarted Jupyter Server).

        Returns:
            True when its runtime directory is still there (and now served by this process).
        """
        self.container_id, self.container_name = container_id, container_name
        self.runtime_dir = RuntimeDir(runtime_dir, handle=handle) if runtime_dir else None
        present = self.runtime_dir is not None and self.runtime_dir.exists()
        if container_id is not None or present:
            self.exits.add(self)
        if present:
            self._own()  # the watchdog reconnects to the new owner's lifeline
        return present

    def _own(self) -> None:
        """Record this process as the kernel's owner and serve its lifeline."""
        assert self.runtime_dir is not None
        Owner.current().save(self.runtime_dir.path)
        if self._lifeline is None:
            self._lifeline = Lifeline(self.runtime_dir.host_dir)
        self._lifeline.listen()
        self._lifeline.drop_peers()  # a previous container's watchdog, if this is a restart
        self._lifeline.accept_pending()

    # -- datasets (kernel_sandbox.broker) ---------------------------------------------------

    def grant_data(
        self,
        broker: DataBroker,
        datasets: Sequence[Dataset],
        ttl: float,
        owner: tuple[int, int],
    ) -> TokenRecord:
        """Mint this start's token (revoking the last one) and serve the kernel's socket.

        Blocking (SQLite and the broker's loop): run it in a worker thread.
        """
        from kernel_sandbox.broker.tokens import Grant

        assert self.runtime_dir is not None
        self._broker = broker  # released on close even if the grant fails half-way
        scope = {d.name: Grant(d.source, d.access) for d in datasets}
        record = broker.grant(self.kernel_id, self.runtime_dir.host_dir, scope, ttl, owner)
        self.runtime_dir.link_to_host([DATA_SOCKET, DATA_TOKEN])  # for images before h/
        return record

    def serve_data(self, broker: DataBroker) -> None:
        """Serve an adopted kernel's socket again (its token lives on in the database)."""
        assert self.runtime_dir is not None
        self._broker = broker
        broker.serve(self.kernel_id, self.runtime_dir.host_dir)

    def _release_data(self, restart: bool) -> None:
        """Revoke the kernel's token; on the final close also stop serving its socket."""
        broker = self._broker
        if broker is None:
            return
        try:
            if restart:
                broker.revoke(self.kernel_id, "kernel restarted")
            else:
                broker.release(self.kernel_id, "kernel shut down")
                self._broker = None
        except Exception as exc:  # closing must go on; an unrevoked token still expires
            self.log.warning(
                "kernel %s: could not revoke its data token: %s", self.kernel_id, clip(exc)
            )

    # -- egress (kernel_sandbox.egress) -----------------------------------------------------

    def start_egress(
        self,
        policy: SandboxPolicy,
        log_path: str,
        port: int,
        limits: LogLimits | None = None,
        upstream_ca: str = "",
    ) -> EgressEndpoint:
        """Start the kernel's proxy unless it runs (it outlives restarts); it listens a moment
        later (:meth:`wait_egress_ready`)."""
        assert self.runtime_dir is not None
        if self.egress is None:
            self.egress = EgressEndpoint(
                self.runtime_dir.path,
                self.runtime_dir.host_dir,
                self.kernel_id,
                policy,
                log_path,
                HOST_SOCKETS_MOUNT,
                port,
                limits,
                upstream_ca,
            )
        self.egress.start()
        return self.egress

    async def wait_egress_ready(self) -> None:
        """Wait until the proxy listens, if there is one.

        Raises:
            KernelStartError: the proxy ended or did not listen in time.
        """
        if self.egress is not None:
            await self.egress.wait_ready()

    # -- IOPub (kernel_sandbox.host.relay) --------------------------------------------------

    def start_relay(
        self,
        kernel_path: str,
        bind_path: str,
        key: bytes,
        scheme: str,
        limits: RelayLimits,
        kernel_uid: int | None = None,
    ) -> IopubRelay:
        """Relay IOPub from the kernel's socket to a socket of its own at ``bind_path``,
        unless it runs (it outlives restarts: it reconnects to each new container's socket).
        Clients reach it through a link (:meth:`IopubRelay.expose`).

        Raises:
            zmq.ZMQError: the relay's socket cannot be bound.
        """
        if self.relay is None:
            relay = IopubRelay(
                kernel_path, bind_path, key, scheme, limits, self.log, self.kernel_id, kernel_uid
            )
            relay.start()
            self.relay = relay
        return self.relay

    async def wait_relay(self, timeout: float) -> None:
        """Wait until the relay reads the kernel's socket (so no early output is missed)."""
        if self.relay is not None and not await self.relay.wait_attached(timeout):
            self.log.warning(
                "kernel %s: the IOPub relay did not reach the kernel's socket within %.0fs",
                self.kernel_id,
                timeout,
            )

    # -- shell and the audit (kernel_sandbox.host.shell_relay, kernel_sandbox.audit) --------

    def start_shell_relay(
        self, channel: str, kernel_link: str, bind_path: str, executions: ExecutionAudit
    ) -> ShellRelay:
        """Relay a request channel (shell, control) through the host (clients reach it through
        a link, :meth:`ShellRelay.expose`), each execute request recorded by ``executions``;
        unless it runs (it outlives restarts: it reconnects to ``kernel_link``, made again on
        each start).

        Raises:
            zmq.ZMQError: the relay's socket cannot be bound.
        """
        self.executions = executions
        relay = self.shell_relays.get(channel)
        if relay is None:
            observe = functools.partial(_observe_on, executions, channel.removesuffix("_port"))
            relay = ShellRelay(
                kernel_link, bind_path, observe, self.kernel_id, self.log, self.relay_routing_id
            )
            relay.start()
            self.shell_relays[channel] = relay
        return relay

    def _close_shell_relays(self) -> None:
        relays, self.shell_relays = self.shell_relays, {}
        for relay in relays.values():
            relay.close()

    # -- idle_timeout and `kernel-sandbox stop` (kernel_sandbox.host.monitor) ----------------

    def watch(
        self,
        iopub_port: int,
        idle_timeout: float,
        on_end: Callable[[str], None],
        prefix: str | None = None,
    ) -> None:
        """Start the monitor of the running container (once per container); it connects where
        clients do (``prefix``, the connection info's ``ip``; default the client links)."""
        assert self.runtime_dir is not None
        self.unwatch()
        iopub = f"ipc://{prefix or self.runtime_dir.client_prefix}-{iopub_port}"
        self._monitor = KernelMonitor(self.runtime_dir.path, iopub, idle_timeout, on_end)
        self._monitor.start()

    @property
    def last_request(self) -> dict[str, Any] | None:
        """The header of the last execute_request the kernel began (None before the first)."""
        return self._monitor.request if self._monitor is not None else None

    def unwatch(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    # -- the one close ----------------------------------------------------------------------

    def close(self, restart: bool = False) -> None:
        """Release what the kernel holds (see the module docstring); blocking and idempotent.

        Every step runs even when one fails; an engine that cannot be reached leaves the
        container to ``kernel-sandbox gc``.

        Raises:
            SandboxError: the engine refused to remove the container (raised last; on the
                final close the container stays registered, so exit tries again).
        """
        self.unwatch()
        failure: Exception | None = None
        if self.container_id is not None:
            try:
                self.backend.remove_blocking(self.container_id)
                self.container_id = None
            except EngineUnavailable as exc:
                # `kernel-sandbox gc` removes it once the engine is back (its runtime
                # directory, or its owner, is gone by then)
                self.log.warning(
                    "kernel %s: container %s left for gc: %s",
                    self.kernel_id,
                    self.container_name,
                    exc,
                )
                self.container_id = None
            except Exception as exc:
                failure = exc
        self._release_data(restart)
        if not restart:
            self._close_shell_relays()  # first: what they captured is recorded
        if self.executions is not None:
            self.executions.end("kernel restarted" if restart else "kernel shut down")
        if not restart:
            if self.relay is not None:
                self.relay.close()
                self.relay = None
            if self.egress is not None:
                self.egress.close()
                self.egress = None
            if self._lifeline is not None:
                self._lifeline.close()
                self._lifeline = None
            if self.runtime_dir is not None:
                removal = self.runtime_dir.remove()  # never raises, whatever the kernel made
                if not removal.complete:
                    self.log.warning(
                        "kernel %s: runtime directory not removed completely (kernel-sandbox "
                        "gc tries again): %s",
                        self.kernel_id,
                        clip(removal),
                    )
                self.runtime_dir = None
            if self.container_id is None:  # no container runs as the uid any more
                self._release_uid()
                self.exits.discard(self)
        if failure is not None:
            raise failure

    async def aclose(self, restart: bool = False) -> None:
        """:meth:`close` in a worker thread, or in this one when no thread may start (the
        interpreter exits: nbclient and ``jupyter run`` shut kernels down from atexit hooks)."""
        loop = asyncio.get_running_loop()
        try:
            done = loop.run_in_executor(None, functools.partial(self.close, restart))
        except RuntimeError:  # cannot schedule new futures after interpreter shutdown
            self.close(restart)
            return
        await done


def _observe_on(executions: ExecutionAudit, channel: str, direction: bytes, frames: Any) -> None:
    executions.observe(direction, frames, channel)

"""A warm pool: sandboxes started ahead of time, each claimed by exactly one kernel start.

A sandboxed kernel's start is mostly the engine's create+start and Python importing the
kernel. A pooled sandbox has done both before anyone asks: it runs
:mod:`kernel_sandbox.inside.pool_waiter` (the kernel's modules imported, waiting on a claim
socket in its host-served ``h/``). A start whose :class:`PoolRecipe` matches takes one
(:meth:`WarmPool.claim`), writes the connection file, sends the argv and environment, and the
waiter becomes the kernel. Nothing secret exists before the claim: the HMAC key, the data
token and the session's environment are made for the start that claims.

- **Used once.** A claimed sandbox leaves the pool for good; a restart claims another.
- **Keyed by the recipe**: everything that shapes the container (the effective policy, image,
  uid, workspace and where it appears, runtime directory settings, base environment, the
  kernel's module). A start with another recipe starts cold, and its recipe gets a pool; a
  start of the same kernelspec in the same folder with a changed recipe drains the old one.
  An image rebuilt under the same tag drains the recipe's pool (checked every few seconds).
- **Refilled in the background**, one sandbox at a time, by one thread per process; a recipe
  nobody claimed for ``max_idle`` seconds stops being refilled and its sandboxes go.
- **Never leaks**: pooled sandboxes are ordinary managed containers (labels, owner record,
  watchdog on the owner's lifeline), so a killed owner's go like its kernels (watchdog, gc);
  an engine restart ends them (found dead, dropped), interpreter exit removes them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import secrets
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from kernel_sandbox.engine.backend import ContainerRequest, DockerBackend
from kernel_sandbox.host.exits import PROCESS_EXITS, ExitRegistry
from kernel_sandbox.host.logtext import clip
from kernel_sandbox.host.owner import Lifeline, Owner
from kernel_sandbox.host.rundir import RuntimeDir
from kernel_sandbox.host.uids import UidClaim, UidPool
from kernel_sandbox.inside.contract import (
    CLAIM_SOCKET,
    HOST_SOCKETS_MOUNT,
    POOL_WAITER_MODULE,
    label,
)
from kernel_sandbox.policy.keys import POOL_KEYS
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = ["POOLED_LABEL", "PoolRecipe", "PooledSandbox", "WarmPool", "process_pool"]

POOLED_LABEL = label("pooled")
READY = b"ready\n"
IMAGE_CHECK_EVERY = 5.0  # seconds between checks that a pool's image tag still names its image
FAILURE_BACKOFF = 30.0  # seconds a recipe whose sandbox failed to start waits to try again
TICK = 0.5  # the maintainer's period when nothing wakes it
CLOSE_WAIT = 90.0  # seconds close() waits for a sandbox being started (then removed)

log = logging.getLogger("kernel_sandbox.pool")


@dataclass(frozen=True)
class PoolRecipe:
    """What a pooled sandbox is made from; :attr:`key` names its pool.

    ``user`` is "uid:gid", or None for a uid of its own per sandbox from ``uid_pool``.
    """

    policy: SandboxPolicy
    user: str | None
    uid_pool: UidPool | None
    workspace: str | None
    workspace_path: str | None
    runtime_root: str
    runtime_dir_size: int | None
    client_reachable: bool
    orphan_timeout: float
    env: dict[str, str]
    python: str
    module: str
    kernelspec: str
    profile: str
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 1
    max_idle: float = 3600.0
    launch_timeout: float = 60.0

    def replaced_by(self, newer: PoolRecipe) -> bool:
        """Whether ``newer`` is this kernelspec's recipe for the same folder, changed (its
        config or kernelspec was edited): this one's sandboxes will never be claimed."""
        return (
            newer.kernelspec == self.kernelspec
            and (newer.workspace, newer.runtime_root) == (self.workspace, self.runtime_root)
            and newer.key != self.key
        )

    @functools.cached_property
    def key(self) -> str:
        shape = {
            "policy": {k: v for k, v in self.policy.to_dict().items() if k not in POOL_KEYS},
            "user": self.user,
            "uids": repr(self.uid_pool.range) if self.uid_pool else None,
            "workspace": [self.workspace, self.workspace_path],
            "runtime": [self.runtime_root, self.runtime_dir_size, self.client_reachable],
            "orphan_timeout": self.orphan_timeout,
            "env": self.env,
            "kernel": [self.python, self.module],
            "labels": self.labels,
            "kernelspec": [self.kernelspec, self.profile],  # its labels name them (ps)
        }
        text = json.dumps(shape, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PooledSandbox:
    """One started sandbox waiting for its claim; see the module docstring."""

    recipe_key: str
    image_id: str | None
    runtime_dir: RuntimeDir
    lifeline: Lifeline
    container_id: str
    container_name: str
    user: str
    uid_claim: UidClaim | None
    listener: socket.socket
    conn: socket.socket | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def uid(self) -> int:
        return int(self.user.split(":")[0])

    def waiting(self) -> bool:
        """Whether the waiter is still connected (a dead container closes its end)."""
        if self.conn is None:
            return False
        try:
            readable, _, _ = select.select([self.conn], [], [], 0)
            return not readable  # the waiter never writes after READY: readable means EOF
        except (OSError, ValueError):
            return False

    def send_claim(self, argv: list[str], env: dict[str, str]) -> None:
        """Tell the waiter to become the kernel (the connection file is written already).

        Raises:
            OSError: the waiter is gone.
        """
        assert self.conn is not None
        try:
            self.conn.sendall(json.dumps({"argv": argv, "env": env}).encode() + b"\n")
        finally:
            self._close_claim_socket()

    def _close_claim_socket(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()
        self.conn = None
        path = self.runtime_dir.host_dir / CLAIM_SOCKET
        try:
            path.unlink()
        except OSError:
            pass

    def discard(self, backend: DockerBackend) -> None:
        """Remove the container and everything it held (never raises)."""
        self._close_claim_socket()
        try:
            backend.remove_blocking(self.container_id)
        except Exception as exc:  # gc removes it once its runtime directory is gone
            log.warning("pooled sandbox %s left for gc: %s", self.container_name, clip(exc))
        self.lifeline.close()
        self.runtime_dir.remove()
        if self.uid_claim is not None:
            try:
                self.uid_claim.release()
            except OSError:
                pass


@dataclass
class _Pool:
    recipe: PoolRecipe
    ready: deque[PooledSandbox] = field(default_factory=deque)
    wanted_until: float = 0.0  # refilled until then (max_idle after its last use)
    image_id: str | None = None
    image_checked: float = float("-inf")
    retry_at: float = 0.0
    filling: bool = False  # a sandbox of this recipe is being started


class WarmPool:
    """The pools of one process, one per recipe, kept full by one background thread."""

    def __init__(self, backend: DockerBackend | None = None, exits: ExitRegistry | None = None):
        self.backend = backend or DockerBackend()
        self.kernel_id = "(warm pool)"  # as the exit registry names what it closes
        self.log = log
        self.exits = exits if exits is not None else PROCESS_EXITS
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- what kernel starts call ------------------------------------------------------------

    def claim(self, recipe: PoolRecipe) -> PooledSandbox | None:
        """A waiting sandbox made from ``recipe``, now the caller's, or None (the caller
        starts cold; the recipe's pool is filled for the next start)."""
        now = time.monotonic()
        with self._lock:
            pool = self._pools.get(recipe.key)
            if pool is None:
                pool = self._pools[recipe.key] = _Pool(recipe)
            pool.recipe = recipe  # the newest size and max_idle
            pool.wanted_until = now + recipe.max_idle
            for other in self._pools.values():
                if other is not pool and other.recipe.replaced_by(recipe):
                    other.wanted_until = 0.0  # a changed kernelspec or config: drained
            found = None
            while pool.ready:
                candidate = pool.ready.popleft()
                if candidate.waiting():
                    found = candidate
                    break
                self._discard_later(candidate)
        self._ensure_thread()
        self._wake.set()
        return found

    async def claim_or_wait(self, recipe: PoolRecipe) -> PooledSandbox | None:
        """:meth:`claim`; when none waits but one is being started for ``recipe``, wait for
        it (at most its ``launch_timeout``): it is ready sooner than a cold start would be,
        and a cold start would compete with it for the same CPUs."""
        sandbox = self.claim(recipe)
        deadline = time.monotonic() + recipe.launch_timeout
        while sandbox is None and self.filling(recipe.key) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            sandbox = self.claim(recipe)
        return sandbox

    def filling(self, key: str) -> bool:
        """Whether a sandbox of the recipe ``key`` is being started."""
        with self._lock:
            pool = self._pools.get(key)
            return pool is not None and pool.filling

    def counts(self) -> dict[str, int]:
        """Waiting sandboxes per recipe key."""
        with self._lock:
            return {key: len(pool.ready) for key, pool in self._pools.items()}

    def drain(self, key: str | None = None) -> int:
        """Remove the waiting sandboxes (of one recipe, or all); return how many."""
        with self._lock:
            pools = [self._pools[key]] if key in self._pools else []
            if key is None:
                pools = list(self._pools.values())
            taken = [s for pool in pools for s in pool.ready]
            for pool in pools:
                pool.ready.clear()
        for sandbox in taken:
            sandbox.discard(self.backend)
        return len(taken)

    def close(self, restart: bool = False) -> None:
        """Stop refilling and remove every waiting sandbox (interpreter exit; idempotent)."""
        self._closed = True
        self._wake.set()
        with self._lock:
            for pool in self._pools.values():
                pool.wanted_until = 0.0
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=CLOSE_WAIT)  # a sandbox being started is removed by it
        self.drain()

    # -- the maintainer ---------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._closed = False
            self.exits.add(self)
            self._thread = threading.Thread(
                target=self._maintain, name="kernel-sandbox-pool", daemon=True
            )
            self._thread.start()

    def _discard_later(self, sandbox: PooledSandbox) -> None:
        threading.Thread(target=sandbox.discard, args=(self.backend,), daemon=True).start()

    def _maintain(self) -> None:
        while not self._closed:
            self._wake.wait(TICK)
            self._wake.clear()
            if self._closed:
                break
            try:
                self._tend()
            except Exception as exc:  # the pool must never take its process down
                log.warning("kernel-sandbox pool: %s", clip(exc))
                time.sleep(TICK)

    def _tend(self) -> None:
        """One round: drop what is stale, then start one sandbox where one is missing."""
        now = time.monotonic()
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            self._prune(pool, now)
        for pool in pools:
            recipe = pool.recipe
            if now >= pool.wanted_until or now < pool.retry_at:
                continue
            with self._lock:
                missing = len(pool.ready) < recipe.size
            if not missing:
                continue
            pool.filling = True
            try:
                sandbox = self._create(recipe, pool.image_id)
            except Exception as exc:
                pool.filling = False
                if self._closed or _exiting():  # its executors refuse work: not a failure
                    log.debug("kernel-sandbox pool: refill stopped by the exit: %s", clip(exc))
                    return
                pool.retry_at = time.monotonic() + FAILURE_BACKOFF
                log.warning(
                    "kernel-sandbox pool: cannot start a pooled sandbox (%s); kernels start "
                    "cold, next try in %.0fs: %s",
                    recipe.policy.image,
                    FAILURE_BACKOFF,
                    clip(exc),
                )
                continue
            with self._lock:
                pool.filling = False
                if self._closed or time.monotonic() >= pool.wanted_until:
                    stale = True
                else:
                    pool.ready.append(sandbox)
                    stale = False
            if stale:
                sandbox.discard(self.backend)
            self._wake.set()  # more may be missing
            return  # one at a time: claims and kernels share the machine

    def _prune(self, pool: _Pool, now: float) -> None:
        stale: list[PooledSandbox] = []
        image_id = pool.image_id
        if now - pool.image_checked >= IMAGE_CHECK_EVERY:
            pool.image_checked = now
            try:
                image_id = self._image_id(pool.recipe.policy.image)
            except Exception:
                image_id = None
        with self._lock:
            if image_id != pool.image_id:
                pool.image_id = image_id
            keep: deque[PooledSandbox] = deque()
            for sandbox in pool.ready:
                too_old = now - sandbox.created > pool.recipe.max_idle
                unwanted = now >= pool.wanted_until
                rebuilt = image_id is not None and sandbox.image_id != image_id
                if too_old or unwanted or rebuilt or not sandbox.waiting():
                    stale.append(sandbox)
                else:
                    keep.append(sandbox)
            pool.ready = keep
        for sandbox in stale:
            sandbox.discard(self.backend)

    def _image_id(self, tag: str) -> str | None:
        try:
            return str(self.backend.client.api.inspect_image(tag)["Id"])
        except Exception:
            return None

    def _create(self, recipe: PoolRecipe, image_id: str | None) -> PooledSandbox:
        """Start one sandbox of ``recipe`` and wait until its waiter is ready (blocking).

        Raises:
            Exception: whatever stopped it (nothing is left behind).
        """
        from kernel_sandbox.provisioner.container import with_watchdog

        name = f"ks-pool-{secrets.token_hex(4)}"
        uid_claim = recipe.uid_pool.claim(name) if recipe.uid_pool is not None else None
        # a uid of its own from the range runs with the group of the same number
        user = f"{uid_claim.uid}:{uid_claim.uid}" if uid_claim is not None else str(recipe.user)
        uid, gid = (int(x) for x in user.split(":"))
        runtime_dir: RuntimeDir | None = None
        lifeline: Lifeline | None = None
        listener: socket.socket | None = None
        container_id: str | None = None
        try:
            runtime_dir = RuntimeDir.create(
                recipe.runtime_root, (uid, gid), recipe.runtime_dir_size, recipe.client_reachable
            )
            Owner.current().save(runtime_dir.path)
            lifeline = Lifeline(runtime_dir.host_dir)
            lifeline.listen()
            listener = _listen(runtime_dir)
            waiter = [
                recipe.python,
                "-m",
                POOL_WAITER_MODULE,
                f"{HOST_SOCKETS_MOUNT}/{CLAIM_SOCKET}",
                recipe.module,
            ]
            command = with_watchdog(waiter, recipe.orphan_timeout)
            from kernel_sandbox.provisioner.container import container_labels

            labels = container_labels("", recipe.kernelspec, recipe.profile, str(runtime_dir.path))
            labels.update(recipe.labels)
            labels[POOLED_LABEL] = "true"
            request = ContainerRequest(
                name=name,
                policy=recipe.policy,
                command=command,
                env=recipe.env,
                labels=labels,
                runtime_dir=str(runtime_dir.shared),
                user=user,
                workspace=recipe.workspace,
                workspace_path=recipe.workspace_path,
                host_dir=str(runtime_dir.host_dir),
            )
            container_id = asyncio.run(self.backend.start(request))
            conn = _accept_ready(listener, recipe.launch_timeout, self.backend, container_id)
            lifeline.accept_pending()
        except BaseException:
            if listener is not None:
                listener.close()
            if container_id is not None:
                try:
                    self.backend.remove_blocking(container_id)
                except Exception:
                    pass
            if lifeline is not None:
                lifeline.close()
            if runtime_dir is not None:
                runtime_dir.remove()
            if uid_claim is not None:
                uid_claim.release()
            raise
        return PooledSandbox(
            recipe.key,
            image_id,
            runtime_dir,
            lifeline,
            container_id,
            name,
            user,
            uid_claim,
            listener,
            conn,
        )


def _exiting() -> bool:
    """Whether the interpreter is exiting: a refill under way then fails (its event loop's
    executor refuses new work) and cleans up after itself, which is no failure to report."""
    return sys.is_finalizing() or not threading.main_thread().is_alive()


def _listen(runtime_dir: RuntimeDir) -> socket.socket:
    """The claim socket in ``h/`` (read-only inside; bound in the host-only directory and
    renamed into place, as the lifeline)."""
    staging = runtime_dir.path / f".{CLAIM_SOCKET}.tmp"
    staging.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(staging))
        os.chmod(staging, 0o666)  # h/ (searchable by the kernel's uid alone) is the guard
        listener.listen(1)
        os.rename(staging, runtime_dir.host_dir / CLAIM_SOCKET)
    except BaseException:
        listener.close()
        staging.unlink(missing_ok=True)
        raise
    return listener


def _accept_ready(
    listener: socket.socket, timeout: float, backend: DockerBackend, container_id: str
) -> socket.socket:
    """The waiter's connection, once it said it is ready.

    Raises:
        TimeoutError: not ready within ``timeout`` seconds.
        RuntimeError: the container ended first (its last log lines in the message).
    """
    deadline = time.monotonic() + timeout
    listener.settimeout(0.25)
    conn: socket.socket | None = None
    data = b""
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn, _ = listener.accept()
                conn.settimeout(0.25)
            chunk = conn.recv(len(READY) - len(data))
            if not chunk:
                raise RuntimeError("the waiter closed its claim connection")
            data += chunk
            if data == READY:
                conn.settimeout(None)
                return conn
        except TimeoutError:
            if not asyncio.run(backend.state(container_id)).running:
                logs = asyncio.run(backend.logs_tail(container_id))
                raise RuntimeError(f"the pooled container ended: {logs or '(no output)'}") from None
    if conn is not None:
        conn.close()
    raise TimeoutError(f"the pooled sandbox was not ready within {timeout:.0f}s")


_PROCESS_POOL: WarmPool | None = None
_PROCESS_POOL_LOCK = threading.Lock()


def process_pool(backend: DockerBackend | None = None) -> WarmPool:
    """This process's pool (made on first use)."""
    global _PROCESS_POOL
    with _PROCESS_POOL_LOCK:
        if _PROCESS_POOL is None:
            _PROCESS_POOL = WarmPool(backend)
        return _PROCESS_POOL

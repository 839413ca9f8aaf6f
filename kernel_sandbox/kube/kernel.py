"""One kernel as a pod: what ``DockerSandboxProvisioner`` does when the policy says
``backend: kubernetes``.

A start makes three objects named alike: a NetworkPolicy (no egress; ingress to the kernel's
ports from the owner only), a Secret holding the connection file (HMAC key and CurveZMQ key
pair, never in the pod spec) and the hardened pod (:mod:`~kernel_sandbox.kube.podspec`). The
Secret and the NetworkPolicy are then owned by the pod, so the cluster deletes them with it
whoever deletes the pod; ``cleanup`` deletes all three itself too. The owner reaches the
kernel at the pod's address over CurveZMQ (:mod:`~kernel_sandbox.kube.transport`); an
interrupt is an ``interrupt_request`` on the control channel (no exec rights needed), a kill
is the pod's deletion. Pods whose owner process died are deleted by
:mod:`~kernel_sandbox.kube.reap`.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from jupyter_client.connect import KernelConnectionInfo

from kernel_sandbox.errors import EngineError, EngineUnavailable, KernelStartError, PolicyError
from kernel_sandbox.host.monitor import KernelMonitor
from kernel_sandbox.host.owner import Owner
from kernel_sandbox.inside.contract import KERNEL_UID, NETWORK_ENV
from kernel_sandbox.kube.api import NETWORK_POLICIES, PODS, SECRETS, SERVICES, KubeApi
from kernel_sandbox.kube.control import send_interrupt
from kernel_sandbox.kube.data import PodData
from kernel_sandbox.kube.egress import PodEgress, egress_address, owner_rule
from kernel_sandbox.kube.idle import end_idle, pod_monitor
from kernel_sandbox.kube.launch import Launch
from kernel_sandbox.kube.podspec import (
    CONNECTION_FILE,
    CONTAINER,
    KERNEL_LABEL,
    KUBE_PREFIX,
    PodRequest,
    ingress_peers,
    label_value,
    network_policy_manifest,
    owner_reference,
    pod_manifest,
    runtime_class,
    secret_manifest,
    service_manifest,
    with_secret_copy,
)
from kernel_sandbox.kube.reap import defer_deletion, retry_deletions, start_sweep
from kernel_sandbox.kube.seccomp import pod_seccomp
from kernel_sandbox.kube.status import PodState, read_status, start_problem, timeout_message
from kernel_sandbox.kube.transport import client_connection, new_connection, pod_connection_file
from kernel_sandbox.provisioner.container import check_datasets_not_writable, container_env

if TYPE_CHECKING:
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

__all__ = ["KubeKernel", "unsupported"]

# Seconds between two looks at a starting pod.
POLL_INTERVAL = 0.1


def unsupported(policy: Any) -> list[str]:
    """The policy's keys this backend cannot honour yet (a start refuses them)."""
    missing = []
    if policy.network not in ("none", "allowlist"):
        missing.append(f"network {policy.network!r}")
    if policy.pool_size:
        missing.append("pool_size (warm pools are containers on this host)")
    return missing


def owner_record(kernel_id: str, kernelspec: str, profile: str) -> tuple[dict, dict]:
    """Labels (to select by) and annotations (the exact owner record) of a kernel's objects."""
    owner = Owner.current()
    labels = {
        "managed": "true",
        "kernel-id": label_value(kernel_id),
        "kernelspec": label_value(kernelspec),
        "profile": label_value(profile),
        "owner-host": label_value(owner.host),
        "owner-pid": str(owner.pid),
        "owner-uid": str(os.getuid()),
    }
    annotations = {
        "owner": getpass.getuser(),
        "owner-host": owner.host,
        "owner-pid": str(owner.pid),
        "owner-start": owner.start or "",
        "kernel-id": kernel_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return (
        {KUBE_PREFIX + k: v for k, v in labels.items()},
        {KUBE_PREFIX + k: v for k, v in annotations.items()},
    )


def service_labels(caller_uid: int) -> dict[str, str]:
    """The labels of a pod the sandbox service runs for a caller: only the service reaps it
    (:func:`kernel_sandbox.kube.reap.selector`); ``ps`` shows the caller."""
    return {KUBE_PREFIX + "service": "true", KUBE_PREFIX + "caller-uid": str(caller_uid)}


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def source_address(pod_ip: str) -> str:
    """The address this process reaches ``pod_ip`` from (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((pod_ip, 9))
        return str(probe.getsockname()[0])


def _answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


class KubeKernel:
    """The Kubernetes half of one provisioner (kept across restarts)."""

    def __init__(self, provisioner: DockerSandboxProvisioner):
        self.prov = provisioner
        self.api = KubeApi(
            provisioner.kube_namespace,
            provisioner.kube_config,
            provisioner.kube_context,
            provisioner.kube_in_cluster,
            provisioner.kube_api_timeout,
        )
        self.info: dict[str, Any] | None = None  # the secrets, kept across restarts
        self.pod_name: str | None = None
        self.pod_ip = ""
        # the kernel across restarts: its pods' KERNEL_LABEL, its Service and that address
        self.key = uuid.uuid4().hex[:12]
        self.service: str | None = None
        self.address = ""  # what clients connect to: the Service's, else the pod's
        self._deleted = False  # this side deleted the pod (kill, cleanup)
        # the owner's services the pod uses, at owner_address: kube/egress.py, kube/data.py
        self.egress: PodEgress | None = None  # network: allowlist
        self.data: PodData | None = None  # datasets
        self.owner_address = ""
        self.monitor: KernelMonitor | None = None  # idle_timeout (kernel_sandbox.kube.idle)
        self._api_down_logged = False

    @property
    def log(self) -> Any:
        return self.prov.log

    @property
    def started(self) -> bool:
        return self.pod_name is not None

    # -- start ------------------------------------------------------------------------------

    async def pre_launch(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The kernel's argv (reading its connection file from the Secret) and environment.

        Raises:
            PolicyError: a policy key this backend cannot honour.
        """
        prov, policy = self.prov, self.prov.policy
        missing = unsupported(policy)
        if missing:
            raise PolicyError(
                f"kernelspec {prov._spec_name}: backend 'kubernetes' does not support "
                f"{'; '.join(missing)} yet; use backend 'docker' for this kernelspec"
            )
        extra = list(kwargs.pop("extra_arguments", []))
        prov.cwd = str(kwargs.pop("cwd", None) or os.getcwd())
        host_env = kwargs.pop("env", {})
        if self.info is None:
            try:
                self.info = new_connection(prov._spec_name)
            except RuntimeError as exc:
                raise KernelStartError(str(exc)) from exc
        prov.connection_info = cast(KernelConnectionInfo, dict(self.info))
        if prov.reap_orphans:
            start_sweep(self.api, self.log)
        argv = [a.replace("{connection_file}", CONNECTION_FILE) for a in prov.kernel_spec.argv]
        allowed = (*prov.env_allowlist, *policy.env_passthrough)
        env = container_env(
            host_env, allowed, prov.kernel_spec.env or {}, policy.env, policy.cpu_limit
        )
        if policy.network == "allowlist":
            self.egress = self.egress or self._new_egress()
            extra += self.egress.endpoint.kernel_arguments(argv)  # the notice extension
        if policy.datasets and self.data is None:
            check_datasets_not_writable(policy, None, prov.runtime_root, prov._spec_name)
            self.data = PodData(prov._broker(), prov.kernel_id or self.key, policy)
        kwargs["cmd"] = with_secret_copy(argv + extra)
        kwargs["env"] = {**env, NETWORK_ENV: policy.network}
        kwargs["user"] = policy.user or f"{KERNEL_UID}:{KERNEL_UID}"
        return kwargs

    def _new_egress(self) -> PodEgress:
        prov = self.prov
        return PodEgress(
            Path(prov.runtime_root) / (prov.kernel_id or self.key),
            prov.kernel_id or self.key,
            prov.policy,
            prov.egress_log,
            prov.log_limits,
            prov.egress_upstream_ca,
            prov.egress_port,
        )

    def _request(self, cmd: list[str], kwargs: dict[str, Any]) -> PodRequest:
        prov = self.prov
        name = f"ks-{self.key}-{uuid.uuid4().hex[:6]}"
        profile = prov._spec_config.get("profile") or prov.profile
        labels, annotations = owner_record(prov.kernel_id or "", prov._spec_name, profile)
        labels[KERNEL_LABEL] = self.key
        if prov.client_owner is not None:  # the sandbox service's, for a caller (service/)
            labels.update(service_labels(prov.client_owner[0]))
            annotations[KUBE_PREFIX + "owner"] = _user_name(prov.client_owner[0])
        cidrs = [c for c in prov.kube_ingress_from if c != "auto"]
        return PodRequest(
            name=name,
            namespace=self.api.namespace,
            policy=prov.policy,
            command=cmd,
            env=kwargs.get("env", {}),
            labels=labels,
            annotations=annotations,
            user=kwargs["user"],
            image_pull_policy=prov.kube_image_pull_policy,
            runtime_class=runtime_class(prov.policy.runtime, prov.kube_runtime_classes),
            request_ratio=prov.kube_request_ratio,
            ingress_from=ingress_peers(cidrs, prov.kube_owner_labels),
            seccomp=pod_seccomp(prov.kube_seccomp_profile, prov.policy.seccomp),
        )

    async def launch_kernel(self, cmd: list[str], kwargs: dict[str, Any]) -> KernelConnectionInfo:
        """Make the kernel's objects and wait until it answers on its ports.

        A failure deletes what was made.

        Raises:
            KernelStartError: the pod cannot be scheduled, pulled or started, or the kernel
                did not answer within ``launch_timeout`` (the cluster's reason in the message).
            EngineUnavailable, EngineError: the API server is unreachable, or refused.
        """
        assert self.info is not None
        request = self._request(cmd, kwargs)
        owner_ip = ""
        if self.prov.kube_owner_pod:
            owner = await self.api.get(PODS, self.prov.kube_owner_pod)
            if owner is None:
                raise KernelStartError(
                    f"kube_owner_pod {self.prov.kube_owner_pod!r} is not a pod in namespace "
                    f"{self.api.namespace}"
                )
            ref = owner_reference("Pod", owner["metadata"]["name"], owner["metadata"]["uid"])
            request = PodRequest(**{**request.__dict__, "owner_references": (ref,)})
            owner_ip = (owner.get("status") or {}).get("podIP") or ""
        await retry_deletions(self.api)
        started = time.monotonic()
        self.pod_name, self._deleted, self.pod_ip = request.name, False, ""
        made_service = False
        try:
            if self.prov.kube_service and self.service is None:
                name = f"ks-{self.key}"
                made = await self.api.create(
                    SERVICES,
                    service_manifest(name, self.api.namespace, request.labels, request.annotations),
                )
                self.service, made_service = name, True
                self.address = made["spec"]["clusterIP"]
            extra: dict[str, bytes] = {}
            if self.egress is not None or self.data is not None:
                request, extra = await self._with_owner_services(request, owner_ip)
            await self.api.create(NETWORK_POLICIES, network_policy_manifest(request))
            connection = pod_connection_file(self.info)
            await self.api.create(SECRETS, secret_manifest(request, connection, extra))
            pod = await self._create_pod(request)
            ref = owner_reference("Pod", request.name, pod["metadata"]["uid"])
            owned = {"metadata": {"ownerReferences": [ref]}}
            await asyncio.gather(
                self.api.patch(SECRETS, request.name, owned),
                self.api.patch(NETWORK_POLICIES, request.name, owned),
            )
            state = await self._until_running(request, started)
            await self._allow_owner(request, state.pod_ip)
            if not self.prov.kube_service:
                self.address = state.pod_ip
            await self._until_answering(request, self.address, started)
        except BaseException:
            await self._delete_all(grace=0, service=made_service)
            await self._stop_services(restart=self.prov._launched)  # a first start: all
            raise
        self.pod_ip = state.pod_ip
        info = client_connection(self.info, self.address)
        self.prov.connection_info = cast(KernelConnectionInfo, info)
        self._watch()
        self.log.debug(
            "kernel %s: pod %s (node %s, %s; clients at %s) ready in %.2fs",
            self.prov.kernel_id,
            request.name,
            state.node,
            state.pod_ip,
            self.address,
            time.monotonic() - started,
        )
        return self.prov.connection_info

    async def _with_owner_services(
        self, request: PodRequest, owner_ip: str
    ) -> tuple[PodRequest, dict[str, bytes]]:
        """Start the owner's services this pod uses (the egress proxy once, it outlives
        restarts; a new data token each start) and give the pod their launcher, its
        NetworkPolicy's one egress rule (their address and ports) and its Secret's files."""
        if not self.owner_address:
            self.owner_address = await asyncio.to_thread(
                egress_address, self.prov.kube_egress_address, owner_ip, self.address
            )
        launch, files, ports = Launch(), dict[str, bytes](), list[int]()
        if self.egress is not None:
            await self.egress.start(self.owner_address)  # a no-op while it runs
            launch.extend(self.egress.launch())
            files.update(self.egress.secret_files())
            ports += self.egress.ports.values()
        if self.data is not None:
            record = await asyncio.to_thread(self.data.grant, self.owner_address)
            self.log.debug("kernel %s: data token %s", self.prov.kernel_id, record.token_id)
            launch.extend(self.data.launch())
            files.update(self.data.secret_files())
            ports.append(self.data.port)
        changes = {
            "command": launch.command(request.command),
            "egress_to": (owner_rule(self.owner_address, ports),),
        }
        return PodRequest(**{**request.__dict__, **changes}), files

    async def _create_pod(self, request: PodRequest) -> dict[str, Any]:
        """Create the pod; a RuntimeClass the cluster lacks is the operator's to fix: say so."""
        try:
            return cast(dict, await self.api.create(PODS, pod_manifest(request)))
        except EngineError as exc:
            klass = request.runtime_class
            if klass and f'RuntimeClass "{klass}" not found' in str(exc):
                raise KernelStartError(
                    f"the cluster has no RuntimeClass {klass!r}, which runtime "
                    f"{request.policy.runtime!r} maps to: create it (for gVisor, a handler the "
                    "nodes' container runtime has, see docs/kubernetes.md) or map the runtime to "
                    "one the cluster has: c.DockerSandboxProvisioner.kube_runtime_classes"
                ) from exc
            raise

    async def _until_running(self, request: PodRequest, started: float) -> PodState:
        image, timeout = request.policy.image, self.prov.launch_timeout
        while True:
            state = read_status(await self.api.get(PODS, request.name))
            if state.running and state.pod_ip:
                return state
            logs = ""
            if state.exit_code is not None:
                logs = await self.api.log_tail(request.name, CONTAINER)
            problem = start_problem(request.name, image, state, logs)
            if problem:
                raise KernelStartError(problem)
            if time.monotonic() - started > timeout:
                raise KernelStartError(timeout_message(request.name, image, state, timeout))
            await asyncio.sleep(POLL_INTERVAL)

    async def _allow_owner(self, request: PodRequest, pod_ip: str) -> None:
        """Add this process's own addresses to the NetworkPolicy's ingress ('auto'): the one it
        reaches the pod from and the one it reaches the Service from (a connection to a
        ClusterIP keeps the source chosen for it, unless kube-proxy masquerades it to the
        former: which one the pod sees depends on the cluster)."""
        if "auto" not in self.prov.kube_ingress_from:
            return
        cidrs = [c for c in self.prov.kube_ingress_from if c != "auto"]
        for target in dict.fromkeys(a for a in (pod_ip, self.address) if a):
            own = await asyncio.to_thread(source_address, target)
            if own not in cidrs:
                cidrs.append(own)
        allowed = PodRequest(
            **{
                **request.__dict__,
                "ingress_from": ingress_peers(cidrs, self.prov.kube_owner_labels),
            }
        )
        spec = network_policy_manifest(allowed)["spec"]
        await self.api.patch(NETWORK_POLICIES, request.name, {"spec": {"ingress": spec["ingress"]}})

    async def _until_answering(self, request: PodRequest, pod_ip: str, started: float) -> None:
        """Wait until the kernel's heartbeat port accepts at ``pod_ip`` (the Service's address:
        its endpoint is programmed), as ipykernel binds it last."""
        assert self.info is not None
        port, timeout = int(self.info["hb_port"]), self.prov.launch_timeout
        next_check = time.monotonic() + 0.5
        while not await asyncio.to_thread(_answers, pod_ip, port):
            now = time.monotonic()
            if now >= next_check:
                state = read_status(await self.api.get(PODS, request.name))
                logs = await self.api.log_tail(request.name, CONTAINER) if state.ended else ""
                problem = start_problem(request.name, request.policy.image, state, logs)
                if problem:
                    raise KernelStartError(problem)
                next_check = now + 0.5
            if now - started > timeout:
                state = read_status(await self.api.get(PODS, request.name))
                raise KernelStartError(
                    timeout_message(request.name, request.policy.image, state, timeout)
                )
            await asyncio.sleep(0.02)

    # -- idle_timeout (kernel_sandbox.kube.idle) --------------------------------------------

    def _watch(self) -> None:
        """Watch the new pod's kernel for idle_timeout (from the event loop that started it:
        the provisioner ends it through that loop's manager, as for a container)."""
        self._unwatch()
        idle_timeout = self.prov.policy.idle_timeout
        if idle_timeout > 0 and self.info is not None:
            self.prov._loop = asyncio.get_running_loop()
            self.monitor = pod_monitor(self.info, self.address, idle_timeout, self._idle_end)

    def _unwatch(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()

    def _idle_end(self, reason: str) -> None:
        """The monitor fired (its thread): the clients are told, the kernel ended."""
        end_idle(self, reason)

    # -- a running kernel -------------------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the pod's kernel runs (or the API server cannot say), else its exit
        code (137 for an OOM kill or a deleted pod)."""
        if self.pod_name is None:
            return 0
        try:
            pod = await self.api.get(PODS, self.pod_name)
        except (EngineUnavailable, EngineError) as exc:
            # The pod does not depend on the API server: the kernel may well be alive (its
            # heartbeat says), so an outage is not a death, which would make jupyter_client
            # restart it.
            if not self._api_down_logged:
                self.log.warning(
                    "kernel %s: cannot ask about its pod: %s", self.prov.kernel_id, exc
                )
                self._api_down_logged = True
            return None
        self._api_down_logged = False
        state = read_status(pod)
        if state.running and not state.deleting:
            return None
        if (state.deleting or pod is None) and self._deleted:
            return 137 if state.exit_code is None else state.exit_code
        if state.oom_killed:
            self.log.warning(
                "kernel %s: pod %s was killed: out of memory", self.prov.kernel_id, self.pod_name
            )
            return 137
        if state.ended:
            return state.exit_code if state.exit_code is not None else 1
        return None

    async def send_signal(self, signum: int) -> None:
        """SIGINT: an interrupt_request on the control channel; SIGTERM or SIGKILL: the pod is
        deleted (with a short grace for SIGTERM). Never raises (logged)."""
        if self.pod_name is None:
            return
        try:
            if signum == signal.SIGINT and self.info is not None and self.address:
                await asyncio.to_thread(send_interrupt, client_connection(self.info, self.address))
            elif signum in (signal.SIGTERM, signal.SIGKILL):
                self._deleted = True
                await self.api.delete(PODS, self.pod_name, 1 if signum == signal.SIGKILL else 2)
            else:
                self.log.warning(
                    "kernel %s: signal %d cannot be sent to a pod", self.prov.kernel_id, signum
                )
        except (EngineUnavailable, EngineError, OSError, TimeoutError) as exc:
            self.log.warning("kernel %s: cannot signal its pod: %s", self.prov.kernel_id, exc)

    async def cleanup(self, restart: bool = False) -> None:
        """Delete the pod, its Secret and its NetworkPolicy. Never raises: what cannot be
        deleted now (API server unreachable) is logged, and the orphan sweep deletes it once
        this process has ended."""
        pod = self.pod_name
        self._unwatch()
        await self._delete_all(grace=1, service=not restart)
        await self._stop_services(restart)
        if pod is not None:
            await self._until_gone(pod)
        self.pod_name, self.pod_ip = None, ""
        if not restart:
            self.service, self.address = None, ""
        try:
            await retry_deletions(self.api)
        except Exception as exc:  # never raise into jupyter_client from cleanup
            self.log.warning("kernel %s: %s", self.prov.kernel_id, exc)
        if not restart:
            self.info = None
            self.api.close()

    async def _stop_services(self, restart: bool) -> None:
        """Revoke the data token; unless ``restart``, also stop serving the broker's port and
        end the egress proxy (a restart keeps both, as the Docker path does). Never raises."""
        if self.data is not None:
            try:
                await asyncio.to_thread(self.data.release, restart)
            except Exception as exc:  # never raise into jupyter_client from cleanup
                self.log.warning("kernel %s: data token: %s", self.prov.kernel_id, exc)
            if not restart:
                self.data = None
        if not restart and self.egress is not None:
            egress, self.egress = self.egress, None
            try:
                await egress.stop()
            except Exception as exc:  # never raise into jupyter_client from cleanup
                self.log.warning("kernel %s: egress proxy: %s", self.prov.kernel_id, exc)

    async def _until_gone(self, pod: str, timeout: float = 30.0) -> None:
        """Wait until the kubelet has confirmed the pod's end (a graceful deletion removes the
        object only then): until it has, its kernel may still answer on connections made before
        (a restart's new kernel must not overlap it). Never raises: a pod that outlasts
        ``timeout`` or an API server that stops answering is logged."""
        deadline = time.monotonic() + timeout
        try:
            while await self.api.get(PODS, pod) is not None:
                if time.monotonic() > deadline:
                    self.log.warning(
                        "kernel %s: pod %s still there %.0fs after its deletion",
                        self.prov.kernel_id,
                        pod,
                        timeout,
                    )
                    return
                await asyncio.sleep(0.2)
        except (EngineUnavailable, EngineError) as exc:
            self.log.warning("kernel %s: %s", self.prov.kernel_id, exc)

    async def _delete_all(self, grace: int, service: bool = False) -> None:
        """Delete the pod, its Secret and NetworkPolicy (and with ``service`` the Service)."""
        objects = []
        if self.pod_name is not None:
            self._deleted = True
            objects = [(kind, self.pod_name) for kind in (PODS, SECRETS, NETWORK_POLICIES)]
        if service and self.service is not None:
            objects.append((SERVICES, self.service))
        for kind, name in objects:
            try:
                await self.api.delete(kind, name, grace if kind == PODS else None)
            except (EngineUnavailable, EngineError) as exc:
                defer_deletion(self.api, kind, name)
                self.log.warning(
                    "kernel %s: could not delete %s %s (retried on this process's next "
                    "request, else by the orphan sweep once it has ended): %s",
                    self.prov.kernel_id,
                    kind,
                    name,
                    exc,
                )

    # -- persistence across a Jupyter Server restart ----------------------------------------

    def provisioner_info(self) -> dict[str, Any]:
        info = dict(self.info or {})
        if isinstance(info.get("key"), bytes):
            info["key"] = info["key"].decode()
        return {
            "kube": {
                "namespace": self.api.namespace,
                "pod": self.pod_name,
                "pod_ip": self.pod_ip,
                "key": self.key,
                "service": self.service,
                "address": self.address,
                "connection": info,
                "services": {  # the owner's egress proxy and broker port (kube/egress, data)
                    "owner_address": self.owner_address,
                    "egress": self.egress.state() if self.egress and self.egress.ports else None,
                    "data": self.data.state() if self.data and self.data.port else None,
                },
            }
        }

    def adopt(self, provisioner_info: dict[str, Any]) -> None:
        kube = provisioner_info.get("kube") or {}
        info = dict(kube.get("connection") or {})
        if isinstance(info.get("key"), str):
            info["key"] = info["key"].encode()
        self.info = info or None
        self.pod_name = kube.get("pod")
        self.pod_ip = kube.get("pod_ip") or ""
        self.key = kube.get("key") or self.key
        self.service = kube.get("service")
        self.address = kube.get("address") or self.pod_ip
        self._adopt_services(kube.get("services") or {})

    def _adopt_services(self, services: dict[str, Any]) -> None:
        """Serve an adopted pod its egress proxy and broker port again, as they were (the
        pod pins their certificates and holds their tokens). Logged, never raised."""
        self.owner_address = services.get("owner_address") or ""
        policy = self.prov.policy
        try:
            if services.get("egress") and policy.network == "allowlist":
                self.egress = self._new_egress()
                self.egress.adopt(services["egress"])
            if services.get("data") and policy.datasets:
                self.data = PodData(self.prov._broker(), self.prov.kernel_id or self.key, policy)
                self.data.adopt(services["data"])
        except Exception as exc:
            self.log.warning(
                "kernel %s: cannot serve its egress proxy or data again (its pod's requests "
                "fail until a restart): %s",
                self.prov.kernel_id,
                exc,
            )

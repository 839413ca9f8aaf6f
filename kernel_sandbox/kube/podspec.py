"""A kernel's pod, Secret and NetworkPolicy, from its policy: the Docker hardening, as pods.

:class:`PodRequest` is everything the provisioner decided; :func:`pod_manifest`,
:func:`secret_manifest` and :func:`network_policy_manifest` turn it into API objects (plain
dicts, as the API server takes them). The mapping from :mod:`kernel_sandbox.engine.container`:

=====================  =========================================================================
Docker option          pod field
=====================  =========================================================================
user uid:gid           runAsUser/runAsGroup, runAsNonRoot (uid 0 refused here too)
read_only              readOnlyRootFilesystem
cap_drop ALL           capabilities.drop [ALL]
no-new-privileges      allowPrivilegeEscalation false
seccomp profile        seccompProfile RuntimeDefault, or Localhost (the node's copy: ``seccomp``)
mem/memswap, cpus      limits.memory, limits.cpu (requests a fraction: ``request_ratio``)
tmpfs /tmp, home       emptyDir medium Memory with sizeLimit
volumes (mounts)       hostPath, only the policy's mounts (already checked by the mount rules)
network none, dns      egress denied by a NetworkPolicy; dnsPolicy None, nameserver 127.0.0.1
runtime runsc          runtimeClassName (``runtime_classes`` maps runtime -> RuntimeClass)
labels                 labels (selectable) and annotations (the owner record)
(none)                 automountServiceAccountToken false, enableServiceLinks false
=====================  =========================================================================

Not mapped, the cluster's to give (docs/kubernetes.md): ``pids_limit`` (the kubelet's
``--pod-max-pids``), ``nofile_limit`` (the runtime's default ulimits), the workspace (the
notebook's folder is on the owner's machine, not the node) and enforcement of NetworkPolicy
(the network plugin). Pure: no API calls here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.inside.contract import RUNTIME_MOUNT, SANDBOX_HOME
from kernel_sandbox.kube.transport import KERNEL_PORTS
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = [
    "CONNECTION_FILE",
    "KERNEL_LABEL",
    "KUBE_PREFIX",
    "SECRET_FILE",
    "SECRET_MOUNT",
    "PodRequest",
    "ingress_peers",
    "label_value",
    "network_policy_manifest",
    "owner_reference",
    "pod_manifest",
    "runtime_class",
    "secret_manifest",
    "service_manifest",
    "with_secret_copy",
]

KUBE_PREFIX = "kernel-sandbox.io/"  # labels and annotations (Kubernetes' prefix/name form)
KERNEL_LABEL = KUBE_PREFIX + "kernel"  # one kernel's pods across restarts (its Service selects it)
SECRET_MOUNT = "/run/kernel-sandbox-secret"  # the connection file's Secret, read-only
SECRET_FILE = f"{SECRET_MOUNT}/connection.json"
# ipykernel writes its connection file back once bound: it reads a private copy in a small
# in-memory volume of its own (RUNTIME_MOUNT), made by the pod's command (with_secret_copy).
CONNECTION_FILE = f"{RUNTIME_MOUNT}/connection.json"
_COPY = (
    "import os, shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2]); "
    "os.chmod(sys.argv[2], 0o600); os.execvp(sys.argv[3], sys.argv[3:])"
)
CONTAINER = "kernel"
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


def label_value(text: str) -> str:
    """``text`` as a valid label value: [A-Za-z0-9._-], at most 63, alphanumeric at both ends."""
    value = _LABEL_VALUE.sub("-", text)[:63]
    return value.strip("._-")


def with_secret_copy(argv: Sequence[str]) -> list[str]:
    """``argv`` (which reads CONNECTION_FILE), started once the Secret's file is copied there
    (standard library only: any image with a Python runs it)."""
    return ["python", "-c", _COPY, SECRET_FILE, CONNECTION_FILE, *argv]


def runtime_class(runtime: str, classes: Mapping[str, str]) -> str | None:
    """The RuntimeClass for the policy's ``runtime`` (None: the node's default, for runc).

    Raises:
        PolicyError: a runtime other than runc with no RuntimeClass configured for it.
    """
    if runtime in classes:
        return classes[runtime] or None
    if runtime == "runc":
        return None
    raise PolicyError(
        f"runtime {runtime!r} has no RuntimeClass on Kubernetes: set "
        f"c.DockerSandboxProvisioner.kube_runtime_classes = {{{runtime!r}: 'NAME'}} to the "
        "RuntimeClass the cluster has for it (e.g. 'gvisor')"
    )


@dataclass(frozen=True)
class PodRequest:
    """Everything needed for one kernel's pod, decided by the provisioner."""

    name: str  # the pod's, its Secret's and its NetworkPolicy's name
    namespace: str
    policy: SandboxPolicy
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]  # selectable: already valid label values
    annotations: dict[str, str]  # the owner record
    user: str  # uid:gid
    image_pull_policy: str = "IfNotPresent"
    runtime_class: str | None = None
    request_ratio: float = 0.25  # requests = limits x this (how densely pods are packed)
    # NetworkPolicy peers allowed to reach the kernel's ports (none: nobody, until patched)
    ingress_from: tuple[dict[str, Any], ...] = ()
    owner_references: tuple[dict[str, Any], ...] = field(default=())
    # NetworkPolicy egress rules (none: nothing out; allowlist mode: its proxy only)
    egress_to: tuple[dict[str, Any], ...] = ()
    # the pod's seccompProfile (kernel_sandbox.kube.seccomp.pod_seccomp)
    seccomp: dict[str, Any] = field(default_factory=lambda: {"type": "RuntimeDefault"})

    @property
    def selector(self) -> dict[str, str]:
        """The label that selects this kernel's pod (and only it)."""
        return {KUBE_PREFIX + "pod": self.name}

    def metadata(self, **extra: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {**self.labels, **self.selector},
            **extra,
        }
        return meta


def _ids(user: str) -> tuple[int, int]:
    uid_text, _, gid_text = user.partition(":")
    uid, gid = int(uid_text), int(gid_text or uid_text)
    if uid == 0:
        raise PolicyError("a kernel pod never runs as uid 0")
    return uid, gid


def _quantity(cpus: float) -> str:
    return f"{max(1, round(cpus * 1000))}m"


def pod_manifest(request: PodRequest) -> dict[str, Any]:
    """The kernel's pod: hardened as the Docker path's container (see the module's table).

    Raises:
        PolicyError: uid 0.
    """
    policy = request.policy
    uid, gid = _ids(request.user)
    seccomp = dict(request.seccomp)
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(policy.tmpfs_size)}},
        {"name": "home", "emptyDir": {"medium": "Memory", "sizeLimit": str(policy.tmpfs_size)}},
        {"name": "runtime", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}},
        {
            "name": "connection",
            "secret": {"secretName": request.name, "defaultMode": 0o440},
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": SANDBOX_HOME},
        {"name": "runtime", "mountPath": RUNTIME_MOUNT},
        {"name": "connection", "mountPath": SECRET_MOUNT, "readOnly": True},
    ]
    for index, mount in enumerate(policy.mounts):
        name = f"mount-{index}"
        volumes.append({"name": name, "hostPath": {"path": mount.source, "type": "Directory"}})
        mounts.append({"name": name, "mountPath": mount.target, "readOnly": mount.read_only})
    ratio = min(1.0, max(0.0, request.request_ratio))
    limits = {"memory": str(policy.memory_limit), "cpu": _quantity(policy.cpu_limit)}
    requests = {
        "memory": str(max(32 * 1024**2, int(policy.memory_limit * ratio))),
        "cpu": _quantity(policy.cpu_limit * ratio),
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": policy.image,
        "imagePullPolicy": request.image_pull_policy,
        "command": list(request.command),
        "env": [{"name": k, "value": v} for k, v in sorted(request.env.items())],
        "workingDir": SANDBOX_HOME,
        "ports": [
            {"name": port.replace("_port", ""), "containerPort": number, "protocol": "TCP"}
            for port, number in KERNEL_PORTS.items()
        ],
        "resources": {"limits": limits, "requests": requests},
        "securityContext": {
            "runAsUser": uid,
            "runAsGroup": gid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp,
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostname": "sandbox",
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        # no resolver inside (as Docker's dns 127.0.0.1): names resolve only on the owner's side
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": ["127.0.0.1"]},
        "terminationGracePeriodSeconds": 2,
        "securityContext": {
            "runAsUser": uid,
            "runAsGroup": gid,
            "runAsNonRoot": True,
            "fsGroup": gid,  # the Secret's file (mode 0440) is readable by the kernel's group
            "seccompProfile": seccomp,
        },
        "containers": [container],
        "volumes": volumes,
    }
    if request.runtime_class:
        spec["runtimeClassName"] = request.runtime_class
    extra: dict[str, Any] = {"annotations": dict(request.annotations)}
    if request.owner_references:
        extra["ownerReferences"] = [dict(ref) for ref in request.owner_references]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": request.metadata(**extra), "spec": spec}


def secret_manifest(
    request: PodRequest, connection_file: bytes, extra: Mapping[str, bytes] | None = None
) -> dict[str, Any]:
    """The Secret that carries the connection file (HMAC key, CurveZMQ keys) into the pod and
    nowhere else: never in the pod spec, never in an environment variable. The provisioner
    makes the pod its owner, so the cluster deletes it with the pod. ``extra``: more files
    for the same mount (the egress proxy's token, :mod:`kernel_sandbox.kube.egress`)."""
    data = {name: base64.b64encode(value).decode() for name, value in (extra or {}).items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": request.metadata(annotations=dict(request.annotations)),
        "data": {**data, "connection.json": base64.b64encode(connection_file).decode()},
    }


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference to ``kind``/``name``: the garbage collector deletes the owned object
    with its owner (and, with blockOwnerDeletion, before the owner's foreground deletion ends)."""
    return {
        "apiVersion": "v1",
        "kind": kind,
        "name": name,
        "uid": uid,
        "blockOwnerDeletion": True,
    }


def service_manifest(
    name: str, namespace: str, labels: Mapping[str, str], annotations: Mapping[str, str]
) -> dict[str, Any]:
    """The kernel's stable address: a ClusterIP Service selecting the pod of the kernel
    ``labels[KERNEL_LABEL]`` names, whichever pod that is (a restart makes a new pod, with a new
    pod address; clients, Jupyter Server's among them, keep connecting to this one)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": dict(annotations),  # the owner record, for the orphan sweep
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {KERNEL_LABEL: labels[KERNEL_LABEL]},
            "ports": [
                {
                    "name": port.replace("_port", ""),
                    "port": number,
                    "targetPort": number,
                    "protocol": "TCP",
                }
                for port, number in KERNEL_PORTS.items()
            ],
        },
    }


def network_policy_manifest(request: PodRequest) -> dict[str, Any]:
    """Deny all egress (but ``egress_to``: the egress proxy), and all ingress but the owner's
    to the kernel's ports.

    Enforced only by a network plugin that implements NetworkPolicy (docs/kubernetes.md).
    """
    ingress: list[dict[str, Any]] = []
    if request.ingress_from:
        ingress.append(
            {
                "from": [dict(peer) for peer in request.ingress_from],
                "ports": [{"protocol": "TCP", "port": p} for p in KERNEL_PORTS.values()],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": request.metadata(annotations=dict(request.annotations)),
        "spec": {
            "podSelector": {"matchLabels": request.selector},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": [dict(rule) for rule in request.egress_to],
        },
    }


def ingress_peers(addresses: Sequence[str], pod_labels: Mapping[str, str]) -> tuple[dict, ...]:
    """NetworkPolicy peers for the owner: its addresses (/32 each) and/or its pods' labels."""
    peers: list[dict[str, Any]] = [
        {"ipBlock": {"cidr": a if "/" in a else f"{a}/32"}} for a in addresses
    ]
    if pod_labels:
        peers.append({"podSelector": {"matchLabels": dict(pod_labels)}})
    return tuple(peers)

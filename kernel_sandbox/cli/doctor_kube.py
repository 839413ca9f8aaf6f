"""``doctor``'s checks for kernelspecs whose policy says ``backend: kubernetes``: for each
cluster and namespace they name, that the API server answers, that these credentials hold
the rights a start needs (a SelfSubjectAccessReview per verb), and what the namespace's
NetworkPolicies are, with the warning that enforcing them is the network plugin's job; and
for pods that use the owner's egress proxy or data broker, the address they reach it at.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from kernel_sandbox.cli.checks import FAIL, OK, WARN, Check
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.kube.api import NETWORK_POLICIES, KubeApi

__all__ = [
    "NEEDED_RIGHTS",
    "check_kube",
    "kube_kernelspecs",
    "kube_targets",
    "owner_address_checks",
]

# (verb, resource, API group) a kernel's start, stop and the orphan sweep use.
NEEDED_RIGHTS = (
    ("create", "pods", ""),
    ("get", "pods", ""),
    ("list", "pods", ""),
    ("delete", "pods", ""),
    ("get", "pods/log", ""),
    ("create", "secrets", ""),
    ("patch", "secrets", ""),
    ("list", "secrets", ""),
    ("delete", "secrets", ""),
    ("create", "services", ""),
    ("list", "services", ""),
    ("delete", "services", ""),
    ("create", "networkpolicies", "networking.k8s.io"),
    ("patch", "networkpolicies", "networking.k8s.io"),
    ("list", "networkpolicies", "networking.k8s.io"),
    ("delete", "networkpolicies", "networking.k8s.io"),
)
ROLE_HINT = "apply deploy/kubernetes/role.yaml and bind it (see docs/kubernetes.md)"


def kube_kernelspecs(config: Config) -> Iterator[tuple[str, Any, Any]]:
    """(name, provisioner, policy) of each sandboxed kernelspec whose kernels are pods."""
    from kernel_sandbox.policy.effective import is_sandboxed, provisioner_for

    manager = KernelSpecManager()
    for name in sorted(manager.find_kernel_specs()):
        try:
            spec = manager.get_kernel_spec(name)
            if not is_sandboxed(spec):
                continue
            prov = provisioner_for(spec, config)
            policy, _ = prov.resolve_policy()
        except Exception:  # a broken kernelspec: check_kernelspecs reports it
            continue
        if policy.backend == "kubernetes":
            yield name, prov, policy


def kube_targets(config: Config) -> dict[tuple[str, str, str, Any], list[str]]:
    """(kubeconfig, context, namespace, in_cluster) -> the kernelspecs that start pods there."""
    targets: dict[tuple[str, str, str, Any], list[str]] = {}
    for name, prov, _policy in kube_kernelspecs(config):
        key = (prov.kube_config, prov.kube_context, prov.kube_namespace, prov.kube_in_cluster)
        targets.setdefault(key, []).append(name)
    return targets


def _has_default_deny(policies: list[dict[str, Any]]) -> bool:
    """A policy selecting every pod (or every kernel pod) with Egress and no egress rule."""
    for policy in policies:
        spec = policy.get("spec") or {}
        selector = spec.get("podSelector") or {}
        labels = selector.get("matchLabels") or {}
        everyone = not labels and not selector.get("matchExpressions")
        kernels = labels == {"kernel-sandbox.io/managed": "true"}
        if (everyone or kernels) and "Egress" in (spec.get("policyTypes") or []):
            if not spec.get("egress"):
                return True
    return False


async def check_target(api: KubeApi, specs: list[str]) -> list[Check]:
    where = f"namespace {api.namespace}"
    area = "kubernetes"
    try:
        host = api.host
        rights = [(v, r, g, await api.access(v, r, g)) for v, r, g in NEEDED_RIGHTS]
    except SandboxError as exc:
        return [Check(area, "api server", FAIL, f"{where} (for {', '.join(specs)}): {exc}")]
    checks = [Check(area, "api server", OK, f"{host}, {where}, for {', '.join(specs)}")]
    missing = [f"{v} {r}" for v, r, _g, (allowed, _why) in rights if not allowed]
    if missing:
        checks.append(
            Check(area, "rights", FAIL, f"{where}: may not {', '.join(missing)}", ROLE_HINT)
        )
    else:
        checks.append(
            Check(area, "rights", OK, f"{where}: pods, services, secrets, networkpolicies")
        )
    try:
        policies = await api.list(NETWORK_POLICIES, "")
    except SandboxError as exc:
        policies = []
        checks.append(Check(area, "networkpolicy", FAIL, f"{where}: cannot list: {exc}"))
    own = [
        p for p in policies if (p["metadata"].get("labels") or {}).get("kernel-sandbox.io/managed")
    ]
    others = len(policies) - len(own)
    if _has_default_deny(policies):
        checks.append(
            Check(
                area,
                "networkpolicy",
                OK,
                f"{where}: a default deny of egress, {len(own)} kernel policies",
            )
        )
    else:
        checks.append(
            Check(
                area,
                "networkpolicy",
                WARN,
                f"{where}: no namespace-wide default deny of egress ({others} other policies); "
                "each kernel pod gets its own at start",
                "apply deploy/kubernetes/default-deny.yaml",
            )
        )
    checks.append(
        Check(
            area,
            "enforcement",
            WARN,
            "NetworkPolicy is enforced by the cluster's network plugin (Calico, Cilium, "
            "kube-router, ...), not by kernel-sandbox: without one, kernel pods can reach the "
            "network whatever the policies say",
            "check the plugin, e.g. a pod's connection out is refused (docs/kubernetes.md)",
        )
    )
    return checks


def owner_address_checks(config: Config) -> list[Check]:
    """For each kernelspec whose pods use the owner's egress proxy or data broker: the address
    they would be served at (``kube_egress_address``) is one this host has, or 'auto' can
    find one (docs/kubernetes.md#egress-and-data-the-owners-services-over-the-pod-network)."""
    import socket

    checks: list[Check] = []
    for name, prov, policy in kube_kernelspecs(config):
        if policy.network == "none" and not policy.datasets:
            continue
        setting = prov.kube_egress_address
        if setting and setting != "auto":
            try:
                with socket.create_server((setting, 0)):
                    pass
            except OSError as exc:
                checks.append(
                    Check(
                        "kubernetes",
                        "egress address",
                        FAIL,
                        f"{name}: kube_egress_address {setting} cannot be listened on here: "
                        f"{exc.strerror or exc}",
                        "an address of this host that pods reach (e.g. its pod-bridge address)",
                    )
                )
                continue
            how = f"at {setting}"
        elif prov.kube_owner_pod:
            how = f"at the address of the owner pod {prov.kube_owner_pod}"
        elif prov.kube_service:
            how = "at this host's source address toward each kernel's Service"
        else:
            checks.append(
                Check(
                    "kubernetes",
                    "egress address",
                    FAIL,
                    f"{name}: no address for its pods' egress proxy and data broker",
                    "set kube_egress_address (or kube_owner_pod, or kube_service True)",
                )
            )
            continue
        checks.append(
            Check(
                "kubernetes",
                "egress address",
                OK,
                f"{name}: its pods reach their egress proxy and data broker {how} (TLS, "
                "pinned); the pods' NetworkPolicies allow only that",
            )
        )
    return checks


async def check_kube(config: Config) -> list[Check]:
    """The checks of every cluster and namespace a kernelspec starts pods in ([] for none)."""
    checks: list[Check] = owner_address_checks(config)
    for (config_file, context, namespace, in_cluster), specs in kube_targets(config).items():
        api = KubeApi(namespace, config_file, context, in_cluster, timeout=5.0)
        try:
            checks += await check_target(api, specs)
        finally:
            api.close()
    from kernel_sandbox.cli.doctor_kube_seccomp import check_seccomp

    return checks + check_seccomp(config)

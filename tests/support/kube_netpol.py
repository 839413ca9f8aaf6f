"""A stand-in NetworkPolicy controller for the test cluster: the cluster's job, done by hand.

The 1.20 test cluster (``.ci/k8s``) accepts NetworkPolicy objects but nothing enforces them:
no policy-capable network plugin (Calico, Cilium, kube-router...) can be installed on these
machines. A real controller watches NetworkPolicies and pods and programs the node's packet
filter; ``PolicyEnforcer.sync`` does the same once, on demand, with iptables, so a test can
show what a policy *would* block on a cluster that enforces it. It is not part of
kernel_sandbox and proves nothing about a production cluster's plugin.

What it understands (anything else raises ``NotImplementedError``, never a silent allow):
policies selecting pods by ``podSelector.matchLabels``; ``policyTypes`` Egress and Ingress;
rules whose peers are ``ipBlock.cidr`` (no ``except``) or a ``podSelector.matchLabels`` in the
policy's namespace, with optional TCP/UDP ``ports`` (numbers). As in Kubernetes: a pod selected
by no policy of a type is unrestricted for that type; selected pods allow the union of their
policies' rules; replies to allowed connections pass (conntrack ESTABLISHED,RELATED).

Chains (filter table): ``KS-NETPOL`` jumped to first from FORWARD (pod to pod, through bridge
netfilter), INPUT (pod to this host) and OUTPUT (this host to pods); ``.ci/k8s/down.sh``
removes any left behind.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from kubernetes import client

CHAIN = "KS-NETPOL"
HOOKS = ("FORWARD", "INPUT", "OUTPUT")


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, check=check)


def _match_labels(selector: client.V1LabelSelector | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if selector.match_expressions:
        raise NotImplementedError("podSelector.matchExpressions is not emulated")
    return all(labels.get(k) == v for k, v in (selector.match_labels or {}).items())


@dataclass
class _Allow:
    cidr: str  # a pod's /32 or an ipBlock
    protocol: str | None = None
    port: int | None = None


@dataclass
class _PodRules:
    ip: str
    egress: list[_Allow] | None = None  # None: no Egress policy selects the pod
    ingress: list[_Allow] | None = None
    policies: list[str] = field(default_factory=list)


class PolicyEnforcer:
    """Program iptables for a namespace's NetworkPolicies, as a policy controller would."""

    def __init__(self, core: client.CoreV1Api, networking: client.NetworkingV1Api) -> None:
        self.core = core
        self.networking = networking

    def sync(self, namespace: str) -> dict[str, list[str]]:
        """Replace the rules with those for ``namespace``'s current policies and pods.

        Returns pod name -> names of the policies that select it. Pods must have an IP."""
        pods = self.core.list_namespaced_pod(namespace).items
        policies = self.networking.list_namespaced_network_policy(namespace).items
        rules: dict[str, _PodRules] = {}
        for pod in pods:
            if not pod.status.pod_ip:
                raise RuntimeError(f"pod {namespace}/{pod.metadata.name} has no IP yet")
            rules[pod.metadata.name] = _PodRules(pod.status.pod_ip)
        for policy in policies:
            types = policy.spec.policy_types or ["Ingress"]
            selected = [
                p for p in pods if _match_labels(policy.spec.pod_selector, p.metadata.labels or {})
            ]
            for pod in selected:
                r = rules[pod.metadata.name]
                r.policies.append(policy.metadata.name)
                if "Egress" in types:
                    r.egress = (r.egress or []) + self._allows(policy.spec.egress, "to", pods)
                if "Ingress" in types:
                    r.ingress = (r.ingress or []) + self._allows(policy.spec.ingress, "_from", pods)
        self._program(rules.values())
        return {name: r.policies for name, r in rules.items()}

    def clear(self) -> None:
        """Remove every rule this enforcer programmed (idempotent)."""
        for hook in HOOKS:
            while _iptables("-D", hook, "-j", CHAIN, check=False).returncode == 0:
                pass
        _iptables("-F", CHAIN, check=False)
        _iptables("-X", CHAIN, check=False)

    @staticmethod
    def _allows(rule_list: list | None, peers_attr: str, pods: list[client.V1Pod]) -> list[_Allow]:
        allows: list[_Allow] = []
        for rule in rule_list or ():
            peers = getattr(rule, peers_attr) or [None]  # no peers: any address
            ports = rule.ports or [None]
            for peer in peers:
                cidrs: list[str]
                if peer is None:
                    cidrs = ["0.0.0.0/0"]
                elif peer.namespace_selector is not None:
                    raise NotImplementedError("namespaceSelector peers are not emulated")
                elif peer.ip_block is not None:
                    if peer.ip_block._except:
                        raise NotImplementedError("ipBlock.except is not emulated")
                    cidrs = [peer.ip_block.cidr]
                else:
                    cidrs = [
                        f"{p.status.pod_ip}/32"
                        for p in pods
                        if p.status.pod_ip
                        and _match_labels(peer.pod_selector, p.metadata.labels or {})
                    ]
                for cidr in cidrs:
                    for port in ports:
                        if port is None:
                            allows.append(_Allow(cidr))
                        elif isinstance(port.port, int):
                            allows.append(_Allow(cidr, (port.protocol or "TCP").lower(), port.port))
                        else:
                            raise NotImplementedError("named ports are not emulated")
        return allows

    def _program(self, pods) -> None:
        self.clear()
        _iptables("-N", CHAIN)
        _iptables(
            "-A", CHAIN, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"
        )
        for r in pods:
            for direction, allows, me, peer in (
                ("egress", r.egress, "-s", "-d"),
                ("ingress", r.ingress, "-d", "-s"),
            ):
                if allows is None:
                    continue
                for a in allows:
                    spec = [me, f"{r.ip}/32", peer, a.cidr]
                    if a.protocol:
                        spec += ["-p", a.protocol, "--dport", str(a.port)]
                    _iptables("-A", CHAIN, *spec, "-j", "RETURN")
                comment = ["-m", "comment", "--comment", f"netpol {direction} deny {r.ip}"]
                _iptables(
                    "-A", CHAIN, me, f"{r.ip}/32", "-p", "tcp", *comment,
                    "-j", "REJECT", "--reject-with", "tcp-reset",
                )  # fmt: skip
                _iptables(
                    "-A", CHAIN, me, f"{r.ip}/32", *comment,
                    "-j", "REJECT", "--reject-with", "icmp-port-unreachable",
                )  # fmt: skip
        for hook in HOOKS:
            _iptables("-I", hook, "1", "-j", CHAIN)

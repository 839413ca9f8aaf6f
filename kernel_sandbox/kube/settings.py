"""The provisioner's Kubernetes settings (``c.DockerSandboxProvisioner.kube_*``): which cluster
and namespace, and how pods are made there. Used when the policy says ``backend: kubernetes``.
"""

from __future__ import annotations

from traitlets import Bool, Dict, Enum, Float, HasTraits, List, Unicode

__all__ = ["KubeSettings"]


class KubeSettings(HasTraits):
    """Where kernel pods go and how they are reached; the policy decides what they may do."""

    kube_namespace = Unicode(
        "default",
        config=True,
        help="Namespace the kernel pods, their Secrets and NetworkPolicies are made in (give "
        "it its own, with the Role of deploy/kubernetes/).",
    )
    kube_config = Unicode(
        "",
        config=True,
        help="Kubeconfig file with the credentials to use (empty: $KUBECONFIG or "
        "~/.kube/config, or the pod's service account when running in the cluster).",
    )
    kube_context = Unicode("", config=True, help="Context of the kubeconfig (empty: its current).")
    kube_in_cluster = Bool(
        None,
        allow_none=True,
        config=True,
        help="Use the pod's service account (True), a kubeconfig (False), or decide "
        "(None: the service account when in a pod and kube_config is empty).",
    )
    kube_image_pull_policy = Enum(
        ["IfNotPresent", "Never", "Always"],
        "IfNotPresent",
        config=True,
        help="The pods' imagePullPolicy (pre-pull the image on every node for fast starts).",
    )
    kube_runtime_classes = Dict(
        {"runsc": "gvisor"},
        config=True,
        help="RuntimeClass name for each policy runtime other than runc, e.g. "
        "{'runsc': 'gvisor', 'kata': 'kata'} (the untrusted profile asks for runsc).",
    )
    kube_request_ratio = Float(
        0.25,
        config=True,
        help="A pod's resource requests as a fraction of its policy limits (1.0: Guaranteed "
        "QoS, one kernel's limits reserved; lower: more kernels per node, overcommitted).",
    )
    kube_ingress_from = List(
        Unicode(),
        default_value=["auto"],
        config=True,
        help="Who may connect to a kernel's ports (its NetworkPolicy's ingress): CIDRs, or "
        "'auto' for the addresses this process reaches the pod and its Service from. All "
        "egress is denied.",
    )
    kube_owner_labels = Dict(
        config=True,
        help="Labels of the pods this owner runs in (a hub or sandbox service in the "
        "cluster): pods with them may connect to the kernel's ports too.",
    )
    kube_owner_pod = Unicode(
        "",
        config=True,
        help="Name of the pod this process runs in (in the cluster, e.g. from the downward "
        "API): made the owner of every kernel pod, so the cluster deletes them with it.",
    )
    kube_service = Bool(
        True,
        config=True,
        help="Give each kernel a ClusterIP Service, the address its clients connect to: it "
        "stays the same across restarts (a restart is a new pod with a new pod address). "
        "False: clients connect to the pod's own address (one object fewer per kernel).",
    )
    kube_egress_address = Unicode(
        "auto",
        config=True,
        help="Address the egress proxy of a `network: allowlist` pod listens on, which the "
        "pod connects to (its NetworkPolicy allows only it): 'auto' for the kube_owner_pod's "
        "address, else this host's source address toward the kernel's Service; or an address "
        "of this host that pods reach (e.g. its pod-bridge address).",
    )
    kube_seccomp_profile = Unicode(
        "RuntimeDefault",
        config=True,
        help="The pods' seccomp profile: 'RuntimeDefault' (the container runtime's default, "
        "which allows io_uring and ptrace), or the path, relative to the kubelet's seccomp "
        "root, of the project's profile installed on every node (Localhost), e.g. "
        "'kernel-sandbox/seccomp.json' (`kernel-sandbox kube seccomp-profile --install`).",
    )
    kube_api_timeout = Float(
        10.0, config=True, help="Seconds one request to the API server may take."
    )

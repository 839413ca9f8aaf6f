"""The Kubernetes backend's pure parts: pod, Secret and NetworkPolicy from a policy, the pod
status words, the transport's files. No cluster needed (tests/test_kube.py has the real one)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from kernel_sandbox.errors import PolicyError
from kernel_sandbox.kube.kernel import owner_record, unsupported
from kernel_sandbox.kube.podspec import (
    CONNECTION_FILE,
    KUBE_PREFIX,
    PodRequest,
    ingress_peers,
    label_value,
    network_policy_manifest,
    pod_manifest,
    runtime_class,
    secret_manifest,
)
from kernel_sandbox.kube.status import read_status, start_problem, timeout_message
from kernel_sandbox.kube.transport import (
    KERNEL_PORTS,
    client_connection,
    new_connection,
    pod_connection_file,
)
from kernel_sandbox.policy import PROFILES, SandboxPolicy, layer_policy

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def request(policy: SandboxPolicy | None = None, **changes) -> PodRequest:
    labels, annotations = owner_record(
        "0f9e8d7c-aaaa-bbbb-cccc-1234567890ab", "python3-sandbox", "strict"
    )
    values = dict(
        name="ks-0f9e8d7c-abc123",
        namespace="kernels",
        policy=policy or SandboxPolicy(),
        command=["python", "-m", "ipykernel_launcher", "-f", CONNECTION_FILE],
        env={"HOME": "/home/sandbox", "KERNEL_SANDBOX": "1"},
        labels=labels,
        annotations=annotations,
        user="1000:1000",
    )
    values.update(changes)
    return PodRequest(**values)


def test_the_pod_is_hardened_like_the_docker_container():
    pod = pod_manifest(request())
    spec = pod["spec"]
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] and ctx["runAsUser"] == 1000 and ctx["runAsGroup"] == 1000
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert not spec["hostNetwork"] and not spec["hostPID"] and not spec["hostIPC"]
    assert spec["restartPolicy"] == "Never"
    assert spec["dnsPolicy"] == "None" and spec["dnsConfig"] == {"nameservers": ["127.0.0.1"]}
    assert "runtimeClassName" not in spec
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_limits_requests_and_the_in_memory_scratch_come_from_the_policy():
    policy = SandboxPolicy.from_mapping(
        {"memory_limit": "2g", "cpu_limit": 1.5, "tmpfs_size": "64m"}
    )
    pod = pod_manifest(request(policy, request_ratio=0.5))
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {"memory": str(2 * 1024**3), "cpu": "1500m"}
    assert container["resources"]["requests"] == {"memory": str(1024**3), "cpu": "750m"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for name in ("tmp", "home"):
        assert volumes[name]["emptyDir"] == {"medium": "Memory", "sizeLimit": str(64 * 1024**2)}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/tmp"]["name"] == "tmp" and mounts["/home/sandbox"]["name"] == "home"


def test_no_host_path_but_the_policys_own_mounts(tmp_path):
    assert not [v for v in pod_manifest(request())["spec"]["volumes"] if "hostPath" in v]
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "out").mkdir()
    policy = SandboxPolicy.from_mapping({"mounts": [f"{data}:/data:ro", f"{tmp_path}/out:/out:rw"]})
    pod = pod_manifest(request(policy))
    host = [v for v in pod["spec"]["volumes"] if "hostPath" in v]
    assert [v["hostPath"]["path"] for v in host] == [str(data), f"{tmp_path}/out"]
    (container,) = pod["spec"]["containers"]
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
    assert mounts["/data"] is True and mounts["/out"] is False


def test_the_mount_rules_still_refuse_host_secrets():
    with pytest.raises(PolicyError):
        SandboxPolicy.from_mapping({"mounts": ["/var/run/docker.sock:/sock"]})
    with pytest.raises(PolicyError):
        SandboxPolicy.from_mapping({"mounts": ["/etc:/etc2"]})


def test_the_untrusted_profile_asks_for_the_gvisor_runtime_class():
    policy, _ = layer_policy("untrusted", PROFILES, {}, {})
    klass = runtime_class(policy.runtime, {"runsc": "gvisor"})
    assert klass == "gvisor"
    assert (
        pod_manifest(request(policy, runtime_class=klass))["spec"]["runtimeClassName"] == "gvisor"
    )
    assert runtime_class("runc", {"runsc": "gvisor"}) is None
    with pytest.raises(PolicyError, match="kube_runtime_classes"):
        runtime_class("kata", {"runsc": "gvisor"})


def test_uid_0_is_refused():
    with pytest.raises(PolicyError, match="uid 0"):
        pod_manifest(request(user="0:0"))


def test_the_secrets_travel_only_in_the_secret():
    info = new_connection("python3")
    body = pod_connection_file(info)
    req = request()
    pod_text = json.dumps(pod_manifest(req))
    for secret in (info["key"].decode(), info["curve_secretkey"]):
        assert secret not in pod_text
    secret = secret_manifest(req, body)
    assert secret["metadata"]["name"] == req.name and secret["type"] == "Opaque"
    carried = json.loads(base64.b64decode(secret["data"]["connection.json"]))
    assert carried["key"] == info["key"].decode()
    assert carried["curve_secretkey"] == info["curve_secretkey"]
    volume = next(v for v in pod_manifest(req)["spec"]["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": req.name, "defaultMode": 0o440}


def test_each_kernel_gets_its_own_keys_and_the_pod_binds_every_address():
    one, two = new_connection("python3"), new_connection("python3")
    assert one["key"] != two["key"] and one["curve_secretkey"] != two["curve_secretkey"]
    assert len(one["curve_publickey"]) == 40 and len(one["curve_secretkey"]) == 40
    inside = json.loads(pod_connection_file(one))
    assert inside["ip"] == "0.0.0.0" and inside["transport"] == "tcp"
    assert {k: inside[k] for k in KERNEL_PORTS} == KERNEL_PORTS
    assert client_connection(one, "10.244.0.7")["ip"] == "10.244.0.7"


def test_the_network_policy_denies_egress_and_admits_only_the_owner():
    req = request(ingress_from=ingress_peers(["10.244.0.1"], {}))
    policy = network_policy_manifest(req)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == []
    assert spec["podSelector"] == {"matchLabels": {KUBE_PREFIX + "pod": req.name}}
    (rule,) = spec["ingress"]
    assert rule["from"] == [{"ipBlock": {"cidr": "10.244.0.1/32"}}]
    assert sorted(p["port"] for p in rule["ports"]) == sorted(KERNEL_PORTS.values())
    assert network_policy_manifest(request())["spec"]["ingress"] == []  # nobody, until patched
    peers = ingress_peers([], {"app": "jupyterhub"})
    assert peers == ({"podSelector": {"matchLabels": {"app": "jupyterhub"}}},)


def test_labels_are_valid_label_values_and_the_owner_record_is_exact():
    req = request()
    pod = pod_manifest(req)
    for key, value in pod["metadata"]["labels"].items():
        assert key.startswith(KUBE_PREFIX) and LABEL_VALUE.match(value), (key, value)
        assert len(value) <= 63
    notes = pod["metadata"]["annotations"]
    assert notes[KUBE_PREFIX + "kernel-id"] == "0f9e8d7c-aaaa-bbbb-cccc-1234567890ab"
    assert notes[KUBE_PREFIX + "owner-pid"].isdigit() and notes[KUBE_PREFIX + "owner-start"]
    assert label_value("-Weird host:name/x_" + "y" * 80).startswith("Weird-host-name-x_y")
    assert LABEL_VALUE.match(label_value("_a:b_"))


def test_policy_keys_the_pod_backend_cannot_honour_are_named():
    assert unsupported(SandboxPolicy()) == []
    policy = SandboxPolicy.from_mapping({"network": "allowlist", "egress": ["api.corp.test"]})
    assert unsupported(policy) == []  # the owner's proxy serves pods too (kube/egress.py)
    assert "pool_size" in unsupported(SandboxPolicy.from_mapping({"pool_size": 2}))[0]
    assert SandboxPolicy.from_mapping({"backend": "kubernetes"}).backend == "kubernetes"
    with pytest.raises(PolicyError, match="backend"):
        SandboxPolicy.from_mapping({"backend": "nomad"})


def pod(status: dict, meta: dict | None = None) -> dict:
    return {"metadata": meta or {"uid": "u1"}, "spec": {"nodeName": "vm"}, "status": status}


def test_a_pod_that_cannot_pull_its_image_is_a_clear_error_at_once():
    waiting = {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}
    state = read_status(pod({"phase": "Pending", "containerStatuses": [{"state": waiting}]}))
    problem = start_problem("ks-1", "kernel-sandbox/python:nope", state)
    assert problem and "ErrImageNeverPull" in problem and "kernel-sandbox/python:nope" in problem
    assert "kube_image_pull_policy" in problem


def test_an_unschedulable_pod_waits_then_says_why():
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient memory.",
    }
    state = read_status(pod({"phase": "Pending", "conditions": [condition]}))
    assert start_problem("ks-1", "img", state) is None  # an autoscaler may still add a node
    message = timeout_message("ks-1", "img", state, 60)
    assert "Insufficient memory" in message and "launch_timeout" in message


def test_a_kernel_that_ends_while_starting_shows_its_last_lines():
    ended = {"terminated": {"exitCode": 1, "reason": "Error"}}
    state = read_status(pod({"phase": "Failed", "containerStatuses": [{"state": ended}]}))
    problem = start_problem("ks-1", "img", state, "a\nModuleNotFoundError: ipykernel\n")
    assert problem and "exit status 1" in problem and "ModuleNotFoundError" in problem
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    state = read_status(pod({"phase": "Failed", "containerStatuses": [{"state": oom}]}))
    assert state.oom_killed and "out of memory" in (start_problem("ks-1", "img", state) or "")
    assert read_status(None).ended


def test_a_running_pod_is_not_a_problem():
    state = read_status(
        pod(
            {
                "phase": "Running",
                "podIP": "10.244.0.9",
                "containerStatuses": [{"state": {"running": {}}}],
            }
        )
    )
    assert state.running and state.pod_ip == "10.244.0.9" and not state.ended
    assert start_problem("ks-1", "img", state) is None


def test_the_kernels_service_selects_its_pods_across_restarts():
    from kernel_sandbox.kube.podspec import KERNEL_LABEL, service_manifest

    req = request(labels={**request().labels, KERNEL_LABEL: "abc123def456"})
    service = service_manifest("ks-abc123def456", "kernels", req.labels, req.annotations)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == {KERNEL_LABEL: "abc123def456"}  # not the pod's name
    assert sorted(p["port"] for p in service["spec"]["ports"]) == sorted(KERNEL_PORTS.values())
    assert service["metadata"]["annotations"][KUBE_PREFIX + "owner-pid"].isdigit()
    assert pod_manifest(req)["metadata"]["labels"][KERNEL_LABEL] == "abc123def456"


def test_the_kernel_reads_a_private_copy_of_the_secrets_file():
    from kernel_sandbox.kube.podspec import SECRET_FILE, with_secret_copy

    argv = with_secret_copy(["python", "-m", "ipykernel_launcher", "-f", CONNECTION_FILE])
    assert argv[:2] == ["python", "-c"] and argv[3:5] == [SECRET_FILE, CONNECTION_FILE]
    mounts = {
        m["mountPath"]: m for m in pod_manifest(request())["spec"]["containers"][0]["volumeMounts"]
    }
    assert CONNECTION_FILE.rsplit("/", 1)[0] in mounts  # a small in-memory volume of its own


def test_every_object_carries_the_owner_record_for_the_sweep():
    req = request()
    info = new_connection("python3")
    for obj in (
        pod_manifest(req),
        secret_manifest(req, pod_connection_file(info)),
        network_policy_manifest(req),
    ):
        notes = obj["metadata"]["annotations"]
        assert notes[KUBE_PREFIX + "owner-pid"].isdigit() and notes[KUBE_PREFIX + "owner-host"]

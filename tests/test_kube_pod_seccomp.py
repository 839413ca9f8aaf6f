"""The project's seccomp profile on pods (``kube_seccomp_profile``): the pod field it becomes,
the file ``kernel-sandbox kube seccomp-profile`` prints and installs (the Docker path's own),
and, against the test cluster, a pod whose node lacks the profile failing at once with the
kubelet's reason. The probes that the profile makes hold (io_uring, ptrace) run in a pod in
tests/test_kube_containment.py."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from jupyter_client.manager import KernelManager
from support import REPO
from support.kernels import jupyter_kernels_dir, make_kernelspec, run_cell
from test_kube import kube_spec, wait_gone

from kernel_sandbox.cli import main
from kernel_sandbox.errors import KernelStartError, PolicyError
from kernel_sandbox.kube.api import KubeApi
from kernel_sandbox.kube.podspec import PodRequest, pod_manifest
from kernel_sandbox.kube.seccomp import (
    LOCALHOST_PROFILE,
    install_profile,
    pod_seccomp,
    profile_text,
)
from kernel_sandbox.policy.model import SandboxPolicy

DOCKER_PROFILE = REPO / "kernel_sandbox" / "engine" / "seccomp.json"  # the Docker path's


def _request(**extra) -> PodRequest:
    return PodRequest(
        name="ks-x",
        namespace="ns",
        policy=SandboxPolicy(),
        command=["python"],
        env={},
        labels={},
        annotations={},
        user="1000:1000",
        **extra,
    )


def test_the_default_is_the_runtime_default():
    assert pod_seccomp("RuntimeDefault", "kernel-sandbox") == {"type": "RuntimeDefault"}
    spec = pod_manifest(_request())["spec"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_a_localhost_profile_goes_on_the_pod_and_its_container():
    seccomp = pod_seccomp(LOCALHOST_PROFILE, "kernel-sandbox")
    assert seccomp == {"type": "Localhost", "localhostProfile": "kernel-sandbox/seccomp.json"}
    spec = pod_manifest(_request(seccomp=seccomp))["spec"]
    assert spec["securityContext"]["seccompProfile"] == seccomp
    assert spec["containers"][0]["securityContext"]["seccompProfile"] == seccomp


def test_a_policy_asking_for_the_engine_default_gets_the_runtime_default():
    assert pod_seccomp(LOCALHOST_PROFILE, "docker-default") == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("bad", ["", "/var/lib/kubelet/seccomp/x.json", "../x.json", "a/../../b"])
def test_a_path_the_api_server_would_refuse_is_a_policy_error(bad):
    with pytest.raises(PolicyError, match="kube_seccomp_profile"):
        pod_seccomp(bad, "kernel-sandbox")


def test_the_printed_profile_is_the_docker_paths_own(capsys):
    assert main(["kube", "seccomp-profile"]) == 0
    assert capsys.readouterr().out == DOCKER_PROFILE.read_text() == profile_text()


def test_install_writes_the_same_file_below_the_root(tmp_path, capsys):
    assert main(["kube", "seccomp-profile", "--install", "--root", str(tmp_path)]) == 0
    written = tmp_path / LOCALHOST_PROFILE
    assert written.read_bytes() == DOCKER_PROFILE.read_bytes()
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert main(["kube", "seccomp-profile", "--install", "--root", str(tmp_path), "--name", "/x"])
    assert "kube_seccomp_profile" in capsys.readouterr().err


def test_doctor_says_which_profile_pods_get_and_checks_this_nodes_copy(tmp_path):
    from traitlets.config import Config

    from kernel_sandbox.cli.checks import FAIL, OK, WARN
    from kernel_sandbox.cli.doctor_kube_seccomp import check_seccomp

    pods = {"backend": "kubernetes", "kube_namespace": "ns"}
    default = make_kernelspec(f"kube-rd-{uuid.uuid4().hex[:6]}", pods)
    local = make_kernelspec(
        f"kube-lh-{uuid.uuid4().hex[:6]}", {**pods, "kube_seccomp_profile": LOCALHOST_PROFILE}
    )

    def status(root) -> dict[str, str]:
        checks = check_seccomp(Config(), str(root))
        return {
            name: check.status
            for check in checks
            for name in (default, local)
            if name in check.detail
        }

    node = tmp_path / "seccomp"
    try:
        assert status(tmp_path / "no-node") == {default: WARN, local: OK}  # not a node
        node.mkdir()
        assert status(node) == {default: WARN, local: FAIL}  # this node lacks it
        install_profile(str(node))
        assert status(node) == {default: WARN, local: OK}
        (node / LOCALHOST_PROFILE).write_text("{}")
        assert status(node)[local] == FAIL  # an old or foreign copy
    finally:  # other tests' ps, stop, gc would look for these pods' cluster
        for name in (default, local):
            shutil.rmtree(jupyter_kernels_dir() / name)


# -- against the test cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def kube(kube_cluster):
    api = KubeApi(kube_cluster.namespace, str(kube_cluster.kubeconfig))
    yield api
    api.close()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_profile_the_node_lacks_fails_the_start_at_once(kube_cluster, kube):
    missing = f"kernel-sandbox/missing-{uuid.uuid4().hex[:8]}.json"
    km = KernelManager(kernel_name=kube_spec(kube_cluster, kube_seccomp_profile=missing))
    started = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        km.start_kernel()
    took = time.monotonic() - started
    print(f"a start under a profile the node lacks failed in {took:.2f}s")
    message = str(info.value)
    assert "cannot load seccomp profile" in message and missing in message, message
    assert "kernel-sandbox kube seccomp-profile --install" in message
    assert took < km.provisioner.launch_timeout, took  # the kubelet's reason, not the timeout
    wait_gone(kube, km.kernel_id)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_kernel_runs_under_the_installed_profile(kube_cluster):
    if kube_cluster.managed:
        install_profile()
    km = KernelManager(kernel_name=kube_spec(kube_cluster, kube_seccomp_profile=LOCALHOST_PROFILE))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        code = "print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])"
        out = run_cell(kc, code)
        assert out["stdout"].strip() == "2"  # a filter is on (its calls: the containment probes)
        pod = kube_cluster.core().read_namespaced_pod(
            km.provisioner.kube.pod_name, kube_cluster.namespace
        )
        profile = pod.spec.security_context.seccomp_profile
        assert (profile.type, profile.localhost_profile) == ("Localhost", LOCALHOST_PROFILE)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

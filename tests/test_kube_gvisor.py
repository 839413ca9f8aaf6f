"""The ``untrusted`` profile on Kubernetes: a kernel pod under gVisor, with the pod probes.

``runtime: runsc`` (the untrusted profile) makes the pod ask for ``runtimeClassName: gvisor``
(``kube_runtime_classes``). On a real cluster that RuntimeClass's handler is containerd's runsc
shim; on the test cluster the patched dockershim (``.ci/k8s/dockershim-runtime-handler.patch``)
runs the pod's containers under Docker's ``runsc`` runtime, beside a runc pause container whose
network namespace they join, and ``.ci/k8s/up.sh`` makes the RuntimeClass. The kernel then
talks to gVisor's kernel, not the node's: the first test checks that, and the containment
probes of ``test_kube_containment`` run again in that pod. A RuntimeClass the cluster lacks
fails the start with its name, within the launch timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from jupyter_client.manager import KernelManager
from security.battery import PRELUDE
from security.test_privilege import test_io_uring as _io_uring
from support.kernels import run_cell
from test_kube import kube_spec
from test_kube_containment import (  # the probes that apply to a pod, run here under gVisor
    PodSandbox,
    test_bpf,
    test_cap_net_raw,
    test_cap_sys_admin,
    test_cross_process_calls,
    test_hostname_is_not_the_hosts,
    test_kernel_modules,
    test_keyctl,
    test_mknod_reaches_no_device,
    test_mount_is_refused,
    test_no_docker_socket,
    test_packet_socket,
    test_perf_event_open,
    test_proc_sys_cannot_be_written,
    test_ptrace_of_pid1,
    test_raw_ip_socket,
    test_root_filesystem_is_read_only,
    test_setuid_binaries_gain_nothing,
    test_sys_cannot_be_written,
    test_unshare_gains_no_power,
)

from kernel_sandbox.errors import KernelStartError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

__all__ = [
    "test_bpf",
    "test_cap_net_raw",
    "test_cap_sys_admin",
    "test_cross_process_calls",
    "test_hostname_is_not_the_hosts",
    "test_kernel_modules",
    "test_keyctl",
    "test_mknod_reaches_no_device",
    "test_mount_is_refused",
    "test_no_docker_socket",
    "test_packet_socket",
    "test_perf_event_open",
    "test_proc_sys_cannot_be_written",
    "test_ptrace_of_pid1",
    "test_raw_ip_socket",
    "test_root_filesystem_is_read_only",
    "test_setuid_binaries_gain_nothing",
    "test_sys_cannot_be_written",
    "test_unshare_gains_no_power",
]


class GvisorPodSandbox(PodSandbox):
    runtime = "runsc"


@pytest.fixture(scope="module")
def sandbox(kube_cluster) -> Iterator[GvisorPodSandbox]:
    km = KernelManager(kernel_name=kube_spec(kube_cluster, profile="untrusted"))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        out = run_cell(kc, PRELUDE)
        assert out["status"] == "ok", out
        run_cell(kc, f"_PRELUDE = {PRELUDE!r}")
        yield GvisorPodSandbox(km, kc)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def runtime() -> str:
    return "runsc"


@pytest.fixture
def observe():
    def record(probe_id: str, text: str) -> None:
        print(f"{probe_id}: {text}")

    return record


def test_the_untrusted_pod_runs_on_gvisors_kernel(sandbox, kube_cluster):
    pod = kube_cluster.core().read_namespaced_pod(sandbox.container_id, kube_cluster.namespace)
    assert pod.spec.runtime_class_name == "gvisor"
    out = run_cell(
        sandbox.kc,
        "import os, platform\n"
        "print(platform.release())\n"
        "print(open('/proc/version').read().strip())",
    )
    assert out["status"] == "ok", out
    release, version = out["stdout"].splitlines()[:2]
    # gVisor's Sentry answers uname itself (a fixed 4.4.0); the node's kernel is another
    assert release != os.uname().release, f"the pod sees the node's kernel: {version}"
    assert release == "4.4.0", version


# Under the node's runc this does not hold with RuntimeDefault (test_kube_containment);
# gVisor's own kernel has no io_uring, as in the Docker path's runsc battery.
def test_io_uring_under_gvisor(sandbox, observe):
    _io_uring(sandbox, observe)


def test_a_runtime_class_the_cluster_lacks_fails_the_start_by_name(kube_cluster):
    spec = kube_spec(
        kube_cluster,
        profile="untrusted",
        kube_runtime_classes={"runsc": "no-such-class"},
    )
    km = KernelManager(kernel_name=spec)
    with pytest.raises(KernelStartError, match="no-such-class"):
        km.start_kernel()
    km.cleanup_resources()

"""The attack battery's containment probes that apply to a pod, run in a kernel pod.

The probe code is the battery's own (tests/security/), imported here with a ``sandbox`` of
this module: one kernel pod of the test cluster, started through the provisioner with
``backend: kubernetes``, the battery's prelude loaded in it. Left out: probes of the Docker
path's host side (runtime directory, lifeline, workspace, datasets, host listeners on the
Docker bridge, the host's own files), which a pod does not have. Every probe runs twice: in a
pod under ``RuntimeDefault`` (the runtime's default seccomp profile) and in one under the
project's own profile installed on the node as a ``Localhost`` profile
(``kube_seccomp_profile``). Two probes hold on the Docker path only because of the project's
profile: under ``RuntimeDefault`` they do not, and are marked so (strict: they fail the day
they hold); under the Localhost profile they hold. See docs/kubernetes.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.manager import KernelManager
from security.battery import PRELUDE, parse_report
from security.test_filesystem import (
    test_mknod_reaches_no_device,
    test_mount_is_refused,
    test_proc_sys_cannot_be_written,
    test_root_filesystem_is_read_only,
    test_sys_cannot_be_written,
)
from security.test_information import test_hostname_is_not_the_hosts, test_no_docker_socket
from security.test_network import test_name_resolution_has_nowhere_to_go as _dns
from security.test_network import (
    test_packet_socket,
    test_raw_ip_socket,
)
from security.test_privilege import (
    test_bpf,
    test_cap_net_raw,
    test_cap_sys_admin,
    test_cross_process_calls,
    test_kernel_modules,
    test_keyctl,
    test_perf_event_open,
    test_ptrace_of_pid1,
    test_setuid_binaries_gain_nothing,
    test_unshare_gains_no_power,
)
from security.test_privilege import test_io_uring as _io_uring
from security.test_privilege import test_ptrace_reaches_nothing_beyond_the_sandbox as _ptrace
from support.kernels import run_cell
from test_kube import kube_spec

from kernel_sandbox.kube.seccomp import LOCALHOST_PROFILE, install_profile

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

OBSERVED: dict[str, str] = {}


class PodSandbox:
    """The battery's ``sandbox`` for a kernel pod."""

    runtime = "runc"  # the node's default runtime (dockershim: runc)
    init = ("python",)  # PID 1 of the kernel's container: the kernel (no init in a pod)

    def __init__(self, km: Any, kc: Any, seccomp: str = "RuntimeDefault"):
        self.km, self.kc, self.seccomp = km, kc, seccomp

    @property
    def container_id(self) -> str:
        return str(self.km.provisioner.kube.pod_name)

    def probe(self, code: str, timeout: float = 60) -> dict[str, Any]:
        out = run_cell(self.kc, code, timeout=timeout)
        assert out["status"] == "ok", f"{out['ename']}: {out['evalue']}\n{out['stdout']}"
        return parse_report(out["stdout"])

    def describe(self) -> str:
        return f"pod {self.container_id} (seccomp {self.seccomp})"


@pytest.fixture(scope="module")
def node_profile(kube_cluster) -> str:
    """The project's profile on the node (the machine's own test cluster: installed here, as
    .ci/k8s/up.sh does; a cluster named by KERNEL_SANDBOX_KUBECONFIG must have it already)."""
    if kube_cluster.managed:
        install_profile()
    return LOCALHOST_PROFILE


@pytest.fixture(scope="module", params=["RuntimeDefault", "Localhost"])
def sandbox(request, kube_cluster) -> Iterator[PodSandbox]:
    profile = "RuntimeDefault"
    if request.param == "Localhost":
        profile = request.getfixturevalue("node_profile")
    km = KernelManager(kernel_name=kube_spec(kube_cluster, kube_seccomp_profile=profile))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out = run_cell(kc, PRELUDE)
        assert out["status"] == "ok", out
        run_cell(kc, f"_PRELUDE = {PRELUDE!r}")
        pod = kube_cluster.core().read_namespaced_pod(
            km.provisioner.kube.pod_name, kube_cluster.namespace
        )
        assert pod.spec.containers[0].security_context.seccomp_profile.type == request.param
        yield PodSandbox(km, kc, request.param)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def runtime() -> str:
    return "runc"


@pytest.fixture
def observe():
    def record(probe_id: str, text: str) -> None:
        OBSERVED[probe_id] = text
        print(f"{probe_id}: {text}")

    return record


# -- where a pod differs from the Docker path (strict: each fails the day it holds) -----------

RUNTIME_DEFAULT = (
    "RuntimeDefault is the runtime's default seccomp profile, which allows {}: the project's "
    "profile, installed on the node as a Localhost profile (kube_seccomp_profile), refuses it"
)


def _runtime_default_differs(request, sandbox, what: str) -> None:
    """Under RuntimeDefault the probe is an expected failure (strict); under the project's
    Localhost profile it must hold."""
    if sandbox.seccomp == "RuntimeDefault":
        request.applymarker(pytest.mark.xfail(strict=True, reason=RUNTIME_DEFAULT.format(what)))


def test_io_uring_in_a_pod(request, sandbox, observe):
    _runtime_default_differs(request, sandbox, "io_uring")
    _io_uring(sandbox, observe)


def test_ptrace_in_a_pod(request, sandbox, observe):
    _runtime_default_differs(request, sandbox, "ptrace of one's own child")
    _ptrace(sandbox, observe)


@pytest.mark.xfail(
    strict=True,
    reason="a pod has an interface (eth0): what it may reach is its NetworkPolicy's to say, "
    "enforced by the network plugin (tests/test_kube_netpol.py); the resolver part holds",
)
def test_name_resolution_in_a_pod(sandbox, observe):
    _dns(sandbox, observe)

"""A fork bomb in a kernel pod stops at the node's per-pod process limit.

Kubernetes has no per-pod ``pids_limit`` field: the kubelet's ``--pod-max-pids`` (the test
cluster's is 256, ``.ci/k8s/up.sh``) caps every pod's pids cgroup. Without it the bomb below
forks all its children; with it, ``fork`` fails with EAGAIN below the cap and the kernel,
its children killed, answers again.
"""

from __future__ import annotations

import pytest
from jupyter_client.manager import KernelManager
from support.kernels import run_cell
from test_kube import kube_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POD_MAX_PIDS = 256  # .ci/k8s/up.sh: the kubelet's --pod-max-pids

FORK_BOMB = """
import errno, os, signal, time
children, first_error = [], None
for _ in range(600):
    try:
        pid = os.fork()
    except OSError as exc:
        first_error = errno.errorcode.get(exc.errno, str(exc.errno))
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(len(children), first_error)
"""


def test_a_fork_bomb_stops_at_the_pod_process_limit(kube_cluster):
    km = KernelManager(kernel_name=kube_spec(kube_cluster))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out = run_cell(kc, FORK_BOMB, timeout=180)
        assert out["status"] == "ok", out
        forked, first_error = out["stdout"].split()
        assert first_error == "EAGAIN", f"forked {forked} children without a limit"
        assert int(forked) < POD_MAX_PIDS
        after = run_cell(kc, "print(6 * 7)")
        assert after["status"] == "ok" and after["stdout"].strip() == "42", after
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

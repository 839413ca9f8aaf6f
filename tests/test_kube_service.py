"""Who may start pods (issue 20): the sandbox service starts kernel pods for its callers.

A real ``kernel-sandbox serve`` (root) holds the only credentials: a kubeconfig, readable by
root alone, for a ServiceAccount bound to the shipped Role (deploy/kubernetes/role.yaml), not
the admin's. Real accounts (kstalice, kstbob; no kubeconfig, no docker group) start kernels
through it with a kernelspec saying ``backend: kubernetes``; the operator's rules cap the
pods' limits. The caller gets ipc sockets of its own, relayed by the service to the pod over
CurveZMQ, never a Curve key or the pod's address.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import IMAGE
from support import service as svc
from test_kube_rbac import RBAC, service_account_kubeconfig, shipped_role

from kernel_sandbox.kube.api import NETWORK_POLICIES, PODS, SERVICES, KubeApi
from kernel_sandbox.kube.kernel import source_address
from kernel_sandbox.kube.podspec import KUBE_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

A, B, C = "kstalice", "kstbob", "kstcarol"
SPEC = "kube-svc"
ORPHAN_TIMEOUT = 4.0

# Run as a user: start a kernel through the service, then obey lines on stdin: "run CODE"
# (JSON: the code; prints JSON: stdout of the cell), "input" (a cell reading input()),
# "quit". First prints the kernel id and the connection info the provisioner got.
CLIENT = """
import json, os, sys
import jupyter_client
km = jupyter_client.KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
info = dict(km.get_connection_info())
info["key"] = "(hidden)"
print(json.dumps({"kernel_id": km.kernel_id, "connection_info": info, "pid": os.getpid()}),
      flush=True)
def run(code, stdin=None):
    out = []
    def hook(m):
        if m["msg_type"] == "stream":
            out.append(m["content"]["text"])
        if m["msg_type"] == "error":
            out.append("ERROR " + m["content"]["ename"])
    kwargs = {}
    if stdin is not None:
        kwargs = {"allow_stdin": True, "stdin_hook": lambda msg: kc.input(stdin)}
    try:
        kc.execute_interactive(code, timeout=10, output_hook=hook, **kwargs)
    except TimeoutError:
        out.append("TIMEOUT")
    return "".join(out)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "run":
        print(json.dumps(run(json.loads(arg))), flush=True)
    elif cmd == "input":
        print(json.dumps(run("print('got', input('? '))", stdin=arg)), flush=True)
    elif cmd == "interrupt":
        import time
        msg_id = kc.execute("import time; time.sleep(60)")
        time.sleep(2)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        print(json.dumps(reply["content"].get("ename", reply["content"]["status"])), flush=True)
    elif cmd == "bench":
        import statistics, time
        times = []
        for _ in range(int(arg)):
            start = time.perf_counter()
            kc.execute("pass", reply=True, timeout=30)
            times.append(time.perf_counter() - start)
        print(json.dumps(statistics.median(times) * 1000), flush=True)
    elif cmd == "restart":
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=120)
        print(json.dumps("restarted"), flush=True)
    elif cmd == "quit":
        break
kc.stop_channels()
km.shutdown_kernel(now=True)
print(json.dumps("done"), flush=True)
"""

# Run as a user: one request to the service; print the reply (or the refusal).
ASK = """
import json, sys
from kernel_sandbox.service.protocol import call
from kernel_sandbox.errors import SandboxError
try:
    print(json.dumps({"ok": True, "reply": call(sys.argv[1], json.loads(sys.argv[2]), [])}))
except SandboxError as exc:
    print(json.dumps({"ok": False, "type": type(exc).__name__, "message": str(exc)}))
"""

POLICY = """
[everyone]
memory_limit = "256m"
cpu_limit = 0.5
max_kernels = 2

[user.kstbob]
max_kernels = 0

[user.kstcarol]
runtime = "runsc"
"""


class KubeService:
    def __init__(self, process: svc.ServiceProcess, kubeconfig: Path, namespace: str):
        self.process, self.kubeconfig, self.namespace = process, kubeconfig, namespace
        self.api = KubeApi(namespace, str(kubeconfig))

    @property
    def socket(self) -> str:
        return self.process.socket


@pytest.fixture(scope="module")
def kube_service(kube_cluster, test_users, kernel_image) -> Iterator[KubeService]:
    """The service, with a kubeconfig for a ServiceAccount bound to the shipped Role in the
    session's namespace (root-only), and a kernelspec ``kube-svc`` for every user."""
    ns = kube_cluster.namespace
    base = Path("/tmp") / f"kssk-{os.getpid()}"
    base.mkdir(mode=0o755, exist_ok=True)
    private = base / "kube"
    private.mkdir(mode=0o700, exist_ok=True)
    admin = KubeApi(ns, str(kube_cluster.kubeconfig))
    account = f"ks-svc-{uuid.uuid4().hex[:6]}"
    kubeconfig = service_account_kubeconfig(admin, account, private / "service.kubeconfig")
    kubeconfig.chmod(0o600)
    role = shipped_role()
    role["metadata"] = {"name": f"{account}-role", "namespace": ns}
    admin._request("role", "POST", RBAC.format(ns=ns, kind="roles"), body=role)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": account, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role[
            "metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
    }  # fmt: skip
    admin._request("binding", "POST", RBAC.format(ns=ns, kind="rolebindings"), body=binding)
    admin.close()
    spec_dir = test_users.base / "jupyter" / "kernels" / SPEC
    spec_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pod, through the service)",
        "language": "python",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": "docker-sandbox",
                "config": {"backend": "kubernetes", "image": IMAGE},
            }
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    (spec_dir / "kernel.json").chmod(0o644)
    process = svc.ServiceProcess(
        base,
        policy=base / "service.toml",
        orphan_timeout=ORPHAN_TIMEOUT,
        extra_args=(
            "--kube-config", str(kubeconfig),
            "--kube-namespace", ns,
            "--kube-image-pull-policy", "Never",
        ),
    )  # fmt: skip
    process.policy.write_text(POLICY)  # type: ignore[union-attr]
    process.start()
    service = KubeService(process, kubeconfig, ns)
    yield service
    process.stop()
    service.api.close()
    if process.log_path.exists():  # for a failure's post-mortem
        shutil.copy(process.log_path, Path("/tmp") / f"kssk-{os.getpid()}.log")
    shutil.rmtree(spec_dir, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


class Client:
    """A user's jupyter_client process holding one kernel through the service."""

    def __init__(self, users, user: str, service: KubeService):
        self.proc = users.popen_as(
            user, CLIENT, SPEC, env={"KERNEL_SANDBOX_SERVICE": service.socket}
        )
        first = self._line(180)
        self.kernel_id: str = first["kernel_id"]
        self.info: dict[str, Any] = first["connection_info"]
        self.pid: int = first["pid"]  # the client itself (proc is runuser, its parent)

    def _line(self, timeout: float = 90) -> Any:
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError("the client did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the client ended: {err[-4000:]}")
        return json.loads(line)

    def send(self, line: str, timeout: float = 90) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def run(self, code: str) -> str:
        return self.send("run " + json.dumps(code))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit", 60)
            except (AssertionError, OSError):
                pass
            self.proc.kill()
        self.proc.wait(10)


def pods_of(api: KubeApi, kernel_id: str) -> list[dict]:
    import asyncio

    pods = asyncio.run(api.list(PODS, f"{KUBE_PREFIX}kernel-id={kernel_id}"))
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def wait_no_pod(api: KubeApi, kernel_id: str, timeout: float) -> float:
    start = time.monotonic()
    while pods_of(api, kernel_id):
        assert time.monotonic() - start < timeout, f"the pod of {kernel_id} is still there"
        time.sleep(0.25)
    return time.monotonic() - start


def ask_as(users, user: str, service: KubeService, request: dict) -> dict:
    command = users.command(user, ASK, service.socket, json.dumps(request))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        Path(command[-3]).unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_a_user_runs_code_in_a_pod_capped_by_the_rules_and_gets_no_curve_key(
    kube_cluster, kube_service, test_users
):
    started = time.monotonic()
    client = Client(test_users, A, kube_service)
    print(f"a kernel pod through the service, ready in {time.monotonic() - started:.2f}s")
    try:
        info = client.info
        # ipc sockets of the caller's, relayed by the service: no Curve key, no address
        assert info["transport"] == "ipc"
        assert not any(k.startswith("curve") for k in info), info
        account = pwd.getpwnam(A)
        for port in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
            st = os.stat(f"{info['ip']}-{info[port]}")
            assert (st.st_uid, st.st_mode & 0o777) == (account.pw_uid, 0o600)
        # the code runs in the pod (its hostname, its uid), and input() reaches the caller
        out = client.run("import os, socket; print(socket.gethostname(), os.getuid())")
        assert out.split() == ["sandbox", "1000"], out
        assert client.send("input forty-two").strip() == "got forty-two"
        print(f"execute round trip through the service's relays: {client.send('bench 50'):.1f} ms")
        # the pod is in the namespace, with the ceilings of the operator's rules
        (pod,) = pods_of(kube_service.api, client.kernel_id)
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits == {"memory": str(256 * 1024**2), "cpu": "500m"}, limits
        labels = pod["metadata"]["labels"]
        assert labels[KUBE_PREFIX + "service"] == "true"
        assert labels[KUBE_PREFIX + "caller-uid"] == str(account.pw_uid)
        assert pod["metadata"]["annotations"][KUBE_PREFIX + "owner"] == A
        # its NetworkPolicy admits the service's addresses only (the caller has none of its own
        # to be admitted: it never reaches the pod)
        import asyncio

        netpol = asyncio.run(kube_service.api.get(NETWORK_POLICIES, pod["metadata"]["name"]))
        peers = netpol["spec"]["ingress"][0]["from"]
        admin = KubeApi(kube_service.namespace, str(kube_cluster.kubeconfig))
        service_ip = asyncio.run(admin.get(SERVICES, pod["metadata"]["name"][:15]))
        admin.close()
        targets = (pod["status"]["podIP"], service_ip["spec"]["clusterIP"])
        own = {f"{source_address(t)}/32" for t in targets}  # the service's, on this host
        assert {p["ipBlock"]["cidr"] for p in peers} == own, peers
        # `ps` through the service lists the pod to its owner
        listed = ask_as(test_users, A, kube_service, {"op": "list"})
        assert listed["ok"], listed
        (mine,) = [k for k in listed["reply"]["kernels"] if k["kernel_id"] == client.kernel_id]
        assert mine["container"] == f"pod/{pod['metadata']['name']}"
        assert mine["memory_limit"] == 256 * 1024**2
        # another user: cannot connect to the sockets, nor act on the kernel through the service
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1]); print('connected')\n"
            "except PermissionError:\n"
            "    print('refused')\n"
        )
        command = test_users.command(B, probe, f"{info['ip']}-{info['shell_port']}")
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
        assert result.stdout.strip() == "refused", result
        for op in ("poll", "adopt", "stop"):
            reply = ask_as(test_users, B, kube_service, {"op": op, "kernel_id": client.kernel_id})
            assert not reply["ok"] and reply["type"] == "NoSuchKernel", (op, reply)
        assert client.run("print('still mine')").strip() == "still mine"
        # stop through the service (its owner's `kernel-sandbox stop`): the pod is deleted
        stopped = ask_as(test_users, A, kube_service, {"op": "stop", "kernel_id": client.kernel_id})
        assert stopped["ok"], stopped
        took = wait_no_pod(kube_service.api, client.kernel_id, 60)
        print(f"stop through the service: pod gone after {took:.1f}s")
    finally:
        client.close()


def test_the_user_holds_no_credentials_and_the_api_refuses_anonymous_calls(
    kube_service, test_users
):
    check = (
        "import json, ssl, sys, urllib.request, urllib.error\n"
        "paths = sys.argv[2:]\n"
        "readable = []\n"
        "for p in paths:\n"
        "    try:\n"
        "        open(p).read(); readable.append(p)\n"
        "    except OSError:\n"
        "        pass\n"
        "ctx = ssl._create_unverified_context()\n"
        "body = json.dumps({'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': 'x'},\n"
        "    'spec': {'containers': [{'name': 'x', 'image': 'x'}]}}).encode()\n"
        "req = urllib.request.Request(sys.argv[1], data=body, method='POST',\n"
        "    headers={'Content-Type': 'application/json'})\n"
        "try:\n"
        "    urllib.request.urlopen(req, context=ctx, timeout=10); status = 201\n"
        "except urllib.error.HTTPError as exc:\n"
        "    status = exc.code\n"
        "print(json.dumps({'readable': readable, 'status': status}))\n"
    )
    config = yaml.safe_load(kube_service.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    url = f"{server}/api/v1/namespaces/{kube_service.namespace}/pods"
    admin = "/var/lib/kernel-sandbox/k8s/pki/admin.kubeconfig"
    command = test_users.command(A, check, url, str(kube_service.kubeconfig), admin)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["readable"] == []  # neither the service's kubeconfig nor the admin's
    assert seen["status"] in (401, 403), seen  # no pod without credentials
    home = Path(pwd.getpwnam(A).pw_dir)
    assert not (home / ".kube").exists()


def test_the_rules_refuse_a_pod_before_it_is_made(kube_service, test_users):
    request = {
        "op": "start",
        "kernel_id": f"probe-{secrets.token_hex(4)}",
        "kernelspec": {"name": SPEC, "argv": ["python", "-m", "ipykernel_launcher"]},
        "config": {"backend": "kubernetes", "image": IMAGE},
        "folders": [],
    }
    reply = ask_as(test_users, B, kube_service, request)
    assert not reply["ok"] and "max_kernels = 0" in reply["message"], reply
    request["config"] = {"backend": "kubernetes", "image": IMAGE, "memory_limit": "1g"}
    reply = ask_as(test_users, A, kube_service, request)  # over A's ceiling of 256m
    assert not reply["ok"] and "memory_limit" in reply["message"], reply
    assert not pods_of(kube_service.api, request["kernel_id"])


def test_the_caller_cannot_choose_the_cluster_or_namespace(kube_service, test_users):
    request = {
        "op": "start",
        "kernel_id": f"probe-{secrets.token_hex(4)}",
        "kernelspec": {"name": SPEC, "argv": ["python", "-m", "ipykernel_launcher"]},
        "config": {"backend": "kubernetes", "kube_namespace": "kube-system"},
        "folders": [],
    }
    reply = ask_as(test_users, A, kube_service, request)
    assert not reply["ok"] and "kube_namespace" in reply["message"], reply
    request["config"] = {"backend": "kubernetes", "kube_config": str(kube_service.kubeconfig)}
    reply = ask_as(test_users, A, kube_service, request)
    assert not reply["ok"] and "kube_config" in reply["message"], reply


def test_a_pod_dies_with_its_callers_server_and_survives_a_service_restart(
    kube_service, test_users
):
    client = Client(test_users, A, kube_service)
    try:
        (pod,) = pods_of(kube_service.api, client.kernel_id)
        assert client.run("x = 41; print(x + 1)").strip() == "42"
        # the service restarts (SIGKILL): the pod runs on and the new service adopts it; the
        # caller's sockets reconnect by themselves (output of a cell sent before its
        # subscription reached the kernel again is lost, as with containers: docs/service.md)
        kube_service.process.kill()
        kube_service.process.start()
        deadline = time.monotonic() + 60
        while True:
            out = client.run("print(x)")
            if out.strip() == "41" or time.monotonic() > deadline:
                break
        assert out.strip() == "41", out
        (again,) = pods_of(kube_service.api, client.kernel_id)
        assert again["metadata"]["name"] == pod["metadata"]["name"]
        # the caller's server dies: the pod is deleted after orphan_timeout
        os.kill(client.pid, signal.SIGKILL)
        client.proc.wait(10)
        took = wait_no_pod(kube_service.api, client.kernel_id, ORPHAN_TIMEOUT + 60)
        print(f"owner killed: pod gone after {took:.1f}s (orphan_timeout {ORPHAN_TIMEOUT}s)")
        assert took >= ORPHAN_TIMEOUT - 1
    finally:
        client.close()


def test_interrupt_restart_and_only_the_service_reaps_its_pods(
    kube_cluster, kube_service, test_users
):
    import asyncio

    from kernel_sandbox.kube.reap import sweep

    client = Client(test_users, A, kube_service)
    admin = KubeApi(kube_service.namespace, str(kube_cluster.kubeconfig))
    moved: list[tuple[Path, Path]] = []
    try:
        # interrupt: an interrupt_request the service sends on the pod's control channel
        assert client.send("interrupt", 60) == "KeyboardInterrupt"
        (pod,) = pods_of(kube_service.api, client.kernel_id)
        # restart: a new pod behind the same Service; the caller's sockets stay the same
        assert client.run("y = 1; print(y)").strip() == "1"
        assert client.send("restart", 180) == "restarted"
        (new,) = pods_of(kube_service.api, client.kernel_id)
        assert new["metadata"]["name"] != pod["metadata"]["name"]
        assert "NameError" in client.run("print(y)")
        assert client.run("print('after restart')").strip() == "after restart"
        # the service goes away: a direct-mode sweep (gc) on this host leaves its pod alone,
        # although the owner record names a dead process
        kube_service.process.kill()
        report = asyncio.run(sweep(admin))
        assert new["metadata"]["name"] not in report.pods
        assert pods_of(kube_service.api, client.kernel_id)
        # a restarted service without that kernel's record deletes the pod (no one else would)
        records = kube_service.process.base / "state" / "kernels"
        for record in records.glob("*.json"):
            aside = record.with_suffix(".aside")
            record.rename(aside)
            moved.append((aside, record))
        kube_service.process.start()
        took = wait_no_pod(kube_service.api, client.kernel_id, 60)
        print(f"unadopted pod reaped by the restarted service after {took:.1f}s")
    finally:
        for aside, record in moved:
            if aside.exists():
                aside.rename(record)
        client.close()
        admin.close()


def test_the_operators_runtime_pin_puts_a_callers_pod_under_gvisor(kube_service, test_users):
    """[user.kstcarol] runtime = "runsc": her plain (strict) kernelspec gets a gVisor pod."""
    client = Client(test_users, C, kube_service)
    try:
        (pod,) = pods_of(kube_service.api, client.kernel_id)
        assert pod["spec"].get("runtimeClassName") == "gvisor", pod["spec"]
        assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "500m"
        release = client.run("import platform; print(platform.release())").strip()
        assert release == "4.4.0" and release != os.uname().release, release  # gVisor's
    finally:
        client.close()


def test_a_service_that_starts_only_pods_needs_no_docker_engine(kube_service, test_users):
    """The service in the cluster has no Docker engine: with --kube-namespace it starts
    without one, and its callers' pod kernels work."""
    base = Path("/tmp") / f"kssn-{os.getpid()}"
    process = svc.ServiceProcess(
        base,
        policy=kube_service.process.policy,
        orphan_timeout=ORPHAN_TIMEOUT,
        extra_args=kube_service.process.extra_args,
    )
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = f"unix://{base}/no-docker.sock"
    try:
        process.start()
    finally:
        if old is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = old
    try:
        assert "only kernels with backend 'kubernetes' can start" in process.log_path.read_text()
        no_docker = KubeService(process, kube_service.kubeconfig, kube_service.namespace)
        client = Client(test_users, A, no_docker)
        try:
            assert client.run("print(6 * 7)").strip() == "42"
            assert pods_of(kube_service.api, client.kernel_id)
        finally:
            client.close()
        wait_no_pod(kube_service.api, client.kernel_id, 60)
        no_docker.api.close()
    finally:
        process.stop()
        shutil.rmtree(base, ignore_errors=True)

"""The shipped Role (deploy/kubernetes/role.yaml) against the real cluster's RBAC: a service
account holding only it starts, drives and shuts down a kernel pod and sweeps orphans, and
``doctor``'s checks say so; the same account without the binding is refused, and ``doctor``
names what is missing."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path

import pytest
import yaml
from jupyter_client.manager import KernelManager
from support import REPO
from support.kernels import run_cell
from test_kube import kube_spec, wait_gone

from kernel_sandbox.cli.checks import FAIL, OK
from kernel_sandbox.cli.doctor_kube import check_target
from kernel_sandbox.errors import EngineError
from kernel_sandbox.kube.api import KubeApi
from kernel_sandbox.kube.reap import sweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RBAC = "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/{kind}"


def shipped_role() -> dict:
    docs = list(yaml.safe_load_all((REPO / "deploy/kubernetes/role.yaml").read_text()))
    return next(d for d in docs if d and d["kind"] == "Role")


def service_account_kubeconfig(admin: KubeApi, name: str, path: Path) -> Path:
    """A kubeconfig with the token of service account ``name`` (1.20: its token Secret)."""
    ns = admin.namespace
    admin._request(
        "sa",
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )
    deadline = time.monotonic() + 60
    while True:
        account = admin._request("sa", "GET", f"/api/v1/namespaces/{ns}/serviceaccounts/{name}")
        if account.get("secrets"):
            break
        assert time.monotonic() < deadline, "the token controller made no token"
        time.sleep(0.5)
    secret = admin._request(
        "token", "GET", f"/api/v1/namespaces/{ns}/secrets/{account['secrets'][0]['name']}"
    )
    token = base64.b64decode(secret["data"]["token"]).decode()
    admin_config = yaml.safe_load(Path(admin.config_file).read_text())
    cluster = admin_config["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": cluster["name"], "user": name}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_shipped_role_is_enough_and_doctor_says_what_is_missing(kube_cluster, tmp_path):
    ns = kube_cluster.namespace
    admin = KubeApi(ns, str(kube_cluster.kubeconfig))
    account = f"ks-user-{uuid.uuid4().hex[:6]}"
    kubeconfig = service_account_kubeconfig(admin, account, tmp_path / "user.kubeconfig")
    user = KubeApi(ns, str(kubeconfig))
    try:
        # no binding yet: doctor fails naming the rights; a start is refused with the hint
        checks = asyncio.run(check_target(user, ["spec"]))
        rights = next(c for c in checks if c.name == "rights")
        assert rights.status == FAIL and "create pods" in rights.detail
        assert "deploy/kubernetes/role.yaml" in rights.fix
        km = KernelManager(kernel_name=kube_spec(kube_cluster, kube_config=str(kubeconfig)))
        with pytest.raises(EngineError, match="403") as refused:
            km.start_kernel()
        assert "deploy/kubernetes/" in str(refused.value)
        # the shipped Role, bound to the account
        role = shipped_role()
        role["metadata"] = {"name": f"{account}-role", "namespace": ns}
        admin._request("role", "POST", RBAC.format(ns=ns, kind="roles"), body=role)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": account, "namespace": ns},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": f"{account}-role",
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        }
        admin._request("binding", "POST", RBAC.format(ns=ns, kind="rolebindings"), body=binding)
        deadline = time.monotonic() + 30
        while True:  # RBAC caches: the binding takes effect within moments
            checks = asyncio.run(check_target(user, ["spec"]))
            rights = next(c for c in checks if c.name == "rights")
            if rights.status == OK or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rights.status == OK, rights.detail
        assert any(c.name == "enforcement" for c in checks)  # always warns: the plugin's job
        km = KernelManager(kernel_name=kube_spec(kube_cluster, kube_config=str(kubeconfig)))
        km.start_kernel()
        try:
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            assert run_cell(kc, "print(3 * 3)")["stdout"].strip() == "9"
            km.interrupt_kernel()
            kc.stop_channels()
            asyncio.run(sweep(user, dry_run=True))  # the sweep's lists are allowed
        finally:
            km.shutdown_kernel(now=True)
        wait_gone(admin, km.kernel_id)
    finally:
        user.close()
        admin.close()

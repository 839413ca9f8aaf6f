"""The only code that talks to the Kubernetes API server.

Thin on purpose: the ``kubernetes`` package (the ``kubernetes`` extra) only loads the
credentials (a kubeconfig, or the pod's service account in the cluster); the requests are plain
JSON over one ``requests`` session, so the objects sent are exactly the manifests of
:mod:`kernel_sandbox.kube.podspec`, whatever the server's version. Every call runs in a worker
thread, and every failure is translated here, once, into the :mod:`kernel_sandbox.errors` tree:
the server unreachable is :class:`EngineUnavailable`, a refusal (RBAC, a quota, a bad object)
is :class:`EngineError` with the server's status and message.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any
from urllib.parse import quote

import requests

from kernel_sandbox.errors import EngineError, EngineUnavailable

__all__ = ["KubeApi", "NETWORK_POLICIES", "PODS", "SECRETS", "SERVICES"]

PODS = "pods"
SECRETS = "secrets"
SERVICES = "services"
NETWORK_POLICIES = "networkpolicies"
_GROUP = {
    PODS: "/api/v1",
    SERVICES: "/api/v1",
    SECRETS: "/api/v1",
    NETWORK_POLICIES: "/apis/networking.k8s.io/v1",
}
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubeApi:
    """One namespace of one cluster, reached with one set of credentials.

    ``in_cluster``: None decides by itself (the service account's token when this process
    runs in a pod and no kubeconfig is named, else the kubeconfig).
    """

    def __init__(
        self,
        namespace: str,
        config_file: str = "",
        context: str = "",
        in_cluster: bool | None = None,
        timeout: float = 10.0,
    ):
        self.namespace = namespace
        self.config_file = config_file
        self.context = context
        self.in_cluster = in_cluster
        self.timeout = timeout
        self._session: requests.Session | None = None
        self._host = ""
        self._configuration: Any = None
        self._lock = threading.Lock()

    # -- connection --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        self._connect()
        return self._host

    def _connect(self) -> requests.Session:
        with self._lock:
            if self._session is not None:
                return self._session
            try:
                from kubernetes import client as kclient
                from kubernetes import config as kconfig
            except ImportError as exc:
                raise EngineUnavailable(
                    "backend 'kubernetes' needs the kubernetes client: "
                    "pip install 'kernel-sandbox[kubernetes]'"
                ) from exc
            cfg = kclient.Configuration()
            in_cluster = self.in_cluster
            if in_cluster is None:
                in_cluster = (
                    not self.config_file
                    and "KUBERNETES_SERVICE_HOST" in os.environ
                    and os.path.exists(IN_CLUSTER_TOKEN)
                )
            try:
                if in_cluster:
                    kconfig.load_incluster_config(client_configuration=cfg)
                else:
                    kconfig.load_kube_config(
                        config_file=self.config_file or None,
                        context=self.context or None,
                        client_configuration=cfg,
                    )
            except Exception as exc:  # the loader raises ConfigException, OSError, ...
                where = (
                    "the pod's service account"
                    if in_cluster
                    else (
                        self.config_file or "the default kubeconfig (~/.kube/config, $KUBECONFIG)"
                    )
                )
                raise EngineUnavailable(
                    f"cannot load Kubernetes credentials from {where}: {exc}; set "
                    "c.DockerSandboxProvisioner.kube_config (a kubeconfig file) or "
                    "kube_in_cluster"
                ) from exc
            session = requests.Session()
            # the kubeconfig alone says how to reach the server: not $REQUESTS_CA_BUNDLE
            # (which would replace its CA) nor $HTTPS_PROXY
            session.trust_env = False
            session.verify = (
                cfg.ssl_ca_cert if cfg.verify_ssl and cfg.ssl_ca_cert else cfg.verify_ssl
            )
            if cfg.cert_file and cfg.key_file:
                session.cert = (cfg.cert_file, cfg.key_file)
            session.headers["Accept"] = "application/json"
            self._configuration = cfg
            self._host = cfg.host.rstrip("/")
            self._session = session
            return session

    def _auth(self) -> dict[str, str]:
        cfg = self._configuration
        if cfg is None:
            return {}
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)  # a projected service-account token is rotated
        token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix(
            "BearerToken"
        )
        return {"Authorization": token} if token else {}

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    # -- the one choke point ------------------------------------------------------------------

    def _request(
        self,
        what: str,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
        raw: bool = False,
    ) -> Any:
        session = self._connect()
        headers = {**self._auth(), "Content-Type": content_type}
        url = self._host + path
        try:
            response = session.request(
                method,
                url,
                data=None if body is None else json.dumps(body),
                params=params,
                headers=headers,
                timeout=self.timeout,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise EngineUnavailable(
                f"the Kubernetes API server {self._host} does not answer ({what}): "
                f"{type(exc).__name__}; check the cluster, or kube_config"
            ) from exc
        except requests.RequestException as exc:
            raise EngineError(f"Kubernetes request failed ({what}): {exc}") from exc
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            hint = ""
            # 403 is also an admission plugin's refusal ("pod rejected: ..."): not credentials
            if response.status_code == 401 or (response.status_code == 403 and "cannot" in message):
                hint = (
                    f" (the credentials in use may not do this in namespace {self.namespace}; "
                    "see deploy/kubernetes/ for the Role kernel-sandbox needs, and "
                    "`kernel-sandbox doctor`)"
                )
            raise EngineError(
                f"the Kubernetes API refused {what}: {response.status_code} {message[:500]}{hint}",
                response.status_code,
            )
        if raw:
            return response.text
        return response.json() if response.content else None

    async def _call(self, what: str, method: str, path: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._request, what, method, path, **kwargs)

    def path(self, kind: str, name: str = "", sub: str = "") -> str:
        base = f"{_GROUP[kind]}/namespaces/{quote(self.namespace)}/{kind}"
        return base + (f"/{quote(name)}" if name else "") + (f"/{sub}" if sub else "")

    # -- operations ---------------------------------------------------------------------------

    async def create(self, kind: str, manifest: dict[str, Any]) -> dict[str, Any]:
        name = manifest["metadata"]["name"]
        result: dict[str, Any] = await self._call(
            f"creating {kind} {name}", "POST", self.path(kind), body=manifest
        )
        return result

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        result: dict[str, Any] | None = await self._call(
            f"reading {kind} {name}", "GET", self.path(kind, name), missing_ok=True
        )
        return result

    async def delete(self, kind: str, name: str, grace: int | None = None) -> bool:
        """Delete (in the background: dependents by the garbage collector); False: not there."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        result = await self._call(
            f"deleting {kind} {name}", "DELETE", self.path(kind, name), body=body, missing_ok=True
        )
        return result is not None

    async def patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """A JSON merge patch; None when the object is gone."""
        result: dict[str, Any] | None = await self._call(
            f"updating {kind} {name}",
            "PATCH",
            self.path(kind, name),
            body=patch,
            content_type="application/merge-patch+json",
            missing_ok=True,
        )
        return result

    async def list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        result = await self._call(
            f"listing {kind}", "GET", self.path(kind), params={"labelSelector": selector}
        )
        return list((result or {}).get("items") or [])

    async def log_tail(self, name: str, container: str, lines: int = 10) -> str:
        """The container's last log lines ("" when there are none or they cannot be read)."""
        try:
            text = await self._call(
                f"reading the log of pod {name}",
                "GET",
                self.path(PODS, name, "log"),
                params={"container": container, "tailLines": lines, "limitBytes": 16384},
                missing_ok=True,
                raw=True,
            )
        except (EngineError, EngineUnavailable):
            return ""
        return text or ""

    async def access(self, verb: str, resource: str, group: str = "") -> tuple[bool, str]:
        """Whether these credentials may ``verb`` ``resource`` in the namespace (a
        SelfSubjectAccessReview), and the server's reason."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": self.namespace,
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                }
            },
        }
        result = await self._call(
            f"asking whether it may {verb} {resource}",
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            body=review,
        )
        status = (result or {}).get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or "")

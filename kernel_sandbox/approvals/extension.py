"""The Jupyter Server side: REST endpoints, the plain page and the events, for this server's
kernels only.

- ``GET  {base}kernel-sandbox/approvals/api/requests``: the waiting requests (host, port,
  kernel id, notebook path from the server's sessions, reason, time left);
- ``POST {base}kernel-sandbox/approvals/api/requests``: ``{"kernel_id", "target",
  "decision": "once"|"kernel"|"deny"}``;
- ``GET|POST {base}kernel-sandbox/approvals``: the same as an HTML page with forms;
- events of schema :data:`~.events.SCHEMA_ID` on the server's event bus.

Every handler needs the server's login (token or cookie) and the ``kernels`` permission
(``read`` to see, ``write`` to decide); POSTs from pages carry the server's XSRF token.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

from kernel_sandbox.approvals.events import SCHEMA, SCHEMA_ID, Watcher
from kernel_sandbox.approvals.page import render
from kernel_sandbox.approvals.store import ApprovalError, PendingStore, Source, UnknownRequest
from kernel_sandbox.errors import EgressControlError

__all__ = ["ServerApprovals", "load", "start"]

PAGE = "kernel-sandbox/approvals"
API = "kernel-sandbox/approvals/api/requests"
SETTINGS_KEY = "kernel_sandbox_approvals"


class ServerApprovals:
    """This server's view: its kernels, their notebooks, the store and the watcher."""

    def __init__(self, serverapp: Any, interval: float = 0.5):
        self.serverapp = serverapp
        self.names: dict[str, dict[str, str | None]] = {}
        self.store = PendingStore(self.kernels, lambda kid: self.names.get(kid, {}))
        self.watcher = Watcher(self.store, self.emit, interval, before=self.refresh_names)

    def kernels(self) -> dict[str, Source]:
        """This server's sandboxed kernels and where their proxies answer."""
        found: dict[str, Source] = {}
        manager = self.serverapp.kernel_manager
        for kernel_id in list(manager.list_kernel_ids()):
            try:
                provisioner = manager.get_kernel(kernel_id).provisioner
            except KeyError:
                continue
            root = getattr(provisioner, "runtime_root", None)
            if root is None:
                continue  # not a sandboxed kernel: it has no egress proxy
            service = provisioner.via_service
            found[kernel_id] = (
                Source(service=service.client.path) if service else Source(runtime_root=root)
            )
        return found

    async def refresh_names(self) -> None:
        """Notebook paths and kernel names from the server's sessions."""
        names: dict[str, dict[str, str | None]] = {}
        try:
            sessions = await self.serverapp.session_manager.list_sessions()
        except Exception:  # the sessions database is the server's business: show ids only
            sessions = []
        for session in sessions:
            kernel = session.get("kernel") or {}
            if kernel.get("id"):
                names[kernel["id"]] = {"notebook": session.get("path"), "kernel_name": None}
        manager = self.serverapp.kernel_manager
        for kernel_id in list(manager.list_kernel_ids()):
            try:
                name = manager.get_kernel(kernel_id).kernel_name
            except KeyError:
                continue
            names.setdefault(kernel_id, {"notebook": None})["kernel_name"] = name
        self.names = names

    def emit(self, data: dict[str, Any]) -> None:
        self.serverapp.event_logger.emit(schema_id=SCHEMA_ID, data=data)

    async def pending(self) -> list[Any]:
        await self.refresh_names()
        return await asyncio.to_thread(self.store.pending)

    async def decide(self, kernel_id: str, target: str, choice: str) -> int:
        await self.refresh_names()
        request = await asyncio.to_thread(self.store.find, kernel_id, target)
        count = await asyncio.to_thread(self.store.decide, kernel_id, target, choice)
        await self.watcher.settled(request, choice)
        return count


def _approvals(handler: JupyterHandler) -> ServerApprovals:
    return handler.settings[SETTINGS_KEY]  # type: ignore[no-any-return]


def _verb(choice: str, count: int, target: str) -> str:
    what = {"once": "approved once", "kernel": "approved for this kernel", "deny": "denied"}
    return f"{target}: {what[choice]} ({count} waiting connection(s))"


class RequestsHandler(APIHandler):
    auth_resource = "kernels"

    @web.authenticated
    @authorized(action="read")
    async def get(self) -> None:
        requests = await _approvals(self).pending()
        self.finish(json.dumps({"requests": [r.as_json() for r in requests]}))

    @web.authenticated
    @authorized(action="write")
    async def post(self) -> None:
        body = self.get_json_body() or {}
        kernel_id, target = str(body.get("kernel_id", "")), str(body.get("target", ""))
        choice = str(body.get("decision", ""))
        try:
            count = await _approvals(self).decide(kernel_id, target, choice)
        except UnknownRequest as exc:
            raise web.HTTPError(409, str(exc)) from exc
        except ApprovalError as exc:
            raise web.HTTPError(400, str(exc)) from exc
        except EgressControlError as exc:
            raise web.HTTPError(502, str(exc)) from exc
        self.finish(json.dumps({"decided": count, "decision": choice, "target": target}))


class PageHandler(JupyterHandler):
    auth_resource = "kernels"

    async def _page(self, message: str | None = None, error: bool = False) -> None:
        requests = await _approvals(self).pending()
        hidden = {"_xsrf": self.xsrf_token.decode()}
        action = url_path_join(self.base_url, PAGE)
        focus = self.get_argument("request", None)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(render(requests, action, hidden, message, error, focus))

    @web.authenticated
    @authorized(action="read")
    async def get(self) -> None:
        await self._page()

    @web.authenticated
    @authorized(action="write")
    async def post(self) -> None:
        kernel_id, target = self.get_body_argument("kernel_id"), self.get_body_argument("target")
        choice = self.get_body_argument("decision")
        try:
            count = await _approvals(self).decide(kernel_id, target, choice)
        except EgressControlError as exc:  # ApprovalError and UnknownRequest too
            self.set_status(409 if isinstance(exc, UnknownRequest) else 400)
            await self._page(str(exc), error=True)
            return
        await self._page(_verb(choice, count, target))


def load(serverapp: Any) -> ServerApprovals:
    """Register the schema and the handlers (the extension's load hook)."""
    approvals = ServerApprovals(serverapp)
    serverapp.event_logger.register_event_schema(SCHEMA)
    web_app = serverapp.web_app
    web_app.settings[SETTINGS_KEY] = approvals
    base = web_app.settings["base_url"]
    web_app.add_handlers(
        ".*$",
        [(url_path_join(base, API), RequestsHandler), (url_path_join(base, PAGE), PageHandler)],
    )
    serverapp.log.info("kernel-sandbox approvals: %s", url_path_join(base, PAGE))
    return approvals


async def start(serverapp: Any) -> None:
    """Start watching for requests, in the server's running loop (the start hook)."""
    serverapp.web_app.settings[SETTINGS_KEY].watcher.start()

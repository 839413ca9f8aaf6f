"""Approvals for ``kernel-sandbox mcp``: its own approval page and URL-mode elicitation.

An MCP server has no Jupyter Server behind it, so it serves the same plain page
(:mod:`.page`) itself, on 127.0.0.1 only (:class:`ApprovalSite`), for the kernels of its
own sessions. The page wants an approver cookie, which only the login link gives; the server
prints that link (with a random key) on its stderr when it starts, for the operator. The
address of one request's page is not a secret: an agent that learns it still cannot decide
(no cookie), and code in a sandbox cannot reach the host's loopback at all.

:func:`ask_person` is what the ``request_egress`` tool does in ``egress_mode: ask``: the
question is registered with the kernel's proxy ahead of any connection, the person is sent
to its page by URL-mode elicitation (or, for a client without it, the address is printed on
stderr and given in the answer), and the tool returns once the person decided or the time
is up, saying what was decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from kernel_sandbox.approvals.page import render
from kernel_sandbox.approvals.store import PendingStore, Source
from kernel_sandbox.egress.control import EgressControl
from kernel_sandbox.errors import EgressControlError

__all__ = ["ApprovalSite", "ask_person", "source_of"]

log = logging.getLogger(__name__)
COOKIE = "ks_approver"


def source_of(provisioner: Any) -> Source | None:
    """Where a kernel's egress proxy answers (None: not a sandboxed kernel)."""
    root = getattr(provisioner, "runtime_root", None)
    if root is None:
        return None
    service = provisioner.via_service
    return Source(service=service.client.path) if service else Source(runtime_root=root)


class ApprovalSite:
    """The approval page of one ``kernel-sandbox mcp`` process, on 127.0.0.1."""

    def __init__(self, kernels: Callable[[], dict[str, Source]], port: int = 0):
        self.store = PendingStore(kernels)
        self.key = secrets.token_urlsafe(32)
        self.form_token = hmac.new(self.key.encode(), b"form", "sha256").hexdigest()
        self.port = port
        self._sock: socket.socket | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def login_url(self) -> str:
        return f"{self.base}/login?key={self.key}"

    def request_url(self, request_id: str) -> str:
        return f"{self.base}/?request={request_id}"

    def _approver(self, cookies: dict[str, str]) -> bool:
        return hmac.compare_digest(cookies.get(COOKIE, ""), self.key)

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request as HttpRequest
        from starlette.responses import HTMLResponse, RedirectResponse, Response
        from starlette.routing import Route

        allowed_hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}

        def refused(status: int, text: str) -> Response:
            page = f"<!doctype html><title>Egress approvals</title><p>{text}</p>"
            return HTMLResponse(page, status_code=status)

        def checked(request: HttpRequest) -> Response | None:
            if request.headers.get("host") not in allowed_hosts:
                return refused(403, "Wrong host.")
            if not self._approver(dict(request.cookies)):
                return refused(
                    401,
                    "Not logged in as the approver: open the login link that "
                    "<code>kernel-sandbox mcp</code> printed on its standard error when it "
                    "started (it names this address and a key), then this page again.",
                )
            return None

        async def page(request: HttpRequest) -> Response:
            problem = checked(request)
            if problem is not None:
                return problem
            message, error = None, False
            if request.method == "POST":
                form = await request.form()
                origin = request.headers.get("origin")
                if form.get("form_token") != self.form_token or (
                    origin and origin.removeprefix("http://") not in allowed_hosts
                ):
                    return refused(403, "This form did not come from this page.")
                kernel_id, target = str(form.get("kernel_id")), str(form.get("target"))
                choice = str(form.get("decision"))
                try:
                    count = await asyncio.to_thread(self.store.decide, kernel_id, target, choice)
                    message = f"{target}: {_done(choice)} ({count} waiting connection(s))"
                except EgressControlError as exc:
                    message, error = str(exc), True
            requests = await asyncio.to_thread(self.store.pending)
            html = render(
                requests,
                "/",
                {"form_token": self.form_token},
                message,
                error,
                request.query_params.get("request"),
            )
            return HTMLResponse(html, headers={"Cache-Control": "no-store"})

        async def login(request: HttpRequest) -> Response:
            if request.headers.get("host") not in allowed_hosts:
                return refused(403, "Wrong host.")
            if not hmac.compare_digest(request.query_params.get("key", ""), self.key):
                return refused(403, "Wrong key.")
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, self.key, httponly=True, samesite="strict")
            return response

        return Starlette(routes=[Route("/", page, methods=["GET", "POST"]), Route("/login", login)])

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ApprovalSite]:
        """Serve while the MCP server does; print the login link for the operator."""
        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]

        class Quiet(uvicorn.Server):
            def capture_signals(self) -> Any:  # the MCP server owns SIGINT/SIGTERM
                return contextlib.nullcontext()

        server = Quiet(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        print(
            f"kernel-sandbox mcp: egress approvals at {self.base}/ ; log in once with "
            f"{self.login_url}",
            file=sys.stderr,
            flush=True,
        )
        try:
            yield self
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
            sock.close()


def _done(choice: str) -> str:
    return {"once": "approved once", "kernel": "approved for this kernel", "deny": "denied"}[choice]


def _supports_url_elicitation(ctx: Any) -> bool:
    capabilities = getattr(ctx.request_context.session, "client_capabilities", None)
    elicitation = getattr(capabilities, "elicitation", None)
    return getattr(elicitation, "url", None) is not None


async def ask_person(
    ctx: Any, site: ApprovalSite, kernel_id: str, target: str, reason: str
) -> dict[str, Any]:
    """Put ``target`` to a person for ``kernel_id`` and wait for the verdict; the tool's
    answer (``status``: approved once, approved for this kernel, denied, no decision)."""
    source = site.store.kernels().get(kernel_id)
    if source is None or source.runtime_root is None:
        return {
            "status": "awaiting a person",
            "message": "recorded; this kernel's proxy cannot take a question ahead (started "
            "through the sandbox service): connect, and the connection waits for a person",
        }
    control = EgressControl(source.runtime_root)
    asked = await asyncio.to_thread(control.request, kernel_id, target, reason)
    request = await asyncio.to_thread(site.store.find, kernel_id, target)
    url = site.request_url(request.id)
    answer: dict[str, Any] = {"approval_page": url}
    message = (
        f"The sandboxed kernel of an MCP session asks to reach {target} (host "
        f"{request.host}, port {request.port}). Reason given: {reason or '(none)'}. Approve "
        "once, for this kernel, or deny on the page."
    )
    if _supports_url_elicitation(ctx):
        try:
            consent = await ctx.elicit_url(message, url, request.id)
        except Exception as exc:  # a client that fails the request: fall back to printing
            log.warning("URL elicitation failed (%s); printing the approval page", exc)
            consent = None
        if consent is not None and consent.action != "accept":
            await asyncio.to_thread(site.store.decide, kernel_id, target, "deny")
            return {
                **answer,
                "status": "denied",
                "message": f"the person declined to open the approval page: {target} denied",
            }
        answer["asked_by"] = "URL elicitation" if consent is not None else "printed URL"
    else:
        answer["asked_by"] = "printed URL"
    if answer["asked_by"] == "printed URL":
        print(
            f"kernel-sandbox mcp: egress request to {target} from kernel {kernel_id}: "
            f"approve or deny at {url}",
            file=sys.stderr,
            flush=True,
        )
    outcome = None
    while outcome is None and time.time() < float(asked["expires"]) + 2:
        await asyncio.sleep(0.3)
        outcome = await asyncio.to_thread(control.outcome, kernel_id, target)
    if answer["asked_by"] == "URL elicitation":
        with contextlib.suppress(Exception):
            await ctx.request_context.session.send_elicit_complete(request.id)
    return {**answer, **_verdict(outcome, target)}


def _verdict(outcome: dict[str, Any] | None, target: str) -> dict[str, str]:
    verdict = (outcome or {}).get("verdict", "expired")
    if verdict == "approve" and (outcome or {}).get("always"):
        return {
            "status": "approved for this kernel",
            "message": f"a person approved {target} for this kernel's life: connect through "
            "the proxy as usual (run_code)",
        }
    if verdict == "approve":
        return {
            "status": "approved once",
            "message": f"a person approved {target} once: your next connection to it (from "
            "run_code, soon) goes through; later ones ask again",
        }
    if verdict == "deny":
        return {"status": "denied", "message": f"a person denied {target}"}
    return {
        "status": "no decision",
        "message": f"nobody decided about {target} in time, which denies it; ask again later",
    }

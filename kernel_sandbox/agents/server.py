"""``kernel-sandbox mcp``: the MCP server that gives an agent a sandboxed kernel directly.

:func:`build_server` makes an ``mcp`` SDK ``MCPServer`` whose tools work on the calling
session's own kernel (:mod:`kernel_sandbox.agents.sessions`), started with the operator's
kernelspec and profile; :mod:`kernel_sandbox.agents.transports` serves it (stdio or
streamable HTTP).

A tool never takes the server down: bad input, a refused path, a dead kernel become a tool
error (``is_error``) that says what to do. Annotations are set from what each tool really
does under the operator's policy (``run_code`` reaches the outside world only when the policy
has egress).
"""

# No `from __future__ import annotations` here: the SDK reads the tools' annotations, which
# name the operator's limits (closures), at registration.
import base64
import json
import logging
import mimetypes
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field

from kernel_sandbox import __version__
from kernel_sandbox.agents.kernel import Busy, KernelGone, RunResult
from kernel_sandbox.agents.options import ServerOptions
from kernel_sandbox.agents.outputs import IMAGE_TYPES, Image
from kernel_sandbox.agents.sessions import NoSession, Sessions, SessionState
from kernel_sandbox.agents.workspace import MAX_READ, FileRefused, Workspace
from kernel_sandbox.errors import SandboxError, TargetError
from kernel_sandbox.policy.model import SandboxPolicy

__all__ = ["build_server", "describe_policy", "run_result"]

log = logging.getLogger(__name__)
INSTRUCTIONS = """\
Each session of this server has its own Python kernel in an ephemeral, sandboxed container
(started at the first call that needs it, removed when the session ends). Run code with
run_code; what the sandbox may reach (network, datasets, the workspace folder) is fixed by the
operator: call get_policy to see it. Files in the workspace: list_files, read_file, write_file
(only when the workspace is read-write). Outbound network access is not yours to grant:
request_egress records a request for a person.
"""


def describe_policy(policy: SandboxPolicy, options: ServerOptions) -> dict[str, Any]:
    """What a session's sandbox may reach and use, for the agent (no host secrets)."""
    return {
        "kernelspec": options.kernel,
        "profile": options.profile or "(the kernelspec's)",
        "network": policy.network,
        "egress_allowlist": list(policy.egress) if policy.network == "allowlist" else [],
        "egress_mode": policy.egress_mode if policy.network == "allowlist" else None,
        "workspace": {
            "mode": policy.workspace if options.workspace else "none",
            "folder": options.workspace if policy.workspace != "none" else None,
        },
        "datasets": [_dataset(d) for d in policy.datasets],
        "limits": {
            "memory_bytes": policy.memory_limit,
            "cpus": policy.cpu_limit,
            "processes": policy.pids_limit,
            "tmpfs_bytes": policy.tmpfs_size,
            "idle_timeout_seconds": policy.idle_timeout,
            "run_code_default_timeout_seconds": options.default_timeout,
            "run_code_max_timeout_seconds": options.max_timeout,
        },
        "runtime": policy.runtime,
        "image": policy.image,
    }


def _dataset(dataset: Any) -> dict[str, Any]:
    kind = "url" if "://" in dataset.source else "local folder"
    return {
        "name": dataset.name,
        "access": dataset.access,
        "kind": kind,
        "use": f"from kernel_sandbox import data; data.ls({dataset.name!r}); "
        f"data.open('{dataset.name}/FILE')",
    }


def _text(text: str) -> TextContent:
    return TextContent(type="text", text=text)


def run_result(result: RunResult) -> CallToolResult:
    """A run as MCP content: a status line, then the outputs (text and images) in order."""
    count = f"execution {result.execution_count}, " if result.execution_count else ""
    head = f"status: {result.status} ({count}{result.seconds:.1f} s)"
    if result.outputs.error is not None:
        head += f"; raised {result.outputs.error['ename']}: {result.outputs.error['evalue']}"
    if result.note:
        head += f"\nnote: {result.note}"
    content: list[ContentBlock] = [_text(head)]
    for part in result.outputs.text_parts():
        if isinstance(part, Image):
            content.append(ImageContent(type="image", data=part.data, mime_type=part.mime_type))
        elif part:
            content.append(_text(part))
    return CallToolResult(content=content, is_error=result.status != "ok")


def build_server(options: ServerOptions, policy: SandboxPolicy) -> MCPServer[Any]:
    """The MCP server; ``policy`` is the effective policy of the operator's kernelspec and
    profile (checked before serving), shown until a session's kernel reports its own."""
    sessions = Sessions(options)
    site = None
    if policy.network == "allowlist" and policy.egress_mode == "ask":
        from kernel_sandbox.approvals.mcp import ApprovalSite, source_of

        def kernels() -> dict[str, Any]:
            found = {k.kernel_id: source_of(k.provisioner) for k in list(sessions.open)}
            return {kid: source for kid, source in found.items() if kid and source}

        site = ApprovalSite(kernels, options.approvals_port)

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[Sessions]:
        async with sessions.running():
            if site is None:
                yield sessions
                return
            async with site.running():  # the approval page (kernel_sandbox.approvals.mcp)
                yield sessions

    server: MCPServer[Any] = MCPServer(
        "kernel-sandbox",
        title="kernel-sandbox: a sandboxed Python kernel per session",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        log_level="WARNING",
    )

    def state(ctx: Context) -> SessionState:
        try:
            return sessions.state(ctx)
        except NoSession as exc:
            raise ToolError(str(exc)) from exc

    async def started(ctx: Context) -> SessionState:
        session = state(ctx)
        try:
            await session.kernel.ensure_started()
        except SandboxError as exc:
            raise ToolError(f"the sandboxed kernel could not start: {exc}") from exc
        except TimeoutError as exc:
            raise ToolError(
                f"the sandboxed kernel did not answer within {options.startup_timeout:g} s; "
                "try again, or ask the operator to raise --startup-timeout"
            ) from exc
        return session

    def workspace() -> Workspace:
        return Workspace(options.workspace, policy.workspace)

    # -- the kernel -------------------------------------------------------------------------

    async def run_code(
        code: Annotated[str, Field(description="Python code to run in the session's kernel")],
        ctx: Context,
        timeout: Annotated[
            float | None,
            Field(
                description=f"seconds before the run is interrupted (default "
                f"{options.default_timeout:g}, at most {options.max_timeout:g})",
                gt=0,
            ),
        ] = None,
    ) -> CallToolResult:
        limit = min(timeout or options.default_timeout, options.max_timeout)
        session = await started(ctx)

        async def progress(seconds: float, message: str) -> None:
            try:
                await ctx.report_progress(round(seconds, 1), None, message)
            except Exception as exc:  # a client gone or slow to read: the run goes on
                log.debug("progress not sent: %s", exc)

        try:
            result = await session.kernel.run(code, limit, progress)
        except (Busy, KernelGone) as exc:
            raise ToolError(str(exc)) from exc
        if timeout and timeout > options.max_timeout:
            result.note = (
                f"{result.note}; " if result.note else ""
            ) + f"timeout capped at {options.max_timeout:g} s by the operator"
        return run_result(result)

    async def interrupt_kernel(ctx: Context) -> str:
        session = await started(ctx)
        try:
            await session.kernel.interrupt()
        except KernelGone as exc:
            raise ToolError(str(exc)) from exc
        return "interrupt sent: a running run_code call ends with KeyboardInterrupt"

    async def restart_kernel(ctx: Context) -> str:
        session = await started(ctx)
        try:
            await session.kernel.restart()
        except SandboxError as exc:
            raise ToolError(f"the kernel could not be restarted: {exc}") from exc
        except TimeoutError as exc:
            raise ToolError("the restarted kernel did not answer in time; try again") from exc
        return (
            "restarted: a fresh kernel in a fresh sandbox (variables and imports are gone; "
            "files in a read-write workspace stay)"
        )

    async def get_policy(ctx: Context) -> dict[str, Any]:
        session = state(ctx)
        kernel = session.kernel
        provisioner = kernel.provisioner
        live = getattr(provisioner, "policy", None) if provisioner is not None else None
        described = describe_policy(live if isinstance(live, SandboxPolicy) else policy, options)
        described["kernel"] = {
            "id": kernel.kernel_id,
            "container": kernel.container_name,
            "running": await kernel.alive(),
        }
        described["egress_requests"] = session.egress_requests
        return described

    # -- files and data ---------------------------------------------------------------------

    async def list_files(
        path: Annotated[str, Field(description="folder relative to the workspace")] = ".",
    ) -> dict[str, Any]:
        try:
            return workspace().list(path)
        except FileRefused as exc:
            raise ToolError(str(exc)) from exc

    async def read_file(
        path: Annotated[str, Field(description="file relative to the workspace")],
        max_bytes: Annotated[
            int, Field(description=f"read at most this many bytes (up to {MAX_READ})", gt=0)
        ] = MAX_READ,
    ) -> CallToolResult:
        try:
            data, size = workspace().read(path, max_bytes)
        except FileRefused as exc:
            raise ToolError(str(exc)) from exc
        note = f" (first {len(data)} of {size} bytes)" if len(data) < size else ""
        kind = mimetypes.guess_type(path)[0]
        if kind in IMAGE_TYPES and not note:
            image = ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=kind)
            return CallToolResult(content=[_text(f"{path}: {kind}, {size} bytes"), image])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return CallToolResult(
                content=[
                    _text(
                        f"{path}: binary, {size} bytes{note}; base64 follows\n"
                        + base64.b64encode(data).decode()
                    )
                ]
            )
        return CallToolResult(content=[_text(text + (f"\n[{path}{note}]" if note else ""))])

    async def write_file(
        path: Annotated[str, Field(description="file relative to the workspace")],
        content: Annotated[str, Field(description="the file's new content")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="how content is encoded")
        ] = "utf-8",
    ) -> str:
        try:
            data = (
                base64.b64decode(content, validate=True)
                if encoding == "base64"
                else content.encode("utf-8")
            )
        except ValueError as exc:
            raise ToolError(f"content is not valid base64: {exc}") from exc
        try:
            written = workspace().write(path, data)
        except FileRefused as exc:
            raise ToolError(str(exc)) from exc
        return f"wrote {written} bytes to {path}"

    async def list_datasets() -> dict[str, Any]:
        return {"datasets": [_dataset(d) for d in policy.datasets]}

    async def request_egress(
        host: Annotated[str, Field(description="host name (or address) to reach")],
        port: Annotated[int, Field(description="TCP port", ge=1, le=65535)],
        reason: Annotated[str, Field(description="why the work needs it", max_length=500)],
        ctx: Context,
    ) -> dict[str, Any]:
        from kernel_sandbox.egress.rules import decide, parse_authority, parse_rule

        session = state(ctx)
        try:
            target = parse_authority(f"{host}:{port}")
        except TargetError as exc:
            raise ToolError(str(exc)) from exc
        kernel_id = session.kernel.kernel_id or "KERNEL_ID"
        answer: dict[str, Any] = {"target": str(target), "kernel": session.kernel.kernel_id}
        rules = tuple(parse_rule(r) for r in policy.egress)
        if policy.network == "allowlist" and decide(target, rules).allowed:
            answer.update(status="allowed", message="the policy already allows this target")
            return answer
        request = {"target": str(target), "reason": reason, "at": time.time()}
        if not any(r["target"] == request["target"] for r in session.egress_requests):
            session.egress_requests.append(request)
            log.warning(
                "MCP session (kernel %s) requests egress to %s: %s",
                session.kernel.kernel_id,
                target,
                json.dumps(reason),
            )
        if policy.network == "allowlist" and policy.egress_mode == "ask" and site is not None:
            from kernel_sandbox.approvals.mcp import ask_person

            session = await started(ctx)  # the person approves for this kernel: name it
            kernel_id = answer["kernel"] = session.kernel.kernel_id or kernel_id
            try:
                answer.update(await ask_person(ctx, site, kernel_id, str(target), reason))
            except SandboxError as exc:
                raise ToolError(f"the request could not be put to a person: {exc}") from exc
        else:
            answer.update(
                status="awaiting a person",
                message=(
                    "recorded for the operator. This session's policy "
                    + (
                        "has no network at all"
                        if policy.network == "none"
                        else "denies targets outside its allowlist"
                    )
                    + "; only the operator can change it (another profile or allowlist, "
                    "then a new session). There is no approval you can obtain from here."
                ),
            )
        return answer

    # -- registration -----------------------------------------------------------------------

    open_world = policy.network != "none"
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    tools: list[tuple[Any, str, ToolAnnotations]] = [
        (
            run_code,
            "Run Python code in this session's sandboxed kernel (variables persist between "
            "calls). Returns stdout/stderr, results, images and, if the code raised, the "
            "traceback (is_error). Long runs send progress; a run is interrupted when its "
            "timeout is up.",
            ToolAnnotations(
                read_only_hint=False,
                destructive_hint=True,
                idempotent_hint=False,
                open_world_hint=open_world,
            ),
        ),
        (
            interrupt_kernel,
            "Interrupt the code running in this session's kernel (KeyboardInterrupt); "
            "variables are kept.",
            ToolAnnotations(
                read_only_hint=False,
                destructive_hint=False,
                idempotent_hint=True,
                open_world_hint=False,
            ),
        ),
        (
            restart_kernel,
            "Restart this session's kernel in a fresh sandbox: all variables are lost. Also "
            "brings back a kernel that died (for example out of memory).",
            ToolAnnotations(
                read_only_hint=False,
                destructive_hint=True,
                idempotent_hint=True,
                open_world_hint=False,
            ),
        ),
        (
            get_policy,
            "What this session's sandbox may reach and use: network and egress allowlist, "
            "workspace mode, datasets, limits, the kernel's id and container. Set by the "
            "operator; it cannot be changed from here.",
            read_only,
        ),
        (
            list_files,
            "List a folder of the workspace (the operator's folder mounted in the kernel). "
            "Paths are relative to it; symbolic links are listed, never followed.",
            read_only,
        ),
        (
            read_file,
            "Read a file of the workspace (text, an image, or base64 for other binary files).",
            read_only,
        ),
        (
            write_file,
            "Create or replace a file of the workspace. Only when the policy's workspace mode "
            "is read-write; the folder must exist; links are not followed.",
            ToolAnnotations(
                read_only_hint=False,
                destructive_hint=True,
                idempotent_hint=True,
                open_world_hint=False,
            ),
        ),
        (
            list_datasets,
            "The datasets this session's kernel may use through the data broker, and how to "
            "open them in code.",
            read_only,
        ),
        (
            request_egress,
            "Ask for network access to HOST:PORT. This does NOT grant it: a person decides. "
            "In ask mode the person is sent to an approval page (through your client when it "
            "supports URL elicitation) and this call returns their decision (approved once, "
            "approved for this kernel, denied, or no decision in time); otherwise the request "
            "is recorded for the operator. There is no way for this session to approve its "
            "own request.",
            ToolAnnotations(
                read_only_hint=False,
                destructive_hint=False,
                idempotent_hint=True,
                open_world_hint=False,
            ),
        ),
    ]
    for fn, description, annotations in tools:
        server.add_tool(fn, description=description, annotations=annotations)
    return server

"""``kernel-sandbox mcp``: serve a sandboxed kernel per agent session over MCP.

    kernel-sandbox mcp [--kernelspec NAME] [--profile NAME] [--workspace DIR]
                       [--transport stdio|http] [--host 127.0.0.1] [--port 8000] ...

The operator's flags fix the kernelspec, profile, workspace folder and time limits for every
session; the checks ``kernel-sandbox run`` makes before its first notebook (kernelspec,
policy, engine, image) run before serving, so a setup error is one line and exit 2. The
server itself is :mod:`kernel_sandbox.agents.server` (needs the ``agents`` extra: ``mcp``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from kernel_sandbox.cli.console import EXIT_OK, EXIT_TERMINATED, UsageError, err, until_sigterm
from kernel_sandbox.engine.backend import DockerBackend

__all__ = ["add_mcp_command", "cmd_mcp"]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("must be 1-65535")
    return value


def _workspace(path: str | None) -> str | None:
    from kernel_sandbox.policy.mounts import resolve_workspace

    if path is None:
        return None
    if not os.path.isdir(path):
        raise UsageError(f"--workspace {path}: the folder does not exist")
    resolved = resolve_workspace(path)
    if resolved is None:
        raise UsageError(
            f"--workspace {path}: a folder no sandbox may see (it holds or is a system or "
            "credentials folder); give a project folder"
        )
    return resolved


async def cmd_mcp(args: argparse.Namespace, backend: DockerBackend) -> int:
    """Check the setup, then serve until stdin closes (stdio) or SIGINT/SIGTERM."""
    from kernel_sandbox.batch.config import kernel_config, load_jupyter_config, preflight
    from kernel_sandbox.batch.options import RunOptions

    if args.default_timeout > args.max_timeout:
        raise UsageError(
            f"--default-timeout {args.default_timeout:g} is more than --max-timeout "
            f"{args.max_timeout:g}"
        )
    workspace = _workspace(args.workspace)
    token = _token(args.token_file)
    if token and args.transport != "http":
        raise UsageError("--token-file is for --transport http (stdio opens no port)")
    try:
        base_config = load_jupyter_config()
    except Exception as exc:  # a broken config file is the user's to fix, not a traceback
        raise UsageError(f"cannot load Jupyter config: {exc}") from exc
    config = kernel_config(args.profile, args.startup_timeout, base_config)
    run_options = RunOptions(kernel=args.kernelspec, profile=args.profile, config=config)
    # refuses a kernelspec that is not sandboxed, and a workspace no kernel could run in
    policy = _sandboxed_policy(run_options, workspace)
    await preflight(run_options, backend)
    try:
        from kernel_sandbox.agents.options import ServerOptions
        from kernel_sandbox.agents.server import build_server
        from kernel_sandbox.agents.transports import serve
    except ImportError as exc:
        raise UsageError(
            f"kernel-sandbox mcp needs the mcp SDK: pip install 'kernel-sandbox[agents]' ({exc})"
        ) from exc

    options = ServerOptions(
        kernel=args.kernelspec,
        profile=args.profile,
        workspace=workspace,
        default_timeout=args.default_timeout,
        max_timeout=args.max_timeout,
        startup_timeout=args.startup_timeout,
        transport=args.transport,
        host=args.host,
        port=args.port,
        session_idle_timeout=args.session_idle_timeout,
        approvals_port=args.approvals_port,
        token=token,
        config=config,
    )
    server = build_server(options, policy)
    profile = args.profile or "(the kernelspec's)"
    where = (
        "stdio"
        if args.transport == "stdio"
        else f"http://{_url_host(args.host)}:{args.port}/mcp (streamable HTTP, "
        + ("a bearer token required)" if token else "NO authentication: see --token-file)")
    )
    err.print(
        f"kernel-sandbox mcp: serving on {where}; kernelspec {args.kernelspec}, profile "
        f"{profile}, network {policy.network}, workspace "
        f"{workspace or 'none'} ({policy.workspace if workspace else 'none'})",
        markup=False,
    )
    terminated = await until_sigterm(asyncio.ensure_future(serve(server, options)))
    return EXIT_TERMINATED if terminated else EXIT_OK


def _token(path: str | None) -> str | None:
    """The bearer token in ``path`` (its first line), which must not be readable by others."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            token = file.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {path}: cannot read it: {exc}") from exc
    if mode & 0o077:
        raise UsageError(
            f"--token-file {path}: others may read it (mode {mode & 0o777:o}); chmod 600 {path}"
        )
    if len(token) < 16:
        raise UsageError(
            f"--token-file {path}: the token on its first line is shorter than 16 characters; "
            "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _sandboxed_policy(options: Any, workspace: str | None) -> Any:
    """The effective policy of the operator's kernelspec and profile, checked as the first
    kernel start would check it (including who the kernel runs as in ``workspace``).

    Raises:
        KernelspecError: no such kernelspec.
        UsageError: the kernelspec does not start sandboxes.
        PolicyError: an unknown profile or a bad policy value; a read-write workspace no
            sandbox may run in (owned by root, ...).
    """
    from kernel_sandbox.kernelspec import PROVISIONER_NAME, find_kernelspec
    from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner
    from kernel_sandbox.provisioner.identity import decide_identity

    spec = find_kernelspec(options.kernel)
    info = (spec.metadata or {}).get("kernel_provisioner") or {}
    if info.get("provisioner_name") != PROVISIONER_NAME:
        raise UsageError(
            f"kernelspec {options.kernel} does not start sandboxes (its provisioner is not "
            f"{PROVISIONER_NAME}); kernel-sandbox mcp serves only sandboxed kernelspecs "
            "(python3-sandbox, or one made by `kernel-sandbox install`)"
        )
    spec_config = dict(info.get("config") or {})
    provisioner = DockerSandboxProvisioner(
        kernel_id="mcp-preflight", kernel_spec=spec, config=options.config, **spec_config
    )
    policy = provisioner.policy
    if provisioner.via_service is None:  # through the sandbox service, the service decides
        uid_range = provisioner.checked_uid_range() if os.getuid() == 0 else None
        mounted = workspace if policy.workspace == "rw" else None
        decide_identity(policy, mounted, uid_range, options.kernel)
    return policy


def add_mcp_command(commands: Any) -> argparse.ArgumentParser:
    """Register ``mcp`` on the ``kernel-sandbox`` command's subparsers."""
    mcp = commands.add_parser(
        "mcp",
        help="serve a sandboxed kernel per agent session over MCP (stdio or HTTP)",
        description="An MCP server for AI agents: each MCP session gets its own kernel in a "
        "fresh sandbox, started with the kernelspec and profile given here (the agent cannot "
        "choose another), and removed when the session ends. Needs the agents extra "
        "(pip install 'kernel-sandbox[agents]').",
    )
    mcp.add_argument(
        "--kernelspec",
        default="python3-sandbox",
        metavar="NAME",
        help="sandboxed kernelspec of every session (default python3-sandbox)",
    )
    mcp.add_argument(
        "--profile",
        default=None,
        help="policy profile (strict, analyst, educator, ci, untrusted or one from Jupyter "
        "config; default: the kernelspec's)",
    )
    mcp.add_argument(
        "--workspace",
        default=None,
        metavar="DIR",
        help="host folder mounted as every session's workspace, as the policy's workspace "
        "mode says (default: none; sessions share it)",
    )
    mcp.add_argument(
        "--transport",
        choices=("stdio", "http"),
        default="stdio",
        help="stdio (default; the agent's host starts this command) or http (streamable HTTP)",
    )
    mcp.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the HTTP transport listens on (default 127.0.0.1)",
    )
    mcp.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="HTTP: require 'Authorization: Bearer TOKEN', TOKEN being the first line of FILE "
        "(mode 600); without it, anyone who can connect gets a sandbox",
    )
    mcp.add_argument(
        "--port", type=_port, default=8000, help="port of the HTTP transport (default 8000)"
    )
    mcp.add_argument(
        "--approvals-port",
        type=lambda text: 0 if text == "0" else _port(text),
        default=0,
        metavar="PORT",
        help="egress_mode ask: port of the approval page on 127.0.0.1 (default: any free one; "
        "its login link is printed on stderr at start)",
    )
    mcp.add_argument(
        "--default-timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="time a run_code call gets when it names none (default 60)",
    )
    mcp.add_argument(
        "--max-timeout",
        type=_positive,
        default=600.0,
        metavar="SECONDS",
        help="the most time a run_code call may ask for (default 600)",
    )
    mcp.add_argument(
        "--startup-timeout",
        type=_positive,
        default=120.0,
        metavar="SECONDS",
        help="time a session's kernel gets to start (default 120)",
    )
    mcp.add_argument(
        "--session-idle-timeout",
        type=_positive,
        default=1800.0,
        metavar="SECONDS",
        help="an HTTP session with no request for this long ends, and its kernel with it "
        "(default 1800)",
    )
    mcp.set_defaults(func=cmd_mcp)
    return mcp

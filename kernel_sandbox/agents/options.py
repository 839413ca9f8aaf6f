"""What the operator decides for ``kernel-sandbox mcp``: :class:`ServerOptions`.

Everything here comes from the command line (and the Jupyter config files); nothing an agent
sends can change it. In particular the kernelspec and profile are fixed for every session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from traitlets.config import Config

__all__ = ["ServerOptions"]


@dataclass(frozen=True)
class ServerOptions:
    kernel: str = "python3-sandbox"
    profile: str | None = None
    workspace: str | None = None  # the host folder mounted as the workspace (or none)
    default_timeout: float = 60.0  # seconds a run_code call may take when it names none
    max_timeout: float = 600.0  # the most a run_code call may ask for
    startup_timeout: float = 120.0
    transport: str = "stdio"  # or "http"
    host: str = "127.0.0.1"
    port: int = 8000
    session_idle_timeout: float = 30 * 60.0  # an HTTP session without requests this long ends
    approvals_port: int = 0  # the approval page on 127.0.0.1 (egress_mode ask); 0: any free
    token: str | None = field(default=None, repr=False)  # HTTP: the bearer token asked for
    config: Config = field(default_factory=Config)  # Jupyter config for the kernel managers

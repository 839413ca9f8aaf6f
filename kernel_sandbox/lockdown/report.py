"""What a Jupyter Server config leaves open, for ``kernel-sandbox doctor`` and ``lockdown``.

Plain functions over what they inspect (the merged config, the installed kernelspecs, the
enabled server extensions), so each finding can be tested with the facts handed in. A
finding is ``(name, status, detail, fix)`` with status ``ok``, ``warn`` or ``fail``:
``fail`` only where a locked-down server would refuse to start.
"""

from __future__ import annotations

import getpass
import os
from typing import Any

from traitlets.config import Config

from kernel_sandbox.lockdown.config import EXTENSION, SandboxLockdown

__all__ = ["HOST_CODE_RUNNERS", "Finding", "enabled_extensions", "server_findings"]

Finding = tuple[str, str, str, str]
OK, WARN, FAIL = "ok", "warn", "fail"

# Server extensions known to run code on the host, outside any kernel: lockdown does not
# contain them. (name -> what they run)
HOST_CODE_RUNNERS = {
    "jupyter_server_proxy": "starts configured programs on the host and proxies to any local port",
    "jupyter_scheduler": "runs notebooks as jobs in kernels it starts itself, not through "
    "the server's kernel manager",
    "jupyterlab_git": "runs git on the host; hooks written through the contents API "
    "(.git/hooks) run as the server's user",
    "jupyter_lsp": "starts language servers on the host that read the files clients write "
    "(what they execute depends on the server and its plugins)",
}


def enabled_extensions(config: Config) -> dict[str, bool]:
    """The server extensions a Jupyter Server started here would enable: the
    ``jupyter_server_config.d`` files of every config directory (the first directory of
    ``jupyter --paths`` winning), then ``ServerApp.jpserver_extensions`` from config files."""
    from jupyter_core.paths import jupyter_config_path
    from jupyter_server.extension.config import ExtensionConfigManager

    merged = dict(
        ExtensionConfigManager(read_config_path=jupyter_config_path()).get_jpserver_extensions()
    )
    merged.update(config.get("ServerApp", {}).get("jpserver_extensions") or {})
    return {name: bool(on) for name, on in merged.items()}


def _lockdown_settings(config: Config) -> SandboxLockdown:
    return SandboxLockdown(config=config)


def server_findings(
    config: Config, sandboxed: list[str], unsandboxed: list[str], extensions: dict[str, bool]
) -> list[Finding]:
    """What a server with ``config`` would let a client start, and what stays open.

    ``sandboxed``/``unsandboxed``: installed kernelspec names by provisioner;
    ``extensions``: :func:`enabled_extensions`.
    """
    server = config.get("ServerApp", {})
    findings: list[Finding] = []
    locked = extensions.get(EXTENSION, False)
    on = [name for name, enabled in extensions.items() if enabled]
    terminals_on = server.get("terminals_enabled", True) and "jupyter_server_terminals" in on
    if not locked:
        findings.append(
            (
                "lockdown",
                WARN,
                "not enabled: clients choose any kernelspec, and terminals are host shells",
                "kernel-sandbox lockdown enable (then restart the Jupyter Server)",
            )
        )
        if unsandboxed:
            findings.append(
                (
                    "unsandboxed kernelspecs",
                    WARN,
                    f"a client can start these on the host: {', '.join(unsandboxed)}",
                    "kernel-sandbox lockdown enable",
                )
            )
        if terminals_on:
            findings.append(
                (
                    "terminals",
                    WARN,
                    f"a terminal is a host shell as {getpass.getuser()}",
                    "kernel-sandbox lockdown enable (sandboxed terminals), or "
                    "c.ServerApp.terminals_enabled = False",
                )
            )
    else:
        findings += _locked_findings(config, sandboxed, unsandboxed, terminals_on)
    for name in sorted(set(on) & set(HOST_CODE_RUNNERS)):
        findings.append(
            (
                f"extension {name}",
                WARN,
                f"runs code on the host that no lockdown contains: {HOST_CODE_RUNNERS[name]}",
                f"jupyter server extension disable {name}",
            )
        )
    findings.append(_contents_finding(server))
    return findings


def _locked_findings(
    config: Config, sandboxed: list[str], unsandboxed: list[str], terminals_on: bool
) -> list[Finding]:
    settings = _lockdown_settings(config)
    server = config.get("ServerApp", {})
    findings: list[Finding] = []
    if settings.map_to not in sandboxed:
        findings.append(
            (
                "lockdown",
                FAIL,
                f"enabled, but map_to {settings.map_to!r} is not a sandboxed kernelspec: the "
                "server refuses to start",
                f"kernel-sandbox install --name {settings.map_to}, or set "
                "c.SandboxLockdown.map_to to one of: " + (", ".join(sandboxed) or "(none)"),
            )
        )
    else:
        findings.append(
            (
                "lockdown",
                OK,
                f"enabled: kernels {', '.join(sandboxed)}; other names "
                + (
                    "mapped to " + settings.map_to
                    if settings.on_unsandboxed == "map"
                    else "refused"
                ),
                "",
            )
        )
    if unsandboxed:
        findings.append(
            (
                "unsandboxed kernelspecs",
                OK,
                f"hidden and never started: {', '.join(unsandboxed)}",
                "",
            )
        )
    if server.get("allow_external_kernels") or config.get("GatewayClient", {}).get("url"):
        findings.append(
            (
                "foreign kernels",
                FAIL,
                "the server adopts external kernels or uses a kernel gateway: it refuses to "
                "start under lockdown",
                "unset ServerApp.allow_external_kernels / GatewayClient.url",
            )
        )
    terminals = "off" if not terminals_on else settings.terminals
    findings.append(
        (
            "terminals",
            OK,
            "off"
            if terminals == "off"
            else f"sandboxed (each shell in a container under {settings.map_to}'s policy)",
            "",
        )
    )
    return findings


def _contents_finding(server: Any) -> Finding:
    """The contents API is open under any lockdown: say what it reaches."""
    root = str(server.get("root_dir") or "")
    where = root or "the directory the server is started in"
    detail = (
        f"the contents API reads and writes {where} as {getpass.getuser()} (any client with "
        "the token can)"
    )
    if not root:
        return ("contents API", WARN, detail, "set c.ServerApp.root_dir to a project folder")
    exposed = exposed_by_root(root)
    if exposed:
        return (
            "contents API",
            WARN,
            f"{detail}; it contains {', '.join(exposed)}, whose files change what runs on the host",
            "set c.ServerApp.root_dir to a folder without Jupyter config, kernelspecs or "
            "shell start-up files",
        )
    return ("contents API", OK, detail, "")


def exposed_by_root(root: str) -> list[str]:
    """Host paths under ``root`` whose contents decide what the host runs: Jupyter config
    and data directories (config files, kernelspecs) and shell/IPython start-up files."""
    from jupyter_core.paths import jupyter_config_path, jupyter_path

    home = os.path.expanduser("~")
    candidates = [*jupyter_config_path(), *jupyter_path()]
    candidates += [os.path.join(home, name) for name in (".bashrc", ".profile", ".ipython")]
    real_root = os.path.realpath(root).rstrip("/") + "/"
    return sorted(
        {
            path
            for path in candidates
            if (os.path.realpath(path).rstrip("/") + "/").startswith(real_root)
        }
    )

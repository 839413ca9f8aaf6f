"""``kernel-sandbox lockdown enable|disable|status``: turn the Jupyter Server lockdown on or off.

``enable`` and ``disable`` write the same file ``jupyter server extension enable|disable``
would (``jupyter_server_config.d/kernel_sandbox.lockdown.json`` in the chosen config
directory), so ``jupyter server extension list`` shows the result. Then they check what a
server started here would really do (a file in a directory earlier in ``jupyter --paths``
can override this one) and say so.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernel_sandbox.cli.console import EXIT_FAILED, EXIT_OK, UsageError, done, warn
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.lockdown.config import EXTENSION
from kernel_sandbox.lockdown.report import enabled_extensions
from kernel_sandbox.policy.jupyter_config import load_jupyter_config

__all__ = ["add_lockdown_command", "config_dir"]


def config_dir(scope: str) -> str:
    """The Jupyter config directory of ``scope`` (user, sys-prefix, system)."""
    from jupyter_core.paths import ENV_CONFIG_PATH, SYSTEM_CONFIG_PATH, jupyter_config_dir

    if scope == "user":
        return jupyter_config_dir()
    if scope == "system":
        return SYSTEM_CONFIG_PATH[0]
    return ENV_CONFIG_PATH[0]


def _effective() -> bool:
    config, _files = load_jupyter_config()
    return enabled_extensions(config).get(EXTENSION, False)


async def cmd_lockdown(args: argparse.Namespace, backend: DockerBackend) -> int:
    """enable/disable: 0 when the merged config ends as asked, 1 when another file overrides
    it. status: 0 when enabled, 1 when not."""
    try:
        from jupyter_server.extension.serverextension import toggle_server_extension_python
    except ImportError as exc:
        raise UsageError(
            "the lockdown is a Jupyter Server extension: install jupyter_server"
        ) from exc
    if args.action == "status":
        on = _effective()
        done(f"lockdown is {'enabled' if on else 'not enabled'} (kernel-sandbox doctor says more)")
        return EXIT_OK if on else EXIT_FAILED
    want = args.action == "enable"
    directory = config_dir(args.scope)
    path = f"{directory}/jupyter_server_config.d/{EXTENSION}.json"
    try:
        toggle_server_extension_python(
            EXTENSION, want, user=args.scope == "user", sys_prefix=args.scope == "sys-prefix"
        )
    except OSError as exc:
        raise UsageError(
            f"cannot write {path}: {exc.strerror or exc}; pick another scope "
            "(--user, --sys-prefix, --system) or run as a user who may write there"
        ) from exc
    done(f"{'enabled' if want else 'disabled'} {EXTENSION} in {path}")
    if _effective() != want:
        warn(
            f"warning: but a Jupyter Server started here would still have it "
            f"{'disabled' if want else 'enabled'}: another config file overrides {path} "
            f"(see `jupyter server extension list` and `jupyter --paths`)"
        )
        return EXIT_FAILED
    if want:
        done(
            "restart the Jupyter Server; it refuses to start if lockdown cannot hold. "
            "Check with `kernel-sandbox doctor`."
        )
    else:
        done("restart the Jupyter Server: clients may then start host kernels again")
    return EXIT_OK


def add_lockdown_command(commands: Any) -> None:
    lockdown = commands.add_parser(
        "lockdown",
        help="make a Jupyter Server start only sandboxed kernels and terminals",
        description="Enable or disable the kernel_sandbox.lockdown Jupyter Server extension. "
        "Enabled, every kernel the server starts is sandboxed whatever name a client sends "
        "(other names are mapped to c.SandboxLockdown.map_to or refused), terminals run in "
        "sandbox containers (or are off), and the server refuses to start when no sandboxed "
        "kernelspec exists or the Docker engine does not answer.",
    )
    lockdown.add_argument("action", choices=["enable", "disable", "status"])
    scope = lockdown.add_mutually_exclusive_group()
    for flag, help_text in (
        ("--sys-prefix", "this Python environment's config (the default)"),
        ("--user", "your own config (~/.jupyter)"),
        ("--system", "the machine's config (/usr/local/etc/jupyter)"),
    ):
        scope.add_argument(
            flag,
            dest="scope",
            action="store_const",
            const=flag[2:],
            help=f"write {help_text}",
        )
    lockdown.set_defaults(func=cmd_lockdown, scope="sys-prefix")

"""``kernel-sandbox doctor``: is this machine ready to run sandboxed kernels, and if not, why.

Each check is a line with a status and, when it is not ok, the fix: the command to run or the
configuration to add. The checks are plain functions over what they inspect (engine facts,
a directory, the installed kernelspecs), so each can be tested with the facts handed in.
Status ``warn`` is advice: only ``fail`` makes ``doctor`` exit 1.

The first line says which mode is in force and why: direct engine access, or through the
sandbox service (:mod:`kernel_sandbox.cli.service_mode`). Through the service the engine,
runtimes, images and runtime directory are the service's to check: ``doctor`` checks that the
service answers and who it takes you for, and that you cannot reach the engine is good news.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from rich.markup import escape
from rich.table import Table
from traitlets.config import Config

from kernel_sandbox.cli.checks import FAIL, OK, WARN, Check
from kernel_sandbox.cli.console import EXIT_FAILED, EXIT_OK, wide_console
from kernel_sandbox.cli.doctor_kernelspecs import check_cpus, check_image, check_kernelspecs
from kernel_sandbox.cli.service_mode import add_service_flags, which_mode
from kernel_sandbox.cli.visibility import visibility_findings
from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import SandboxError
from kernel_sandbox.host.rundir import CHANNELS, MAX_SOCKET_PATH, RuntimeDir, default_root
from kernel_sandbox.inside.contract import EGRESS_NOTICE_SOCKET
from kernel_sandbox.kernelspec import PROVISIONER_NAME
from kernel_sandbox.policy import DEFAULT_IMAGE
from kernel_sandbox.policy.effective import is_sandboxed, load_jupyter_config

__all__ = [
    "FAIL",
    "OK",
    "WARN",
    "Check",
    "add_doctor_command",
    "check_cpus",
    "check_image",
    "check_kernelspecs",
    "run_checks",
    "visibility_findings",
]

# How runsc must be registered here: no network of its own, and host unix sockets for the
# kernel's ipc sockets and the lifeline/broker sockets it connects to.
RUNSC_ARGS = ["--network=none", "--host-uds=all"]
RELOAD = "then reload the engine: `kill -HUP $(pidof dockerd)` (or `systemctl reload docker`)"


# -- the checks -----------------------------------------------------------------------------


def check_provisioner() -> Check:
    found = [
        ep
        for ep in entry_points(group="jupyter_client.kernel_provisioners")
        if ep.name == PROVISIONER_NAME
    ]
    if found:
        return Check("jupyter", "provisioner", OK, f"{PROVISIONER_NAME} -> {found[0].value}")
    return Check(
        "jupyter",
        "provisioner",
        FAIL,
        f"no {PROVISIONER_NAME} kernel provisioner is registered with jupyter_client",
        "pip install kernel-sandbox (in the environment that runs Jupyter)",
    )


def check_engine(info: dict[str, Any] | None, error: str = "") -> Check:
    if info is None:
        return Check(
            "engine",
            "docker",
            FAIL,
            error or "the Docker engine does not answer",
            "start it (`sudo systemctl start docker`, or `dockerd &`); check `docker info`",
        )
    cgroup = info.get("CgroupVersion") or "?"
    return Check(
        "engine",
        "docker",
        OK,
        f"engine {info.get('ServerVersion', '?')}, cgroup v{cgroup}, "
        f"storage {info.get('Driver', '?')}",
    )


def runsc_snippet(path: str) -> str:
    return json.dumps({"runtimes": {"runsc": {"path": path, "runtimeArgs": RUNSC_ARGS}}})


def check_runtimes(
    info: dict[str, Any], needed: dict[str, list[str]], which: Callable[[str], str | None]
) -> list[Check]:
    """The engine's OCI runtimes against what the kernelspecs ask for.

    ``needed`` maps each runtime to the kernelspecs using it; ``which`` finds programs.
    """
    runtimes: dict[str, Any] = info.get("Runtimes") or {}
    checks = [Check("runtime", "registered", OK, ", ".join(sorted(runtimes)) or "(none)")]
    runsc_path = which("runsc")
    if "runsc" in runtimes:
        args = (runtimes["runsc"] or {}).get("runtimeArgs") or []
        missing = [a for a in RUNSC_ARGS if a.split("=")[0] not in " ".join(args)]
        if missing:
            checks.append(
                Check(
                    "runtime",
                    "runsc",
                    FAIL,
                    f"runsc is registered without {', '.join(missing)}: kernels under gVisor "
                    "cannot start or cannot be reached",
                    f"in /etc/docker/daemon.json set "
                    f"{runsc_snippet(runtimes['runsc'].get('path', 'runsc'))}; " + RELOAD,
                )
            )
        else:
            checks.append(Check("runtime", "runsc", OK, f"gVisor registered ({' '.join(args)})"))
    elif runsc_path:
        checks.append(
            Check(
                "runtime",
                "runsc",
                FAIL if "runsc" in needed else WARN,
                f"runsc is installed ({runsc_path}) but not registered with the engine",
                f"add to /etc/docker/daemon.json (merge with what is there): "
                f"{runsc_snippet(runsc_path)}; " + RELOAD,
            )
        )
    elif "runsc" not in needed:
        checks.append(
            Check(
                "runtime",
                "runsc",
                WARN,
                "gVisor (runsc) is not installed; the untrusted profile needs it",
                "apt-get install runsc, then run `kernel-sandbox doctor` again",
            )
        )
    for runtime, specs in sorted(needed.items()):
        if runtime in runtimes or (runtime == "runsc" and runsc_path):
            continue  # runsc installed but unregistered is reported above
        checks.append(
            Check(
                "runtime",
                runtime,
                FAIL,
                f"kernelspec {', '.join(specs)} asks for runtime {runtime!r}, "
                "which the engine lacks",
                f'install {runtime} and register it under "runtimes" in /etc/docker/daemon.json; '
                + RELOAD,
            )
        )
    return checks


def check_runtime_root(root: str, uid: int | None = None) -> list[Check]:
    """Socket path length and the permissions of the runtime root (c...runtime_root)."""
    uid = os.getuid() if uid is None else uid
    sample = RuntimeDir(os.path.join(root, "x" * 8))  # the longest socket path of a kernel
    longest = max(
        len(f"{sample.socket_prefix}-{len(CHANNELS)}"),
        len(str(sample.host_dir / EGRESS_NOTICE_SOCKET)),
    )
    checks = []
    if longest > MAX_SOCKET_PATH:
        checks.append(
            Check(
                "runtime_root",
                "socket paths",
                FAIL,
                f"sockets under {root} would be {longest} bytes, over the unix limit of "
                f"{MAX_SOCKET_PATH}",
                "set a shorter c.DockerSandboxProvisioner.runtime_root (e.g. /tmp/ks-$UID)",
            )
        )
    else:
        checks.append(
            Check(
                "runtime_root",
                "socket paths",
                OK,
                f"{longest} of {MAX_SOCKET_PATH} bytes under {root}",
            )
        )
    path = Path(root)
    try:
        info = path.lstat()
    except FileNotFoundError:
        parent = path.parent
        if os.access(parent, os.W_OK | os.X_OK):
            checks.append(
                Check(
                    "runtime_root",
                    "permissions",
                    OK,
                    f"{root} will be created (mode 0700) on the first start",
                )
            )
        else:
            checks.append(
                Check(
                    "runtime_root",
                    "permissions",
                    FAIL,
                    f"{root} does not exist and {parent} is not writable",
                    f"mkdir -m 700 {root}, or set c.DockerSandboxProvisioner.runtime_root",
                )
            )
        return checks
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        checks.append(
            Check(
                "runtime_root",
                "permissions",
                FAIL,
                f"{root} is not a plain directory (a symlink or a file)",
                f"remove {root}; it is created again on the next start",
            )
        )
    elif info.st_uid != uid:
        checks.append(
            Check(
                "runtime_root",
                "permissions",
                FAIL,
                f"{root} belongs to uid {info.st_uid}, not to you (uid {uid}): "
                "someone else could reach your kernels' sockets",
                f"remove {root}, or set c.DockerSandboxProvisioner.runtime_root",
            )
        )
    elif stat.S_IMODE(info.st_mode) & 0o077:
        checks.append(
            Check(
                "runtime_root",
                "permissions",
                FAIL,
                f"{root} is mode {stat.S_IMODE(info.st_mode):04o}: others can "
                "reach your kernels' sockets",
                f"chmod 700 {root}",
            )
        )
    else:
        checks.append(Check("runtime_root", "permissions", OK, f"{root}: yours, mode 0700"))
    return checks


async def run_checks(
    backend: DockerBackend,
    config: Config,
    runtime_root: str,
    which: Callable[[str], str | None] = shutil.which,
) -> list[Check]:
    checks = [check_provisioner()]
    spec_checks, images, runtimes, cpus = check_kernelspecs(config)
    try:
        info: dict[str, Any] | None = await backend.engine_info()
        error = ""
    except SandboxError as exc:
        info, error = None, str(exc)
    checks.append(check_engine(info, error))
    if info is not None:
        checks += check_runtimes(info, runtimes, which)
        spec_checks += check_cpus(info, cpus)
        images.setdefault(DEFAULT_IMAGE, [])
        for image, specs in sorted(images.items()):
            checks.append(check_image(image, await backend.image_labels(image), specs))
    checks += spec_checks
    checks += check_runtime_root(runtime_root)
    checks += check_server(config)
    from kernel_sandbox.cli.doctor_kube import check_kube

    checks += await check_kube(config)
    return checks


def check_server(config: Config) -> list[Check]:
    """Is the Jupyter Server locked down, and what stays open (kernel_sandbox.lockdown)."""
    from kernel_sandbox.lockdown.report import enabled_extensions, server_findings

    try:
        extensions = enabled_extensions(config)
    except ImportError:  # no jupyter_server here: nothing serves kernels to clients
        return []
    manager = KernelSpecManager()
    sandboxed: list[str] = []
    unsandboxed: list[str] = []
    for name in sorted(manager.find_kernel_specs()):
        try:
            spec = manager.get_kernel_spec(name)
        except Exception:  # a broken kernel.json: check_kernelspecs reports sandboxed ones
            continue
        (sandboxed if is_sandboxed(spec) else unsandboxed).append(name)
    findings = server_findings(config, sandboxed, unsandboxed, extensions)
    return [Check("server", *finding) for finding in findings]


# -- the command ----------------------------------------------------------------------------


STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red"}


def render(checks: list[Check]) -> Table:
    table = Table(header_style="bold", show_lines=False)
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for check in checks:
        table.add_row(
            f"{check.area}: {check.name}",
            f"[{STYLE[check.status]}]{check.status}[/]",
            escape(check.detail),
            escape(check.fix),
        )
    return table


async def cmd_doctor(args: argparse.Namespace, backend: DockerBackend) -> int:
    """Exit 1 when a check failed (a real finding, not a setup error of the command)."""
    config, _files = load_jupyter_config(args.config)
    section = config.get("DockerSandboxProvisioner", {})
    root = str(section.get("runtime_root") or default_root())
    from kernel_sandbox.cli.doctor_service import check_mode, run_service_checks

    path, why = which_mode(args, str(section.get("service") or "") or None)
    if path is None:
        checks = [check_mode(path, why), *await run_checks(backend, config, root)]
    else:
        checks = [check_mode(path, why), *await run_service_checks(backend, config, path)]
    failed = [c for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        console = wide_console(160)
        console.print(render(checks))
        console.print(f"{len(failed)} problem(s) found" if failed else "all checks passed")
    return EXIT_FAILED if failed else EXIT_OK


def add_doctor_command(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check the engine, runtimes, images, kernelspecs and runtime directory",
        description="Check that sandboxed kernels can run here: the Docker engine answers, the "
        "OCI runtimes the kernelspecs ask for are registered (and how to register gVisor's "
        "runsc), their images exist, every sandboxed kernelspec's policy is valid under the "
        "Jupyter config, and the runtime directory keeps socket paths short and private. "
        "Prints a fix for every failing line; exits 1 if anything failed, else 0. The first "
        "line says whether this user goes through the sandbox service or to the engine "
        "directly, and why; through the service it checks that the service answers and who "
        "it takes you for.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doctor.add_argument("--config", metavar="FILE", help="also read this Jupyter config file")
    add_service_flags(doctor)
    doctor.set_defaults(func=cmd_doctor)

"""``doctor``'s checks of the sandboxed kernelspecs: each policy worked out as its kernel's
start will, which Jupyter finds it (:mod:`kernel_sandbox.cli.visibility`), whether the engine
can give it the CPUs it asks for, and whether its image is there.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from kernel_sandbox.cli.checks import FAIL, OK, WARN, Check
from kernel_sandbox.cli.visibility import visibility_findings
from kernel_sandbox.errors import PolicyError, SandboxError
from kernel_sandbox.inside.contract import IMAGE_KIND_KERNEL, label
from kernel_sandbox.policy import DEFAULT_IMAGE
from kernel_sandbox.policy.effective import is_sandboxed, resolve
from kernel_sandbox.policy.host import check_host_files

__all__ = ["check_cpus", "check_image", "check_kernelspecs"]


def check_kernelspecs(
    config: Config, specs: dict[str, Any] | None = None
) -> tuple[list[Check], dict[str, list[str]], dict[str, list[str]], dict[str, float]]:
    """Every sandboxed kernelspec's policy, as its kernel's start would work it out, and
    which Jupyter finds it (:mod:`kernel_sandbox.cli.visibility`).

    Returns the checks, the images and runtimes the kernelspecs need (name -> specs), and
    each one's cpu_limit (spec -> CPUs).
    """
    manager = KernelSpecManager()
    specs = manager.get_all_specs() if specs is None else specs
    checks: list[Check] = []
    images: dict[str, list[str]] = {}
    runtimes: dict[str, list[str]] = {}
    cpus: dict[str, float] = {}
    dirs: dict[str, str] = {}
    for name, entry in sorted(specs.items()):
        spec = manager.get_kernel_spec(name) if not hasattr(entry, "argv") else entry
        if not is_sandboxed(spec):
            continue
        if spec.resource_dir:
            dirs[name] = spec.resource_dir
        try:
            effective = resolve(spec, name, config)
            check_host_files(effective.policy)  # a seccomp file the start would refuse
        except (PolicyError, SandboxError) as exc:
            checks.append(
                Check(
                    "kernelspec",
                    name,
                    FAIL,
                    str(exc),
                    f"edit {spec.resource_dir}/kernel.json, or write it again with "
                    f"`kernel-sandbox install --name {name} ...`",
                )
            )
            continue
        policy = effective.policy
        cpus[name] = policy.cpu_limit
        images.setdefault(policy.image, []).append(name)
        if policy.runtime != "runc":
            runtimes.setdefault(policy.runtime, []).append(name)
        checks.append(
            Check(
                "kernelspec",
                name,
                OK,
                f"profile {effective.profile}, image {policy.image}, runtime {policy.runtime}",
            )
        )
    if not checks:
        checks.append(
            Check(
                "kernelspec",
                "(none)",
                FAIL,
                "no sandboxed kernelspec is installed",
                "kernel-sandbox install",
            )
        )
    checks += [Check("kernelspec", *finding) for finding in visibility_findings(dirs)]
    return checks, images, runtimes, cpus


def check_cpus(info: dict[str, Any], cpus: dict[str, float]) -> list[Check]:
    """A cpu_limit above the engine's CPUs (``docker info`` NCPU): the engine refuses it."""
    have = info.get("NCPU")
    if not isinstance(have, int) or have <= 0:
        return []
    return [
        Check(
            "kernelspec",
            name,
            FAIL,
            f"cpu_limit {limit:g} is more than the engine's {have} CPUs: it refuses to start "
            "these kernels",
            f"kernel-sandbox install --name {name} --cpu-limit {have} ... (or lower it in "
            "its kernel.json)",
        )
        for name, limit in sorted(cpus.items())
        if limit > have
    ]


def check_image(image: str, labels: dict[str, str] | None, specs: list[str]) -> Check:
    users = f" (used by {', '.join(specs)})" if specs else ""
    if labels is None:
        fix = (
            "kernel-sandbox image build (add --base kernel-sandbox/base:bookworm after "
            "`kernel-sandbox image base` where no registry is reachable)"
            if image == DEFAULT_IMAGE
            else f"docker pull {image}, or build it"
        )
        return Check("image", image, FAIL, f"not on the engine{users}", fix)
    if labels.get(label("image")) != IMAGE_KIND_KERNEL:
        return Check(
            "image",
            image,
            WARN,
            f"present{users}, but not built by kernel-sandbox: no in-sandbox watchdog, "
            "so a kernel orphaned by a crashed server runs on until `kernel-sandbox gc`",
            "build kernel images with `kernel-sandbox image build --binder DIR`",
        )
    return Check("image", image, OK, f"present{users}")

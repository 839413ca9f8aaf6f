"""Building the images: a Debian base without any registry, and the kernel image, hermetically.

The kernel image is built from an environment spec in repo2docker's formats (a ``binder/``
folder). Wheels are downloaded on the host for the base image's Python, and the build itself
runs with no network, so what is in the image is exactly what the host fetched. The shipped
``binder/`` gives the default image the analyst's common stack (numpy, pandas with pyarrow,
matplotlib, ipywidgets); ``binder/minimal/`` gives the minimal variant (ipykernel, fsspec).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.errors import ImageBuildError
from kernel_sandbox.image.debs import BaseRelease, fetch_debs, read_apt_packages, release_probe
from kernel_sandbox.inside.contract import KERNEL_UID, SANDBOX_HOME, label
from kernel_sandbox.policy import DEFAULT_IMAGE

__all__ = [
    "DEFAULT_BASE",
    "LOCAL_BASE",
    "MINIMAL_IMAGE",
    "build_base_image",
    "build_kernel_image",
    "debian_mirror",
    "default_binder_dir",
    "minimal_binder_dir",
]

DEFAULT_BASE = "python:3.11-slim"
LOCAL_BASE = "kernel-sandbox/base:bookworm"
# The variant without the analyst's stack (``image build --minimal``): ipykernel and fsspec.
MINIMAL_IMAGE = "kernel-sandbox/python:minimal"
PLATFORM_TAGS = ("manylinux_2_28_{arch}", "manylinux_2_17_{arch}", "manylinux2014_{arch}")
ALWAYS_REQUIRED = ("ipykernel",)
# Installed as dependencies but removed unless requirements.txt names them: ipykernel imports
# debugpy at every start (120-160 ms here, docs/benchmarks.md) for a debugger that the sandboxed
# kernelspecs switch off ("debugger": false) because it cannot reach across the sandbox.
DROPPED_UNLESS_REQUESTED = ("debugpy",)
SPEC_LABEL = label("spec-hash")
APT_SOURCES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")
Progress = Callable[[str], None]

DOCKERFILE = f"""\
ARG BASE
FROM ${{BASE}} AS build
ARG DROP=""
COPY wheels /wheels
COPY requirements.txt /requirements.txt
RUN python3 -m venv /opt/kernel \\
 && /opt/kernel/bin/python -m pip install --no-index --no-cache-dir --disable-pip-version-check \\
      --find-links /wheels -r /requirements.txt \\
 && /opt/kernel/bin/python -m pip uninstall -y --disable-pip-version-check $DROP pip
# the in-sandbox part of kernel-sandbox (watchdog, data client): standard library only
COPY inside /inside
RUN cp -r /inside/kernel_sandbox \\
      "$(/opt/kernel/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/" \\
 && /opt/kernel/bin/python -m compileall -q /opt/kernel/lib

FROM ${{BASE}}
USER root
# apt.txt: .deb files fetched on the host (kernel_sandbox.image.debs), installed with no network
COPY debs /tmp/debs
RUN if ls /tmp/debs/*.deb >/dev/null 2>&1; then dpkg -i /tmp/debs/*.deb; fi && rm -rf /tmp/debs
COPY --from=build /opt/kernel /opt/kernel
RUN (getent group {KERNEL_UID} || groupadd -g {KERNEL_UID} sandbox) \\
 && (getent passwd {KERNEL_UID} \\
     || useradd -u {KERNEL_UID} -g {KERNEL_UID} -d {SANDBOX_HOME} -M sandbox) \\
 && mkdir -p {SANDBOX_HOME} && chown {KERNEL_UID}:{KERNEL_UID} {SANDBOX_HOME}
ENV PATH=/opt/kernel/bin:/usr/local/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1
USER {KERNEL_UID}:{KERNEL_UID}
WORKDIR {SANDBOX_HOME}
CMD ["python", "-m", "ipykernel_launcher"]
"""


def default_binder_dir() -> Path:
    """The environment spec shipped with the package (or the checkout's ``binder/``)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "_shared" / "binder"
    if packaged.is_dir():
        return packaged
    return package.parent / "binder"


def minimal_binder_dir() -> Path:
    """The minimal variant's spec (ipykernel and fsspec), a folder inside the default one."""
    return default_binder_dir() / "minimal"


def _debian_uris(sources: tuple[str, ...]) -> list[str]:
    """The Debian repository URIs of this machine's apt sources, in the order apt reads them."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.is_file():
            files.append(source)
    uris: list[str] = []
    for path in files:
        text = path.read_text(errors="replace")
        uris += re.findall(r"^\s*URIs:\s*(\S+)", text, re.MULTILINE) + re.findall(
            r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.MULTILINE
        )
    return [uri for uri in uris if "debian" in uri]


def debian_mirror(sources: tuple[str, ...] = APT_SOURCES) -> str:
    """The Debian mirror this machine's apt uses, so air-gapped sites follow their own mirror.

    Raises:
        ImageBuildError: no Debian mirror is configured.
    """
    for uri in _debian_uris(sources):
        if "security" not in uri:
            return uri
    raise ImageBuildError("no Debian mirror found in /etc/apt/sources.list(.d); pass --mirror URL")


def debian_security_mirror(sources: tuple[str, ...] = APT_SOURCES) -> str | None:
    """The Debian security mirror of this machine's apt sources, if it has one."""
    return next((uri for uri in _debian_uris(sources) if "security" in uri), None)


def _stream(cmd: list[str], progress: Progress, what: str) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    recent: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        recent.append(line)
        progress(line)
    if proc.wait() != 0:
        tail = "\n".join(recent[-10:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


async def build_base_image(
    backend: DockerBackend,
    tag: str = LOCAL_BASE,
    suite: str = "bookworm",
    mirror: str | None = None,
    force: bool = False,
    progress: Progress = print,
) -> bool:
    """Create a minimal Debian image with Python from the machine's apt mirror (no registry).

    Returns False when the image already existed and ``force`` is not set.

    Raises:
        ImageBuildError: debootstrap is missing or fails, or we are not root.
    """
    if not force and await backend.image_exists(tag):
        progress(f"{tag} already exists (use --force to rebuild)")
        return False
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed; run `apt-get install -y debootstrap`")
    if os.geteuid() != 0:
        raise ImageBuildError("creating a base image with debootstrap needs root; run it with sudo")
    mirror = mirror or debian_mirror()
    with tempfile.TemporaryDirectory(prefix="ks-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        progress(f"debootstrap {suite} from {mirror} (about a minute)")
        _stream(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv",
                suite,
                str(rootfs),
                mirror,
            ],
            progress,
            "debootstrap",
        )
        for junk in (
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
            "var/cache/apt",
            "var/lib/apt/lists",
        ):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        tarball = Path(tmp) / "rootfs.tar"
        progress(f"importing the root file system as {tag}")
        _stream(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], progress, "tar")
        await backend.import_rootfs(str(tarball), tag)
    progress(f"built {tag}")
    return True


def read_requirements(binder: Path) -> list[str]:
    """The requirement lines of ``binder/requirements.txt`` plus what every kernel needs.

    Raises:
        ImageBuildError: the folder is missing.
    """
    if not binder.is_dir():
        raise ImageBuildError(f"environment folder {binder} does not exist (--binder DIR)")
    lines: list[str] = []
    req = binder / "requirements.txt"
    if req.exists():
        lines = [
            line.strip()
            for line in req.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    for name in ALWAYS_REQUIRED:
        if not any(re.match(rf"{name}\b", line, re.IGNORECASE) for line in lines):
            lines.append(name)
    return lines


def dropped_packages(requirements: list[str]) -> list[str]:
    """The packages the build removes again: those of DROPPED_UNLESS_REQUESTED not asked for."""
    return [
        name
        for name in DROPPED_UNLESS_REQUESTED
        if not any(re.match(rf"{name}\b", line, re.IGNORECASE) for line in requirements)
    ]


def inside_files() -> list[Path]:
    """What of this package the kernel image gets: its ``__init__`` and ``inside/``, whole."""
    package = Path(__file__).resolve().parent.parent
    inside = sorted(p for p in (package / "inside").rglob("*.py") if "__pycache__" not in p.parts)
    return [package / "__init__.py", *inside]


def spec_hash(base: str, requirements: list[str], apt_packages: list[str]) -> str:
    """Identifies what an image was built from, so an unchanged spec is not rebuilt."""
    parts = [DOCKERFILE, base, *requirements, "apt:", *apt_packages]
    digest = hashlib.sha256("\n".join(parts).encode())
    for path in inside_files():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


async def build_kernel_image(
    backend: DockerBackend,
    base: str = DEFAULT_BASE,
    tag: str = DEFAULT_IMAGE,
    binder: Path | None = None,
    force: bool = False,
    progress: Progress = print,
    mirror: str | None = None,
) -> bool:
    """Build the kernel image from ``binder`` on top of ``base``, with no network in the build.

    ``binder/requirements.txt`` is installed from wheels and ``binder/apt.txt`` from ``.deb``
    files, both downloaded on the host first (the latter from ``mirror``, by default this
    machine's Debian mirror).

    Returns False when ``tag`` was already built from the same spec (and not ``force``).

    Raises:
        ImageMissing: the base is absent and cannot be pulled.
        ImageBuildError: wheels cannot be fetched or the build fails.
    """
    binder = binder or default_binder_dir()
    requirements = read_requirements(binder)
    apt_packages = read_apt_packages(binder)
    digest = spec_hash(base, requirements, apt_packages)
    labels = await backend.image_labels(tag)
    if not force and labels and labels.get(SPEC_LABEL) == digest:
        progress(f"{tag} is up to date (spec {digest}; use --force to rebuild)")
        return False
    if not await backend.image_exists(base):
        progress(f"pulling base image {base}")
        await backend.pull(base)
    version = await backend.run_once(
        base, ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    )
    progress(f"base {base} has Python {version}")
    with tempfile.TemporaryDirectory(prefix="ks-build-") as tmp:
        context = Path(tmp)
        (context / "requirements.txt").write_text("\n".join(requirements) + "\n")
        (context / "Dockerfile").write_text(DOCKERFILE)
        inside = context / "inside" / "kernel_sandbox"
        inside.mkdir(parents=True)
        package = Path(__file__).resolve().parent.parent
        for path in inside_files():
            target = inside / path.relative_to(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        wheels = context / "wheels"
        progress(f"downloading wheels for Python {version}: {', '.join(requirements)}")
        arch = platform.machine()
        platform_args = [arg for p in PLATFORM_TAGS for arg in ("--platform", p.format(arch=arch))]
        pip = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            version,
            "--implementation",
            "cp",
            *platform_args,
            "-d",
            str(wheels),
            "-r",
            str(context / "requirements.txt"),
        ]
        await asyncio.to_thread(_stream, pip, progress, "downloading wheels (pip download)")
        debs = context / "debs"  # the Dockerfile installs whatever .deb files are here
        debs.mkdir()
        if apt_packages:
            release = BaseRelease(
                base,
                await backend.run_once(base, release_probe),
                await backend.run_once(base, ["cat", "/var/lib/dpkg/status"]),
            )
            security = debian_security_mirror() if mirror is None else None
            await asyncio.to_thread(
                fetch_debs,
                release,
                apt_packages,
                debs,
                mirror or debian_mirror(),
                security,
                _stream,
                progress,
            )
        progress(f"building {tag} from {base} with no network")
        buildargs = {"BASE": base, "DROP": " ".join(dropped_packages(requirements))}
        await backend.build(str(context), tag, buildargs, {SPEC_LABEL: digest}, progress)
    progress(f"built {tag}")
    return True

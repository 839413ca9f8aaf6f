"""Fetching a binder's ``apt.txt`` packages on the host, for a hermetic image build.

The image build has no network, so the ``.deb`` files (with every dependency the base image
lacks) are downloaded beforehand by the host's own apt, pointed at a private state directory:
the base image's Debian release and architecture, its installed-package list, and the
Debian mirror of this machine's apt sources (air-gapped sites follow their own mirror). The
archive signatures are checked against the host's Debian keyring, as apt always does.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kernel_sandbox.errors import ImageBuildError

__all__ = ["BaseRelease", "fetch_debs", "read_apt_packages", "release_probe"]

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# A Debian package name (policy 5.6.1), optionally pinned to a version: name or name=version.
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$")
# Run in the base image: distribution, release codename, dpkg architecture.
release_probe = [
    "sh",
    "-c",
    "[ -r /etc/os-release ] && . /etc/os-release; "
    'echo "${ID:-unknown} ${VERSION_CODENAME:-?} '
    '$(dpkg --print-architecture 2>/dev/null || echo none)"',
]
Progress = Callable[[str], None]
Runner = Callable[[list[str], Progress, str], None]


def read_apt_packages(binder: Path) -> list[str]:
    """The package lines of ``binder/apt.txt`` (repo2docker's format: one per line, ``#`` comments).

    Raises:
        ImageBuildError: a line is not a Debian package name.
    """
    apt = binder / "apt.txt"
    if not apt.exists():
        return []
    packages = []
    for number, raw in enumerate(apt.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not PACKAGE.match(line):
            raise ImageBuildError(
                f"{apt}:{number}: {line!r} is not a Debian package name (one package per line, "
                "optionally name=version)"
            )
        packages.append(line)
    return packages


class BaseRelease:
    """What the base image is: its Debian codename, architecture and installed packages."""

    def __init__(self, base: str, probe_output: str, dpkg_status: str):
        words = probe_output.split()
        if len(words) != 3 or words[0] != "debian" or words[1] == "?":
            raise ImageBuildError(
                f"apt.txt needs a Debian base image; {base} reports {probe_output!r}. Use a "
                "Debian-based base (python:3.x-slim, kernel-sandbox/base:bookworm) or remove "
                "apt.txt"
            )
        self.base = base
        self.codename, self.arch = words[1], words[2]
        self.dpkg_status = dpkg_status


def _apt_options(root: Path, arch: str) -> list[str]:
    """apt-get options that keep every file apt reads or writes under ``root``."""
    settings = {
        "Dir::Etc::SourceList": root / "sources.list",
        "Dir::Etc::SourceParts": root / "sources.list.d",
        "Dir::Etc::Preferences": root / "preferences",
        "Dir::Etc::PreferencesParts": root / "preferences.d",
        "Dir::State": root / "state",
        "Dir::State::Lists": root / "state" / "lists",
        "Dir::State::status": root / "status",
        "Dir::Cache": root / "cache",
        "Dir::Cache::archives": root / "archives",
        "APT::Architecture": arch,
        "APT::Architectures": arch,
        "APT::Install-Recommends": "false",
        "APT::Sandbox::User": "root",  # the private dirs are ours; apt need not drop to _apt
        "Acquire::Languages": "none",
        "Debug::NoLocking": "true",  # nothing else uses the private dirs
    }
    return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]


def fetch_debs(
    release: BaseRelease,
    packages: list[str],
    dest: Path,
    mirror: str,
    security_mirror: str | None,
    run: Runner,
    progress: Progress,
) -> list[Path]:
    """Download ``packages`` and the dependencies ``release`` lacks into ``dest``.

    Raises:
        ImageBuildError: apt-get or the Debian keyring is missing on the host, or apt fails
            (an unknown package, an unreachable mirror).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if not packages:
        return []
    if shutil.which("apt-get") is None:
        raise ImageBuildError("apt.txt needs apt-get on the host (a Debian or Ubuntu machine)")
    if not KEYRING.is_file():
        raise ImageBuildError(
            f"apt.txt needs Debian's archive keyring ({KEYRING}); run "
            "`apt-get install -y debian-archive-keyring`"
        )
    with tempfile.TemporaryDirectory(prefix="ks-apt-") as tmp:  # outside the build context
        return _download(release, packages, dest, mirror, security_mirror, run, progress, Path(tmp))


def _download(
    release: BaseRelease,
    packages: list[str],
    dest: Path,
    mirror: str,
    security_mirror: str | None,
    run: Runner,
    progress: Progress,
    root: Path,
) -> list[Path]:
    for sub in (
        "sources.list.d",
        "preferences.d",
        "state/lists/partial",
        "archives/partial",
        "cache",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").write_text(release.dpkg_status + "\n")
    signed = f"[signed-by={KEYRING}]"
    sources = [
        f"deb {signed} {mirror} {suite} main"  # one-line format: one suite per line
        for suite in (release.codename, f"{release.codename}-updates")
    ]
    if security_mirror:
        sources.append(f"deb {signed} {security_mirror} {release.codename}-security main")
    (root / "sources.list").write_text("\n".join(sources) + "\n")
    apt = ["apt-get", "-q", *_apt_options(root, release.arch)]
    progress(f"fetching package lists for Debian {release.codename} ({release.arch}) from {mirror}")
    run([*apt, "update"], progress, "apt-get update (for apt.txt)")
    progress(f"downloading apt.txt packages: {', '.join(packages)}")
    run(
        [*apt, "install", "--download-only", "-y", *packages],
        progress,
        "apt-get install --download-only (for apt.txt)",
    )
    debs = sorted((root / "archives").glob("*.deb"))
    for deb in debs:
        shutil.move(str(deb), dest / deb.name)
    progress(f"{len(debs)} package file(s) for the image ({', '.join(packages)} and dependencies)")
    return [dest / deb.name for deb in debs]

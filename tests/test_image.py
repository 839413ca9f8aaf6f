"""``kernel-sandbox image build`` for real: the default image's analyst stack, the minimal
variant, apt.txt, the packages it drops, reuse, errors.

The default image (``ANALYST_IMAGE``: ``kernel-sandbox/python:latest``, or the tag in
``KS_TEST_KERNEL_IMAGE`` while a new default image is being tried under another tag) must
run what an analyst's first cells do: numpy, pandas reading and writing CSV and Parquet
(pyarrow), an inline matplotlib plot, an ipywidgets slider. Two test images are built through
the CLI: ``kernel-sandbox/python-minimal:test`` (``--minimal``) and
``kernel-sandbox/python-apt:test`` from a binder with an ``apt.txt`` (jq, which pulls two
libraries the base lacks) and a requirements.txt that asks for debugpy; the build itself has
no network, so the .deb files and wheels must have been fetched on the host.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import docker.errors
import pytest
from support import IMAGE as DEFAULT_IMAGE
from support.kernels import make_kernelspec, run_cell, sandbox_kernel

from kernel_sandbox.cli.app import main
from kernel_sandbox.errors import ImageBuildError
from kernel_sandbox.image.build import (
    DEFAULT_BASE,
    LOCAL_BASE,
    MINIMAL_IMAGE,
    default_binder_dir,
    dropped_packages,
    minimal_binder_dir,
    read_requirements,
)
from kernel_sandbox.image.debs import BaseRelease, read_apt_packages

REPO = Path(__file__).resolve().parent.parent
IMAGE = "kernel-sandbox/python-apt:test"
MINIMAL_TEST_IMAGE = "kernel-sandbox/python-minimal:test"
# The default image under test; another tag while a new default is tried out before :latest.
ANALYST_IMAGE = os.environ.get("KS_TEST_KERNEL_IMAGE", DEFAULT_IMAGE)
ANALYST_STACK = ("numpy", "pandas", "pyarrow", "matplotlib", "ipywidgets")


def pins(binder: Path) -> dict[str, str]:
    """``name: version`` of the requirements pinned with ``==``."""
    found = (re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line) for line in read_requirements(binder))
    return {m.group(1).lower(): m.group(2) for m in found if m}


def test_the_default_spec_pins_the_analyst_stack_and_the_minimal_one_has_none_of_it() -> None:
    assert default_binder_dir() == REPO / "binder"
    assert minimal_binder_dir() == REPO / "binder" / "minimal"
    assert set(ANALYST_STACK) <= set(pins(default_binder_dir()))
    minimal = [
        re.split(r"[<>=!~;\[ ]", line)[0] for line in read_requirements(minimal_binder_dir())
    ]
    assert minimal == ["ipykernel", "fsspec"]


def test_minimal_is_one_flag_and_excludes_a_binder(capsys) -> None:
    assert main(["image", "build", "--help"]) == 0
    assert MINIMAL_IMAGE in "".join(capsys.readouterr().out.split())  # argparse wraps at -
    assert main(["image", "build", "--minimal", "--binder", "elsewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "argument --binder: not allowed with argument --minimal "
        "(see `kernel-sandbox image build --help`)"
    ), err


def test_apt_txt_is_read_as_repo2docker_does(tmp_path: Path) -> None:
    (tmp_path / "apt.txt").write_text(
        "# tools\njq\n\n  curl=7.88.1-10+deb12u5  # pinned\nlibgomp1\n"
    )
    assert read_apt_packages(tmp_path) == ["jq", "curl=7.88.1-10+deb12u5", "libgomp1"]
    assert read_apt_packages(tmp_path / "nowhere") == []


@pytest.mark.parametrize("line", ["jq; rm -rf /", "-o APT::x=1", "Jq", "jq bash"])
def test_apt_txt_refuses_what_is_not_a_package_name(tmp_path: Path, line: str) -> None:
    (tmp_path / "apt.txt").write_text(f"less\n{line}\n")
    with pytest.raises(ImageBuildError, match=r"apt.txt:2: .* is not a Debian package name"):
        read_apt_packages(tmp_path)


def test_apt_txt_needs_a_debian_base() -> None:
    with pytest.raises(ImageBuildError, match="needs a Debian base image; alpine:3 reports"):
        BaseRelease("alpine:3", "alpine ? x86_64", "")
    release = BaseRelease("b", "debian bookworm\namd64", "Package: base-files\n")
    assert (release.codename, release.arch) == ("bookworm", "amd64")


def test_debugpy_is_dropped_unless_asked_for() -> None:
    assert dropped_packages(["ipykernel>=6.29", "fsspec"]) == ["debugpy"]
    assert dropped_packages(["ipykernel", "debugpy==1.8.*"]) == []
    assert dropped_packages(["ipykernel", "DebugPy"]) == []


@pytest.fixture(scope="module")
def base_image(docker_client) -> str:
    try:
        docker_client.images.get(LOCAL_BASE)
        return LOCAL_BASE
    except docker.errors.ImageNotFound:
        return DEFAULT_BASE


@pytest.fixture(scope="module")
def apt_binder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binder = tmp_path_factory.mktemp("binder-apt")
    requirements = (minimal_binder_dir() / "requirements.txt").read_text()
    (binder / "requirements.txt").write_text(requirements + "debugpy\n")
    (binder / "apt.txt").write_text("# a command-line tool with two libraries of its own\njq\n")
    return binder


@pytest.fixture(scope="module")
def apt_image(kernel_image: str, base_image: str, apt_binder: Path) -> str:
    argv = ["image", "build", "--base", base_image, "--tag", IMAGE, "--binder", str(apt_binder)]
    assert main(argv) == 0
    return IMAGE


@pytest.mark.integration
def test_apt_txt_packages_and_requested_debugpy_are_in_the_image(apt_image, leak_check) -> None:
    name = make_kernelspec("apt-image", {"image": apt_image})
    with sandbox_kernel(name) as (_, kc):
        got = run_cell(
            kc,
            "import subprocess, debugpy\n"
            "print(subprocess.run(['jq', '--version'], capture_output=True,"
            " text=True, check=True).stdout)",
        )
    assert got["status"] == "ok", got
    assert got["stdout"].startswith("jq-1.")


@pytest.mark.integration
def test_an_unchanged_spec_is_not_rebuilt(apt_image, base_image, apt_binder, capsys) -> None:
    capsys.readouterr()
    argv = ["image", "build", "--base", base_image, "--tag", apt_image, "--binder", str(apt_binder)]
    assert main(argv) == 0
    assert "is up to date" in capsys.readouterr().err


@pytest.mark.integration
def test_the_default_image_leaves_debugpy_out(kernel_image: str, leak_check) -> None:
    """ipykernel would import it at every start for a debugger the kernelspec switches off."""
    name = make_kernelspec("default-image", {"image": ANALYST_IMAGE})
    leak_check.spec(name)
    with sandbox_kernel(name) as (_, kc):
        got = run_cell(
            kc,
            "import importlib.util, ipykernel\n"
            "print(importlib.util.find_spec('debugpy'), ipykernel.__version__)",
        )
    assert got["status"] == "ok", got
    assert got["stdout"].startswith("None ")


@pytest.mark.integration
def test_an_unknown_apt_package_fails_before_building(
    kernel_image: str, base_image: str, tmp_path: Path, docker_client, capsys
) -> None:
    (tmp_path / "apt.txt").write_text("no-such-package-kernel-sandbox\n")
    tag = "kernel-sandbox/never-built:test"
    argv = ["image", "build", "--base", base_image, "--tag", tag, "--binder", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "apt-get install --download-only (for apt.txt) failed" in err
    assert "Unable to locate package no-such-package-kernel-sandbox" in err
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(tag)


@pytest.fixture(scope="module")
def not_debian_base(base_image: str, docker_client, tmp_path_factory) -> str:
    """The base with another distribution's /etc/os-release and no dpkg."""
    context = tmp_path_factory.mktemp("not-debian")
    (context / "Dockerfile").write_text(
        f"FROM {base_image}\n"
        "RUN rm -f /etc/os-release /usr/bin/dpkg && printf 'ID=alpine\\nVERSION_ID=3.20\\n' "
        "> /etc/os-release\n"
    )
    tag = "kernel-sandbox/not-debian:test"
    docker_client.images.build(path=str(context), tag=tag, network_mode="none", rm=True)
    return tag


@pytest.mark.integration
def test_apt_txt_on_a_base_that_is_not_debian(not_debian_base, tmp_path, capsys) -> None:
    (tmp_path / "apt.txt").write_text("jq\n")
    argv = [
        "image",
        "build",
        "--base",
        not_debian_base,
        "--tag",
        "kernel-sandbox/never:test",
        "--binder",
        str(tmp_path),
    ]
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert f"apt.txt needs a Debian base image; {not_debian_base} reports 'alpine ? none'" in err


STACK = r"""
import json, matplotlib, numpy as np, pandas as pd, pyarrow, ipywidgets
import matplotlib.pyplot as plt
df = pd.DataFrame({"x": np.arange(6), "y": np.arange(6) ** 2, "name": list("abcdef")})
df.to_csv("/tmp/d.csv", index=False)
df.to_parquet("/tmp/d.parquet")
csv, parquet = pd.read_csv("/tmp/d.csv", engine="pyarrow"), pd.read_parquet("/tmp/d.parquet")
plt.plot(df.x, df.y)
plt.show()
display(ipywidgets.IntSlider(value=3, max=10))
print(json.dumps({
    "versions": {m.__name__: m.__version__ for m in (np, pd, pyarrow, matplotlib, ipywidgets)},
    "backend": matplotlib.get_backend(),
    "csv": csv.equals(df), "parquet": parquet.equals(df),
}))
"""


def iopub_of(kc, code: str, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Execute ``code``; return the reply's content and every IOPub message it caused."""
    messages: list[dict] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=messages.append)
    return reply["content"], messages


@pytest.mark.integration
@pytest.mark.parametrize("profile", ["strict", "untrusted"])  # runc, and gVisor (runsc)
def test_the_default_image_has_the_analyst_stack(kernel_image: str, profile: str, leak_check):
    """An analyst's first cells: a DataFrame to and from CSV and Parquet, an inline plot and a
    widget, in the default sandbox (no network, read-only root) and under gVisor, where
    agents' code runs."""
    name = make_kernelspec(f"analyst-stack-{profile}", {"profile": profile, "image": ANALYST_IMAGE})
    leak_check.spec(name)
    with sandbox_kernel(name) as (_, kc):
        # start-up pays for none of it: nothing of the stack is imported until a cell does
        loaded = run_cell(
            kc, f"import sys\nprint(sorted(set({ANALYST_STACK!r}) & set(sys.modules)))"
        )
        reply, messages = iopub_of(kc, STACK)
    assert loaded["stdout"] == "[]\n", loaded
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert reply["status"] == "ok", errors
    stdout = "".join(
        m["content"]["text"] for m in messages if m["msg_type"] == "stream"
    ).splitlines()
    got = json.loads(stdout[-1])
    pinned = pins(default_binder_dir())
    assert got["versions"] == {name: pinned[name] for name in ANALYST_STACK}
    assert got["csv"] and got["parquet"], got
    # ipykernel's default: plots are outputs, not windows
    assert got["backend"] == "module://matplotlib_inline.backend_inline"
    shown = [m["content"]["data"] for m in messages if m["msg_type"] == "display_data"]
    assert any(data.get("image/png", "").startswith("iVBOR") for data in shown), shown
    assert any("application/vnd.jupyter.widget-view+json" in data for data in shown), shown
    opened = [m["content"] for m in messages if m["msg_type"] == "comm_open"]
    assert any(c["target_name"] == "jupyter.widget" for c in opened), opened


@pytest.fixture(scope="module")
def minimal_image(kernel_image: str, base_image: str) -> str:
    argv = ["image", "build", "--minimal", "--base", base_image, "--tag", MINIMAL_TEST_IMAGE]
    assert main(argv) == 0
    return MINIMAL_TEST_IMAGE


@pytest.mark.integration
def test_minimal_builds_the_kernel_without_the_stack(
    minimal_image: str, docker_client, leak_check
) -> None:
    name = make_kernelspec("minimal-image", {"image": minimal_image})
    leak_check.spec(name)
    with sandbox_kernel(name) as (_, kc):
        got = run_cell(
            kc,
            "import importlib.util as u, fsspec, ipykernel\n"
            f"print(sorted(m for m in {ANALYST_STACK!r} if u.find_spec(m)))",
        )
    assert got["status"] == "ok", got
    assert got["stdout"] == "[]\n"
    minimal = docker_client.images.get(minimal_image).attrs["Size"]
    analyst = docker_client.images.get(ANALYST_IMAGE).attrs["Size"]
    assert analyst > minimal + 200_000_000  # the stack is ~430 MB (docs/benchmarks.md)


@pytest.mark.integration
def test_plots_are_recorded_in_a_ci_kernel(kernel_image: str, leak_check) -> None:
    """The ci profile (kernel-sandbox run) keeps figures in the executed notebook: it used to
    set MPLBACKEND=Agg, which made plt.show() a no-op there."""
    name = make_kernelspec("ci-plots", {"profile": "ci", "image": ANALYST_IMAGE})
    leak_check.spec(name)
    with sandbox_kernel(name) as (_, kc):
        reply, messages = iopub_of(kc, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])")
    assert reply["status"] == "ok", messages
    shown = [m["content"]["data"] for m in messages if m["msg_type"] == "display_data"]
    assert any("image/png" in data for data in shown), messages

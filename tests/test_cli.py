"""The operator's commands, through ``kernel_sandbox.cli.app.main`` and the console script.

Kernelspecs are installed under a temporary prefix put on JUPYTER_PATH; only the ps/stop test
starts a (real) kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from support.kernels import make_kernelspec, run_cell, sandbox_kernel

from kernel_sandbox.cli import doctor
from kernel_sandbox.cli.app import main
from kernel_sandbox.kernelspec import shipped_kernelspecs

IMAGE = "kernel-sandbox/python:latest"
FOLDER_OWNER = 4242  # a test folder's owner: no account here, outside uid_range


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jupyter_path: Path) -> Path:
    """An install prefix whose kernelspecs Jupyter sees (first on JUPYTER_PATH)."""
    root = tmp_path / "prefix"
    share = root / "share" / "jupyter"
    share.mkdir(parents=True)
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(share), os.environ["JUPYTER_PATH"]]))
    return root


def kernel_json(prefix: Path, name: str) -> dict:
    return json.loads((prefix / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# -- help and usage errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ([], "Run Jupyter kernels in ephemeral"),
        (["install"], "write one Python kernelspec with that policy"),
        (["wrap"], "runs KERNEL_NAME's command inside"),
        (["policy"], "lowest first: the built-in defaults"),
        (["policy", "show"], "print each value with its source"),
        (["policy", "profiles"], "side by side"),
        (["doctor"], "exits 1 if anything failed"),
        (["ps"], "memory in use"),
        (["stop"], "the server forgets it rather than restarting it"),
        (["gc"], "owners that died"),
    ],
)
def test_every_command_explains_itself(command, says, capsys):
    assert main([*command, "--help"]) == 0
    assert says in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["install", "--bogus"],
        ["stop"],
        ["wrap", "python3"],
        ["install", "--workspace", "x"],
        ["policy"],
        ["nonsense"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "error:" in line and "--help" in line


# -- install --------------------------------------------------------------------------------


def test_plain_install_keeps_installing_the_shipped_kernelspec(prefix):
    assert main(["install", "--prefix", str(prefix)]) == 0
    shipped = shipped_kernelspecs()[0]
    installed = prefix / "share" / "jupyter" / "kernels" / shipped.name
    assert json.loads((installed / "kernel.json").read_text()) == json.loads(
        (shipped / "kernel.json").read_text()
    )
    assert "python3-sandbox" in KernelSpecManager().find_kernel_specs()


def test_install_with_a_policy_writes_it_in_the_kernelspec(prefix, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    argv = [
        "install",
        "--prefix",
        str(prefix),
        "--profile",
        "analyst",
        "--name",
        "analyst-box",
        "--display-name",
        "Analyst (sandboxed)",
        "--image",
        IMAGE,
        "--memory-limit",
        "3G",
        "--cpu-limit",
        "1.5",
        "--pids-limit",
        "300",
        "--tmpfs-size",
        "512m",
        "--workspace",
        "ro",
        "--mount",
        str(data),
        "--mount",
        f"{out}:/data/out:rw",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--env-passthrough",
        "MY_TOKEN",
        "--runtime",
        "runsc",
        "--idle-timeout",
        "1h",
        "--run-as",
        "1000:1000",
    ]
    assert main(argv) == 0
    assert "installed kernelspec analyst-box" in capsys.readouterr().out
    spec = kernel_json(prefix, "analyst-box")
    assert spec["display_name"] == "Analyst (sandboxed)" and spec["language"] == "python"
    provisioner = spec["metadata"]["kernel_provisioner"]
    assert provisioner["provisioner_name"] == "docker-sandbox"
    assert provisioner["config"] == {
        "profile": "analyst",
        "image": IMAGE,
        "memory_limit": "3g",
        "cpu_limit": 1.5,
        "pids_limit": 300,
        "tmpfs_size": "512m",
        "workspace": "ro",
        "mounts": [f"{data}:ro", f"{out}:/data/out:rw"],
        "env": {"A": "1", "B": "x=y"},
        "env_passthrough": ["MY_TOKEN"],
        "runtime": "runsc",
        "idle_timeout": 3600,
        "user": "1000:1000",
    }
    folder = prefix / "share" / "jupyter" / "kernels" / "analyst-box"
    assert (folder / "logo-64x64.png").exists()


def test_install_defaults_the_name_from_the_profile_and_makes_mounts_absolute(
    prefix, tmp_path, monkeypatch
):
    (tmp_path / "course").mkdir()
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "install",
                "--prefix",
                str(prefix),
                "--profile",
                "educator",
                "--mount",
                "course:/course",
            ]
        )
        == 0
    )
    spec = kernel_json(prefix, "python3-sandbox-educator")
    assert spec["display_name"] == "Python 3 (sandboxed, educator)"
    assert spec["metadata"]["kernel_provisioner"]["config"] == {
        "profile": "educator",
        "mounts": [f"{tmp_path}/course:/course:ro"],
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--name", "x", "--memory-limit", "lots"], "memory_limit: expected a size"),
        (["--name", "x", "--mount", "/"], "refusing to mount /"),
        (["--name", "x", "--mount", "/proc"], "nothing under /proc"),
        (["--name", "x", "--mount", "/var/run/docker.sock"], "Docker socket"),
        (["--name", "x", "--env", "NOEQUALS"], "--env: expected NAME=VALUE"),
        (["--name", "x", "--run-as", "0:0"], "must not run as root"),
        (["--profile", "nonexistent"], "unknown profile 'nonexistent'"),
        (["--name", "bad name!", "--profile", "ci"], "not a valid kernelspec name"),
        (["--display-name", "only this"], "--name is required"),
        (["--name", "x", "--idle-timeout", "soon"], "idle_timeout: expected seconds"),
        (["--name", "x", "--seccomp", "/no/such.json"], "seccomp: cannot read the profile"),
        (["--name", "x", "--cpu-limit", "100000"], "is more than this host's"),
    ],
)
def test_install_refuses_bad_values_before_writing_anything(prefix, flags, message, capsys):
    assert main(["install", "--prefix", str(prefix), *flags]) == 2
    line = one_error_line(capsys)
    assert message in line and line.startswith("error:")
    assert not (prefix / "share" / "jupyter" / "kernels").exists()


def test_install_checks_against_the_operators_config(prefix, tmp_path, capsys):
    config = tmp_path / "site_config.py"
    config.write_text(
        "c.DockerSandboxProvisioner.ceilings = {'memory_limit': '2g'}\n"
        "c.DockerSandboxProvisioner.profiles = {'course': {'extends': 'educator', "
        "'memory_limit': '768m'}}\n"
    )
    assert (
        main(
            [
                "install",
                "--prefix",
                str(prefix),
                "--config",
                str(config),
                "--name",
                "big",
                "--memory-limit",
                "4g",
            ]
        )
        == 2
    )
    assert "exceeds the operator's ceiling of 2g" in one_error_line(capsys)
    assert (
        main(
            [
                "install",
                "--prefix",
                str(prefix),
                "--config",
                str(config),
                "--profile",
                "course",
                "--name",
                "c101",
            ]
        )
        == 0
    )
    assert kernel_json(prefix, "c101")["metadata"]["kernel_provisioner"]["config"] == {
        "profile": "course"
    }
    assert "installed kernelspec c101" in capsys.readouterr().out
    assert main(["policy", "show", "c101", "--json", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["policy"]["memory_limit"] == "768m"
    assert shown["sources"]["memory_limit"] == "profile course"


# -- wrap -----------------------------------------------------------------------------------


def write_spec(prefix: Path, name: str, spec: dict) -> Path:
    folder = prefix / "share" / "jupyter" / "kernels" / name
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec))
    return folder


def test_wrap_makes_a_sandboxed_variant_of_any_kernel(prefix, capsys):
    folder = write_spec(
        prefix,
        "fake-r",
        {
            "argv": [
                "/usr/lib/R/bin/R",
                "--slave",
                "-e",
                "IRkernel::main()",
                "--args",
                "{connection_file}",
            ],
            "display_name": "R",
            "language": "R",
            "env": {"R_LIBS_USER": "/opt/r"},
            "metadata": {"debugger": True},
        },
    )
    (folder / "logo-64x64.png").write_bytes(b"png")
    (folder / "kernel.js").write_text("// js")
    assert (
        main(
            [
                "wrap",
                "fake-r",
                "--image",
                "my/r-kernel:4.3",
                "--prefix",
                str(prefix),
                "--profile",
                "analyst",
                "--memory-limit",
                "3g",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "installed kernelspec fake-r-sandboxed" in out and "'R'" in out
    spec = kernel_json(prefix, "fake-r-sandboxed")
    assert spec["argv"] == ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]
    assert spec["language"] == "R" and spec["display_name"] == "R (sandboxed)"
    assert spec["env"] == {"R_LIBS_USER": "/opt/r"} and spec["interrupt_mode"] == "signal"
    assert spec["metadata"]["debugger"] is False
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "docker-sandbox",
        "config": {"profile": "analyst", "image": "my/r-kernel:4.3", "memory_limit": "3g"},
    }
    wrapped = prefix / "share" / "jupyter" / "kernels" / "fake-r-sandboxed"
    assert (wrapped / "logo-64x64.png").exists() and (wrapped / "kernel.js").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {
                "argv": ["python", "-f", "{connection_file}"],
                "display_name": "x",
                "metadata": {"kernel_provisioner": {"provisioner_name": "docker-sandbox"}},
            },
            "already sandboxed",
        ),
        (
            {"argv": ["python", "{resource_dir}/k.py", "{connection_file}"], "display_name": "x"},
            "runs files from its own folder",
        ),
        ({"argv": ["python", "-m", "x"], "display_name": "x"}, "no {connection_file}"),
    ],
)
def test_wrap_refuses_what_cannot_run_in_a_sandbox(prefix, spec, message, capsys):
    name = f"w-{uuid.uuid4().hex[:6]}"
    write_spec(prefix, name, spec)
    assert main(["wrap", name, "--image", IMAGE, "--prefix", str(prefix)]) == 2
    assert message in one_error_line(capsys)


def test_wrap_of_a_missing_kernelspec(prefix, capsys):
    assert main(["wrap", "no-such-kernel", "--image", IMAGE]) == 2
    assert "no kernelspec named 'no-such-kernel'" in one_error_line(capsys)


# -- policy show / profiles ------------------------------------------------------------------


def test_policy_show_table_says_where_each_value_came_from(jupyter_path, capsys):
    name = make_kernelspec(
        f"show-{uuid.uuid4().hex[:6]}", {"profile": "educator", "memory_limit": "768m"}
    )
    assert main(["policy", "show", name]) == 0
    out = capsys.readouterr().out
    assert f"kernelspec {name}" in out and "profile educator (from kernelspec)" in out
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
        for line in out.splitlines()
        if line.count("│") >= 4
    }
    assert rows["memory_limit"] == ["768m", "kernelspec"]
    assert rows["cpu_limit"] == ["0.5", "profile educator"]
    assert rows["image"] == [IMAGE, "default"]
    assert rows["idle_timeout"] == ["3600s", "profile educator"]


def test_policy_show_errors(jupyter_path, capsys):
    assert main(["policy", "show", "python3-local"]) == 2
    line = one_error_line(capsys)
    assert "is not sandboxed" in line and "kernel-sandbox wrap python3-local" in line
    assert main(["policy", "show", "no-such-kernel"]) == 2
    assert "no kernelspec named" in one_error_line(capsys)
    bad = make_kernelspec(f"show-{uuid.uuid4().hex[:6]}", {"workspace": "sometimes"})
    assert main(["policy", "show", bad]) == 2
    assert f"kernelspec {bad}: workspace: expected one of none, ro, rw" in one_error_line(capsys)


def test_policy_profiles(tmp_path, capsys):
    config = tmp_path / "c.py"
    config.write_text(
        "c.DockerSandboxProvisioner.profiles = {'mine': {'extends': 'ci', 'cpu_limit': 2}}\n"
    )
    assert main(["policy", "profiles", "--json", "--config", str(config)]) == 0
    profiles = json.loads(capsys.readouterr().out)
    assert list(profiles) == ["strict", "analyst", "educator", "ci", "untrusted", "mine"]
    assert profiles["mine"]["cpu_limit"] == 2.0 and profiles["mine"]["env"]["TZ"] == "UTC"
    assert profiles["untrusted"]["runtime"] == "runsc"
    assert main(["policy", "profiles"]) == 0
    assert "educator" in capsys.readouterr().out


# -- doctor ---------------------------------------------------------------------------------


def statuses(checks) -> dict:
    return {f"{c.area}: {c.name}": c for c in checks}


def test_doctor_says_how_to_register_an_installed_runsc():
    info = {"Runtimes": {"runc": {"path": "runc"}}}
    checks = statuses(doctor.check_runtimes(info, {}, which=lambda _: "/usr/bin/runsc"))
    runsc = checks["runtime: runsc"]
    assert runsc.status == "warn"
    assert "installed (/usr/bin/runsc) but not registered" in runsc.detail
    assert "/etc/docker/daemon.json" in runsc.fix and "kill -HUP" in runsc.fix
    snippet = json.loads(runsc.fix.split(": ", 1)[1].split("; ")[0])
    assert snippet == {
        "runtimes": {
            "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=all"]}
        }
    }
    needed = statuses(doctor.check_runtimes(info, {"runsc": ["agent"]}, lambda _: "/usr/bin/runsc"))
    assert needed["runtime: runsc"].status == "fail"


def test_doctor_runtime_problems():
    bare = {"Runtimes": {"runc": {}, "runsc": {"path": "/usr/bin/runsc"}}}
    checks = statuses(doctor.check_runtimes(bare, {}, lambda _: None))
    assert checks["runtime: runsc"].status == "fail"
    assert "--host-uds" in checks["runtime: runsc"].detail
    good = {
        "Runtimes": {
            "runc": {},
            "runsc": {
                "path": "/usr/bin/runsc",
                "runtimeArgs": ["--network=none", "--host-uds=all"],
            },
        }
    }
    checks = statuses(doctor.check_runtimes(good, {"kata": ["vm-kernel"]}, lambda _: None))
    assert checks["runtime: runsc"].status == "ok"
    kata = checks["runtime: kata"]
    assert kata.status == "fail" and "vm-kernel" in kata.detail
    none = statuses(doctor.check_runtimes({"Runtimes": {"runc": {}}}, {}, lambda _: None))
    assert none["runtime: runsc"].status == "warn"
    assert "apt-get install runsc" in none["runtime: runsc"].fix


def test_doctor_runtime_root_checks(tmp_path):
    def check(root, **kwargs) -> dict:
        return statuses(doctor.check_runtime_root(str(root), **kwargs))

    assert check(tmp_path / ("x" * 90))["runtime_root: socket paths"].status == "fail"
    root = tmp_path / "rt"
    assert check(root)["runtime_root: permissions"].status == "ok"  # created on first start
    root.mkdir()
    os.chmod(root, 0o755)
    loose = check(root)["runtime_root: permissions"]
    assert loose.status == "fail" and loose.fix == f"chmod 700 {root}"
    os.chmod(root, 0o700)
    assert check(root)["runtime_root: permissions"].status == "ok"
    foreign = check(root, uid=4242)["runtime_root: permissions"]
    assert foreign.status == "fail" and "not to you" in foreign.detail
    (tmp_path / "link").symlink_to(root)
    assert check(tmp_path / "link")["runtime_root: permissions"].status == "fail"


def test_doctor_image_checks():
    missing = doctor.check_image(IMAGE, None, ["python3-sandbox"])
    assert missing.status == "fail" and "kernel-sandbox image build" in missing.fix
    foreign = doctor.check_image("my/r:1", {}, ["r"])
    assert foreign.status == "warn" and "no in-sandbox watchdog" in foreign.detail
    assert doctor.check_image(IMAGE, {"io.kernel-sandbox.image": "kernel"}, []).status == "ok"


def run_doctor(tmp_path: Path, *specs: tuple[str, dict]) -> subprocess.CompletedProcess:
    data = tmp_path / f"doctor-{uuid.uuid4().hex[:6]}"
    for name, config in specs:
        folder = data / "kernels" / name
        folder.mkdir(parents=True)
        (folder / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": name,
                    "language": "python",
                    "metadata": {
                        "kernel_provisioner": {
                            "provisioner_name": "docker-sandbox",
                            "config": config,
                        }
                    },
                }
            )
        )
    env = {**os.environ, "JUPYTER_PATH": str(data)}
    return subprocess.run(
        ["kernel-sandbox", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=120
    )


def test_doctor_against_this_machine(tmp_path, docker_client, kernel_image):
    good = run_doctor(tmp_path, ("doc-good", {"profile": "analyst"}))
    checks = {f"{c['area']}: {c['name']}": c for c in json.loads(good.stdout)}
    assert checks["engine: docker"]["status"] == "ok"
    assert checks["jupyter: provisioner"]["status"] == "ok"
    assert checks[f"image: {IMAGE}"]["status"] == "ok"
    assert checks["kernelspec: doc-good"]["status"] == "ok"
    assert checks["runtime_root: socket paths"]["status"] == "ok"
    assert "runtime: registered" in checks
    failing = [c for c in checks.values() if c["status"] == "fail"]
    assert good.returncode == (1 if failing else 0), failing

    bad = run_doctor(
        tmp_path,
        ("doc-good", {}),
        ("doc-bad", {"memory_limit": "lots"}),
        ("doc-noimage", {"image": "kernel-sandbox/none:missing"}),
    )
    assert bad.returncode == 1
    checks = {f"{c['area']}: {c['name']}": c for c in json.loads(bad.stdout)}
    assert checks["kernelspec: doc-bad"]["status"] == "fail"
    assert "memory_limit: expected a size" in checks["kernelspec: doc-bad"]["detail"]
    assert "kernel.json" in checks["kernelspec: doc-bad"]["fix"]
    assert checks["image: kernel-sandbox/none:missing"]["status"] == "fail"
    assert "doc-noimage" in checks["image: kernel-sandbox/none:missing"]["detail"]


# -- the console script ------------------------------------------------------------------------


@pytest.mark.integration  # asks the engine
def test_console_script():
    version = subprocess.run(["kernel-sandbox", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("kernel-sandbox ")
    stop = subprocess.run(
        ["kernel-sandbox", "stop", f"nokernel{uuid.uuid4().hex[:6]}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stop.returncode == 2 and len(stop.stderr.strip().splitlines()) == 1
    assert "no sandboxed kernel" in stop.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", "install", "--nope"],
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1


@pytest.mark.integration  # asks the engine
def test_gc_dry_run(capsys):
    assert main(["gc", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out


# -- ps and stop, with a real kernel of a wrapped kernelspec ----------------------------------


def test_ps_lists_a_wrapped_kernel_and_stop_ends_it(prefix, tmp_path, leak_check, capsys):
    # python3-local's argv names this interpreter's absolute path: it becomes "python".
    assert (
        main(
            [
                "wrap",
                "python3-local",
                "--image",
                IMAGE,
                "--prefix",
                str(prefix),
                "--name",
                "local-wrapped",
                "--profile",
                "educator",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # educator's read-write workspace: an account's folder (a root-owned one is refused)
    work = tmp_path / "work"
    work.mkdir()
    if os.getuid() == 0:
        os.chown(work, FOLDER_OWNER, FOLDER_OWNER)
    with sandbox_kernel("local-wrapped", cwd=str(work)) as (km, kc):
        assert run_cell(kc, "print(6 * 7)")["stdout"] == "42\n"
        assert main(["ps", "--json"]) == 0
        listed = {s["kernel_id"]: s for s in json.loads(capsys.readouterr().out)}
        mine = listed[km.kernel_id]
        assert mine["kernelspec"] == "local-wrapped" and mine["profile"] == "educator"
        assert mine["state"] == "running" and mine["owner_pid"] == os.getpid()
        assert 0 < mine["memory"] < mine["memory_limit"] == 512 * 1024**2  # educator's
        assert 0 <= mine["uptime"] < 600
        assert main(["ps"]) == 0
        assert km.kernel_id in capsys.readouterr().out
        assert main(["stop", km.kernel_id[:13]]) == 0
        assert "shut down by its owner" in capsys.readouterr().out
        deadline = time.monotonic() + 15
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not km.is_alive()
    assert main(["ps", "--json"]) == 0
    assert km.kernel_id not in {s["kernel_id"] for s in json.loads(capsys.readouterr().out)}


# -- what users paste, and where a kernelspec is seen -------------------------------------------


def test_install_takes_an_egress_url_and_relative_dataset_paths(prefix, tmp_path, monkeypatch):
    """A pasted URL is its host and port; --dataset, like --mount, takes a relative folder
    from the current directory and stores it absolute."""
    (tmp_path / "sales").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["install", "--prefix", str(prefix), "--name", "pasted"]
    argv += ["--network", "allowlist", "--egress", "https://api.example.test/v1"]
    argv += ["--dataset", "sales=sales:read", "--mount", "sales:/data/sales"]
    assert main(argv) == 0
    config = kernel_json(prefix, "pasted")["metadata"]["kernel_provisioner"]["config"]
    assert config["egress"] == ["api.example.test:443"]
    assert config["datasets"] == {"sales": f"{tmp_path}/sales:read"}
    assert config["mounts"] == [f"{tmp_path}/sales:/data/sales:ro"]


def _venv(path: Path) -> Path:
    """A real virtual environment of this Python (no pip: no network), seeing its packages."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)],
        check=True,
        timeout=120,
    )
    return path / "bin" / "python"


def test_install_says_which_jupyter_sees_the_kernelspec(tmp_path):
    """The issue's NoSuchKernel, for real: a --sys-prefix kernelspec of one environment is not
    found by another environment's Jupyter, and install says so; a --user one is found."""
    venv, other = _venv(tmp_path / "venv"), _venv(tmp_path / "other")
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_PATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "user-data")

    def install(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = [str(venv), "-m", "kernel_sandbox.cli", "install", *flags]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    def finds(python: Path, name: str) -> bool:
        code = "from jupyter_client.kernelspec import KernelSpecManager as M; "
        code += f"M().get_kernel_spec({name!r})"
        return subprocess.run([str(python), "-c", code], env=env, timeout=60).returncode == 0

    in_env = install("--sys-prefix", "--name", "vis-env")
    assert (
        f"vis-env is seen by Jupyter run from this Python environment ({tmp_path / 'venv'})"
        in in_env.stdout
    )
    assert "a virtual environment's Jupyter (python3 -m venv) does NOT see it" in in_env.stdout
    assert finds(venv, "vis-env") and not finds(other, "vis-env")  # what it said
    if shutil.which("jupyter"):  # this Python's jupyter, not the venv's
        assert "warning: the `jupyter` on your PATH" in in_env.stderr

    for_user = install("--user", "--name", "vis-user")
    assert "vis-user is seen by every Jupyter you run" in for_user.stdout
    assert "does NOT see it" not in for_user.stdout + for_user.stderr
    assert finds(venv, "vis-user") and finds(other, "vis-user")


def test_visibility_names_a_jupyter_on_path_that_misses_the_kernelspec(prefix):
    from kernel_sandbox.cli.visibility import kernelspec_visibility

    assert main(["install", "--prefix", str(prefix), "--name", "seen"]) == 0
    where = str(prefix / "share" / "jupyter" / "kernels" / "seen")
    elsewhere = kernelspec_visibility(where, ("/opt/other/bin/jupyter", ["/opt/other/share"]))
    assert elsewhere.problem
    assert (
        True,
        "the `jupyter` on your PATH (/opt/other/bin/jupyter) does NOT see it (NoSuchKernel)",
    ) in elsewhere.lines()
    same = kernelspec_visibility(where, ("/usr/bin/jupyter", [str(prefix / "share" / "jupyter")]))
    assert not same.problem and all(not warning for warning, _ in same.lines())
    assert doctor.visibility_findings({"seen": where})[0][:2] == ("seen visibility", "ok")


def test_doctor_fails_a_cpu_limit_above_the_engines_cpus():
    checks = doctor.check_cpus({"NCPU": 2}, {"small": 1.0, "big": 4.0})
    assert [(c.name, c.status) for c in checks] == [("big", "fail")]
    assert "cpu_limit 4 is more than the engine's 2 CPUs" in checks[0].detail
    assert doctor.check_cpus({}, {"big": 4.0}) == []


def test_install_warns_when_the_engine_lacks_the_runtime(prefix, capsys):
    """A runtime can be registered after the install (doctor fails until it is): a warning."""

    class Engine:
        async def runtimes(self) -> list[str]:
            return ["runc", "runsc"]

    argv = ["install", "--prefix", str(prefix), "--name", "kata-box", "--runtime"]
    assert main([*argv, "kata"], backend=Engine()) == 0  # type: ignore[arg-type]
    captured = capsys.readouterr()
    assert "installed kernelspec kata-box" in captured.out
    assert captured.err.strip() == (
        "warning: the Docker engine has no OCI runtime 'kata': kernels of kata-box will not "
        "start until it is registered (`kernel-sandbox doctor` says how)"
    )
    assert main([*argv, "runsc"], backend=Engine()) == 0  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""

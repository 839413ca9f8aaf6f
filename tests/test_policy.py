"""The policy: every key's validation, the profiles, precedence and ceilings (no containers).

Precedence is checked through the real jupyter_client plumbing (a KernelManager with a
traitlets Config creates the provisioner through the provisioner factory) and through real
Jupyter config files read by a separate process (``JUPYTER_CONFIG_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
import uuid
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from support.kernels import make_kernelspec
from traitlets.config import Config

from kernel_sandbox.batch import config as batch_config
from kernel_sandbox.cli.app import build_parser
from kernel_sandbox.cli.policy import POLICY_FLAGS
from kernel_sandbox.engine import backend
from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy import (
    CEILING_KEYS,
    KEYS,
    MERGED_KEYS,
    POLICY_KEYS,
    PROFILES,
    RESERVED_TARGETS,
    Mount,
    SandboxPolicy,
    display_value,
    format_size,
    layer_policy,
    parse_mount,
    profile_values,
    resolve_workspace,
    validate,
)
from kernel_sandbox.policy.effective import effective_policy, load_jupyter_config
from kernel_sandbox.policy.host import host_cpus
from kernel_sandbox.provisioner.docker_provisioner import DockerSandboxProvisioner

REPO = Path(__file__).resolve().parent.parent
G, M = 1024**3, 1024**2


# -- every key: good values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "typed"),
    [
        ("image", "kernel-sandbox/python:latest", "kernel-sandbox/python:latest"),
        (
            "image",
            " registry.corp.test:5000/team/r-kernel@sha256:abc ",
            "registry.corp.test:5000/team/r-kernel@sha256:abc",
        ),
        ("memory_limit", "2g", 2 * G),
        ("memory_limit", "512m", 512 * M),
        ("memory_limit", "64MiB", 64 * M),
        ("memory_limit", "1.5G", int(1.5 * G)),
        ("memory_limit", 1073741824, G),
        ("cpu_limit", 1.5, 1.5),
        ("cpu_limit", "0.5", 0.5),
        ("cpu_limit", 2, 2.0),
        ("pids_limit", 64, 64),
        ("pids_limit", "128", 128),
        ("tmpfs_size", "64m", 64 * M),
        ("workspace", "none", "none"),
        ("workspace", "ro", "ro"),
        ("workspace", "rw", "rw"),
        ("env", {"A": "1", "B_2": 3}, {"A": "1", "B_2": "3"}),
        ("env", {}, {}),
        ("env_passthrough", ["LANG", "MY_TOKEN", "LANG"], ("LANG", "MY_TOKEN")),
        ("runtime", "runsc", "runsc"),
        ("runtime", "kata-runtime", "kata-runtime"),
        ("seccomp", "docker-default", "docker-default"),
        ("seccomp", "/etc/kernel-sandbox/seccomp.json", "/etc/kernel-sandbox/seccomp.json"),
        ("network", "none", "none"),
        ("idle_timeout", 0, 0),
        ("idle_timeout", 3600, 3600),
        ("idle_timeout", "30m", 1800),
        ("idle_timeout", "2h", 7200),
        ("user", "1000:1000", "1000:1000"),
        ("user", "1234", "1234:1234"),
        ("user", None, None),
    ],
)
def test_good_values(key, value, typed):
    assert validate(key, value) == typed
    assert getattr(SandboxPolicy.from_mapping({key: value}), key) == typed


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image", "", "image: expected an image name"),
        ("image", 5, "image: expected an image name"),
        ("image", "two words", "image: expected an image name"),
        ("memory_limit", "lots", "memory_limit: expected a size such as '512m' or '2g'"),
        ("memory_limit", 0, "memory_limit: must be larger than zero"),
        ("memory_limit", -5, "memory_limit: must be larger than zero"),
        ("memory_limit", True, "memory_limit: expected a size"),
        ("memory_limit", None, "memory_limit: expected a size"),
        ("memory_limit", "10m", "memory_limit: at least 32m is needed"),
        ("cpu_limit", 0, "cpu_limit: expected a positive number"),
        ("cpu_limit", -1, "cpu_limit: expected a positive number"),
        ("cpu_limit", 1e300, "cpu_limit: at most 1e+06"),
        ("cpu_limit", "nan", "cpu_limit: expected a positive number"),
        ("cpu_limit", "inf", "cpu_limit: expected a positive number"),
        ("cpu_limit", "two", "cpu_limit: expected a positive number"),
        ("cpu_limit", True, "cpu_limit: expected a positive number"),
        ("cpu_limit", 0.001, "cpu_limit: at least 0.01"),
        ("pids_limit", 0, "pids_limit: expected a positive whole number"),
        ("pids_limit", 2.5, "pids_limit: expected a positive whole number"),
        ("pids_limit", "many", "pids_limit: expected a positive whole number"),
        ("pids_limit", 8, "pids_limit: at least 16"),
        ("tmpfs_size", "big", "tmpfs_size: expected a size"),
        ("tmpfs_size", "1k", "tmpfs_size: at least 1m"),
        ("workspace", "sometimes", "workspace: expected one of none, ro, rw"),
        ("workspace", True, "workspace: expected one of none, ro, rw"),
        ("env", "A=1", "env: expected a mapping of NAME to value"),
        ("env", {"1A": "x"}, "env: '1A' is not a valid environment variable name"),
        ("env", {"A-B": "x"}, "env: 'A-B' is not a valid environment variable name"),
        ("env", {"A": None}, "env: the value of A must be text"),
        ("env", {"A": True}, "env: the value of A must be text"),
        ("env_passthrough", "HOME", "env_passthrough: expected a list of variable names"),
        ("env_passthrough", ["BAD-NAME"], "env_passthrough: 'BAD-NAME' is not a valid"),
        ("runtime", "", "runtime: expected an OCI runtime name such as runc or runsc"),
        ("runtime", "run c", "runtime: expected an OCI runtime name"),
        ("runtime", 5, "runtime: expected an OCI runtime name"),
        ("network", "host", "network: expected one of none"),
        ("network", "bridge", "network: expected one of none"),
        ("idle_timeout", -1, "idle_timeout: expected seconds or a duration"),
        ("idle_timeout", "soon", "idle_timeout: expected seconds or a duration"),
        ("idle_timeout", True, "idle_timeout: expected seconds or a duration"),
        ("user", "root", "user: expected 'UID:GID' with numbers"),
        ("user", "a:b", "user: expected 'UID:GID' with numbers"),
        ("user", "0:0", "user: the kernel must not run as root"),
        ("user", "1000:0", "user: the kernel must not run as root"),
        ("mounts", "/data", "mounts: expected a list of 'HOST[:TARGET][:ro|rw]'"),
        ("mounts", [5], "mounts: expected 'HOST[:TARGET][:ro|rw]'"),
        ("mounts", ["relative/dir"], "mounts: the host path must be absolute"),
        ("mounts", ["/no/such/dir"], "mounts: host path /no/such/dir does not exist"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(key, value, message):
    with pytest.raises(PolicyError) as info:
        SandboxPolicy.from_mapping({key: value})
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_keys_are_errors_that_list_the_known_ones():
    with pytest.raises(PolicyError) as info:
        SandboxPolicy.from_mapping({"memroy_limit": "1g", "workspace": "rw"})
    message = str(info.value)
    assert "unknown policy key 'memroy_limit'" in message
    for key in ("memory_limit", "workspace", "mounts", "idle_timeout"):
        assert key in message


def test_defaults_are_the_strict_ones():
    policy = SandboxPolicy()
    assert (policy.memory_limit, policy.cpu_limit, policy.pids_limit) == (G, 1.0, 256)
    assert (policy.tmpfs_size, policy.workspace, policy.network) == (256 * M, "ro", "none")
    assert policy.mounts == () and policy.env == {} and policy.env_passthrough == ()
    assert policy.runtime == "runc" and policy.idle_timeout == 0 and policy.user is None


def test_to_dict_is_user_input_that_round_trips(tmp_path):
    policy = SandboxPolicy.from_mapping(
        {
            "memory_limit": "300m",
            "mounts": [f"{tmp_path}:/data/x:rw"],
            "env": {"A": "1"},
            "env_passthrough": ["LANG"],
            "idle_timeout": "1h",
            "user": "1234",
        }
    )
    as_dict = policy.to_dict()
    assert as_dict["memory_limit"] == "300m" and as_dict["tmpfs_size"] == "256m"
    assert as_dict["mounts"] == [f"{tmp_path}:/data/x:rw"]
    json.dumps(as_dict)  # JSON-able
    assert SandboxPolicy.from_mapping(as_dict) == policy
    assert SandboxPolicy.from_mapping(SandboxPolicy().to_dict()) == SandboxPolicy()


def test_format_and_display():
    sizes = [format_size(n) for n in (G, 300 * M, 1536 * M, 12345)]
    assert sizes == ["1g", "300m", "1536m", "12345"]
    assert display_value("memory_limit", 4 * G) == "4g"
    assert display_value("idle_timeout", 0) == "0 (never)"
    assert display_value("env", {"A": "1", "B": "2"}) == "A=1, B=2"
    assert display_value("mounts", ()) == "(none)"


# -- mounts ---------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def test_mount_forms(data_dir):
    assert parse_mount(str(data_dir)) == Mount(str(data_dir), str(data_dir), True)
    assert parse_mount(f"{data_dir}:ro") == Mount(str(data_dir), str(data_dir), True)
    assert parse_mount(f"{data_dir}:rw") == Mount(str(data_dir), str(data_dir), False)
    assert parse_mount(f"{data_dir}:/data/x") == Mount(str(data_dir), "/data/x", True)
    assert parse_mount(f"{data_dir}:/data/x:rw") == Mount(str(data_dir), "/data/x", False)
    assert parse_mount({"source": str(data_dir), "target": "/d", "mode": "rw"}) == Mount(
        str(data_dir), "/d", False
    )
    assert parse_mount(f"{data_dir}/../data:/data/./y/") == Mount(str(data_dir), "/data/y", True)
    assert str(Mount(str(data_dir), "/d", False)) == f"{data_dir}:/d:rw"


def test_mount_under_home_is_fine_and_tilde_expands(data_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(data_dir.parent))
    assert parse_mount("~/data:rw") == Mount(str(data_dir), str(data_dir), False)


def test_dataset_and_mount_paths_follow_one_rule(data_dir, monkeypatch):
    """Absolute or ~ alike; relative refused alike (a kernelspec is read from any folder)."""
    monkeypatch.setenv("HOME", str(data_dir.parent))
    monkeypatch.chdir(data_dir.parent)
    policy = SandboxPolicy.from_mapping({"mounts": ["~/data:/d"], "datasets": {"d": "~/data"}})
    assert policy.mounts[0].source == policy.datasets[0].source == str(data_dir)
    for values in ({"mounts": ["data:/d"]}, {"datasets": {"d": "data"}}):
        with pytest.raises(
            PolicyError, match=r"host path must be absolute \(an absolute path or ~/...\)"
        ):
            SandboxPolicy.from_mapping(values)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{d}:/data:rx", "the mode must be 'ro' or 'rw', got 'rx'"),
        ("{d}:/a:/b:ro", "expected 'HOST[:TARGET][:ro|rw]'"),
        ("{d}:data", "the mode must be 'ro' or 'rw', got 'data'"),
        ("{d}:/proc/x", "cannot mount at /proc/x: /proc belongs to the sandbox"),
        ("{d}:/sys", "cannot mount at /sys"),
        ("{d}:/dev/shm", "cannot mount at /dev/shm"),
        ("{d}:/run/kernel-sandbox", "cannot mount at /run/kernel-sandbox"),
        ("{d}:/run/kernel-sandbox/x", "cannot mount at /run/kernel-sandbox/x"),
        ("{d}:/tmp", "it would cover /tmp"),
        ("{d}:/home", "it would cover /home/sandbox"),
        ("{d}:/", "cannot mount at /"),
    ],
)
def test_bad_mount_targets(data_dir, value, message):
    with pytest.raises(PolicyError) as info:
        parse_mount(value.format(d=data_dir))
    assert message in str(info.value)
    assert str(info.value).startswith("mounts: ")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/", "refusing to mount /: it exposes / as a whole"),
        ("/proc", "nothing under /proc may be mounted"),
        ("/proc/1/root", "nothing under /proc may be mounted"),
        ("/sys", "nothing under /sys may be mounted"),
        ("/sys/fs/cgroup", "nothing under /sys may be mounted"),
        ("/dev", "nothing under /dev may be mounted"),
        ("/dev/null", "nothing under /dev may be mounted"),
        ("/etc", "it exposes /etc as a whole"),
        ("/home", "it exposes /home as a whole"),
        ("/root", "it exposes /root as a whole"),
        ("/var/run/docker.sock", "Docker socket"),
        ("/run/docker.sock", "Docker socket"),
        ("/var/run", "Docker socket"),
        ("/run", "Docker socket"),
    ],
)
def test_forbidden_mount_sources(source, message):
    if not os.path.lexists(source):  # a symlink counts: /proc/1/root may not be followable
        pytest.skip(f"{source} does not exist here")
    with pytest.raises(PolicyError) as info:
        SandboxPolicy.from_mapping({"mounts": [f"{source}:/data/x"]})
    assert message in str(info.value)
    assert "mounts: refusing to mount" in str(info.value)


def test_the_home_directory_as_a_whole_and_its_parents_are_refused(data_dir, monkeypatch):
    home = data_dir.parent / "alice"
    (home / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for source in (home, home.parent):
        with pytest.raises(PolicyError) as info:
            parse_mount(f"{source}:/data/x")
        assert "refusing to mount" in str(info.value)
    assert "your home directory as a whole" in str(
        pytest.raises(PolicyError, parse_mount, f"{home}:/data/x").value
    )
    assert parse_mount(f"{home}/project:/data/p").source == str(home / "project")


def test_symlinks_and_socket_names_do_not_get_around_the_rules(tmp_path):
    (tmp_path / "root-link").symlink_to("/")
    (tmp_path / "proc-link").symlink_to("/proc/self")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "docker.sock").touch()  # a rootless engine's socket, wherever it lives
    (tmp_path / "sock-link").symlink_to(engine / "docker.sock")
    for source, message in (
        (tmp_path / "root-link", "exposes / as a whole"),
        (tmp_path / "proc-link", "nothing under /proc"),
        (engine / "docker.sock", "Docker socket"),
        (tmp_path / "sock-link", "Docker socket"),
    ):
        with pytest.raises(PolicyError, match=re.escape(message)):
            parse_mount(f"{source}:/data/x")


def test_a_symlinked_source_is_mounted_as_checked(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    mount = parse_mount(f"{tmp_path}/link")
    assert mount.source == str(real) and mount.target == f"{tmp_path}/link"


def test_docker_host_socket_and_its_directory_are_refused(tmp_path, monkeypatch):
    (tmp_path / "engine.sock").touch()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/engine.sock")
    with pytest.raises(PolicyError, match="Docker socket"):
        parse_mount(f"{tmp_path}:/data/x")


def test_two_mounts_may_not_share_a_host_path_or_a_target(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(PolicyError, match="/data/x appears in more than one mount"):
        validate("mounts", [f"{tmp_path}/a:/data/x", f"{tmp_path}/b:/data/x"])
    with pytest.raises(PolicyError, match="appears in more than one mount"):
        validate("mounts", [f"{tmp_path}/a:/data/x", f"{tmp_path}/a:/data/y"])


def test_reserved_targets_match_the_backend():
    assert backend.RUNTIME_MOUNT in RESERVED_TARGETS and backend.SANDBOX_HOME in RESERVED_TARGETS


def test_workspace_is_not_mounted_where_no_mount_may_go(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    assert resolve_workspace(tmp_path / "notebooks") == str(tmp_path / "notebooks")
    assert resolve_workspace(tmp_path) is None  # the home directory as a whole
    assert resolve_workspace("/") is None
    assert resolve_workspace("/proc") is None
    if os.path.exists("/run/docker.sock"):
        assert resolve_workspace("/run") is None  # holds the Docker socket
    assert resolve_workspace(None) is None


# -- profiles ---------------------------------------------------------------------------------


def test_builtin_profiles_are_valid_policies():
    policies = {name: SandboxPolicy.from_mapping(profile_values(name)) for name in PROFILES}
    assert set(policies) == {"strict", "analyst", "educator", "ci", "untrusted"}
    assert policies["strict"] == SandboxPolicy()
    assert policies["analyst"].workspace == "rw" and policies["analyst"].memory_limit == 4 * G
    educator = policies["educator"]
    assert educator.workspace == "rw" and educator.idle_timeout == 3600
    assert educator.memory_limit < SandboxPolicy().memory_limit and educator.mounts == ()
    ci = policies["ci"]
    assert ci.workspace == "ro" and ci.env["PYTHONHASHSEED"] == "0" and ci.env["TZ"] == "UTC"
    untrusted = policies["untrusted"]
    assert untrusted.runtime == "runsc" and untrusted.workspace == "none"
    strict = policies["strict"]
    for key in ("memory_limit", "cpu_limit", "pids_limit", "tmpfs_size"):
        assert getattr(untrusted, key) == getattr(strict, key)  # "runsc plus the strict limits"


def test_user_profiles_extend_others(tmp_path):
    mine = {
        "course": {"extends": "educator", "memory_limit": "768m", "env": {"COURSE": "101"}},
        "course-ci": {"extends": "course", "env": {"CI": "1"}},
    }
    values = profile_values("course-ci", mine)
    assert values["memory_limit"] == "768m" and values["idle_timeout"] == 3600
    assert values["env"] == {"COURSE": "101", "CI": "1"} and "extends" not in values


@pytest.mark.parametrize(
    ("profiles", "name", "message"),
    [
        ({}, "nonexistent", "profile: unknown profile 'nonexistent'; known: strict, analyst"),
        ({"a": {"extends": "b"}, "b": {"extends": "a"}}, "a", "a -> b -> a extends itself"),
        ({"a": {"extends": "nowhere"}}, "a", "unknown profile 'nowhere'"),
        ({"strict": {"workspace": "rw"}}, "strict", "'strict' is a built-in profile"),
        ({"a": "rw"}, "a", "profiles: 'a' must be a mapping"),
    ],
)
def test_bad_profiles(profiles, name, message):
    with pytest.raises(PolicyError) as info:
        layer_policy(name, {**PROFILES, **profiles}, {}, {})
    assert message in str(info.value)


def test_a_bad_value_in_a_user_profile_names_the_key():
    with pytest.raises(PolicyError, match="memory_limit: expected a size"):
        layer_policy("mine", {**PROFILES, "mine": {"memory_limit": "plenty"}}, {}, {})


# -- precedence -----------------------------------------------------------------------------


def test_precedence_defaults_profile_config_kernelspec():
    policy, sources = layer_policy(
        "analyst",
        PROFILES,
        config_values={"memory_limit": "3g", "pids_limit": 300},
        spec_values={"pids_limit": 64},
    )
    assert policy.image == SandboxPolicy().image and sources["image"] == "default"
    assert policy.workspace == "rw" and sources["workspace"] == "profile analyst"
    assert policy.memory_limit == 3 * G and sources["memory_limit"] == "jupyter config"
    assert policy.pids_limit == 64 and sources["pids_limit"] == "kernelspec"


def test_env_is_merged_name_by_name_across_layers():
    policy, sources = layer_policy(
        "ci", PROFILES, {"env": {"A": "config", "TZ": "Europe/Oslo"}}, {"env": {"A": "spec"}}
    )
    assert policy.env["PYTHONHASHSEED"] == "0"  # from the profile
    assert policy.env["TZ"] == "Europe/Oslo" and policy.env["A"] == "spec"
    assert sources["env"] == "profile ci + jupyter config + kernelspec"


def test_lists_are_replaced_not_merged(tmp_path):
    policy, sources = layer_policy(
        "strict", PROFILES, {"env_passthrough": ["A"]}, {"env_passthrough": ["B"]}
    )
    assert policy.env_passthrough == ("B",) and sources["env_passthrough"] == "kernelspec"


# -- ceilings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "spec", "ceilings", "message"),
    [
        (
            {},
            {"memory_limit": "8g"},
            {"memory_limit": "4g"},
            "memory_limit: 8g (from kernelspec) exceeds the operator's ceiling of 4g",
        ),
        (
            {"cpu_limit": 3},
            {},
            {"cpu_limit": 2},
            "cpu_limit: 3.0 (from jupyter config) exceeds the operator's ceiling of 2.0",
        ),
        ({}, {"pids_limit": 1000}, {"pids_limit": 512}, "pids_limit: 1000 (from kernelspec)"),
        ({}, {"tmpfs_size": "2g"}, {"tmpfs_size": "1g"}, "tmpfs_size: 2g (from kernelspec)"),
        ({}, {"workspace": "rw"}, {"workspace": "ro"}, "workspace: rw (from kernelspec) exceeds"),
        (
            {},
            {"idle_timeout": 0},
            {"idle_timeout": 3600},
            "idle_timeout: 0 (never) (from kernelspec) exceeds the operator's ceiling of 3600s",
        ),
        (
            {},
            {"runtime": "runc"},
            {"runtime": "runsc"},
            "runtime: runc (from kernelspec) differs from the operator's required runsc",
        ),
        (
            {},
            {"seccomp": "docker-default"},
            {"seccomp": "kernel-sandbox"},
            "seccomp: docker-default (from kernelspec) differs from the operator's required "
            "kernel-sandbox",
        ),
        ({}, {}, {"image": "x"}, "ceilings: 'image' cannot be capped"),
        ({}, {}, {"memory_limit": "lots"}, "memory_limit: expected a size"),
    ],
)
def test_explicit_values_over_a_ceiling_are_errors(config, spec, ceilings, message):
    with pytest.raises(PolicyError) as info:
        layer_policy("strict", PROFILES, config, spec, ceilings)
    assert message in str(info.value)


def test_profile_values_over_a_ceiling_are_lowered_to_it():
    policy, sources = layer_policy(
        "analyst",
        PROFILES,
        {},
        {},
        {"memory_limit": "2g", "cpu_limit": 1.5, "workspace": "ro", "runtime": "runsc"},
    )
    assert policy.memory_limit == 2 * G and policy.cpu_limit == 1.5
    assert policy.workspace == "ro" and policy.runtime == "runsc"
    assert sources["memory_limit"] == "ceiling (the profile analyst value was 4g)"
    assert sources["runtime"] == "ceiling (the default value was runc)"
    assert policy.pids_limit == 512 and sources["pids_limit"] == "profile analyst"


def test_the_hosts_cpus_hold_a_profile_value_and_refuse_an_explicit_one():
    """The engine refuses a cpu_limit above its CPUs at create time (a 'failed' kernel);
    the policy holds a default's or profile's value to them and refuses a set one."""
    policy, sources = layer_policy("analyst", PROFILES, {}, {}, cpus=lambda: 1)
    assert policy.cpu_limit == 1.0
    assert sources["cpu_limit"] == "host (1 CPU; the profile analyst value was 2)"
    for config, spec, origin in (
        ({}, {"cpu_limit": 3}, "kernelspec"),
        ({"cpu_limit": 3}, {}, "jupyter config"),
    ):
        with pytest.raises(PolicyError) as info:
            layer_policy("strict", PROFILES, config, spec, cpus=lambda: 2)
        assert str(info.value) == (
            f"cpu_limit: 3 (from {origin}) is more than this host's 2 CPUs, which the "
            "Docker engine refuses; give at most 2"
        )
    policy, _ = layer_policy("strict", PROFILES, {}, {"cpu_limit": 2}, cpus=lambda: 2)
    assert policy.cpu_limit == 2.0  # as many as there are is fine
    policy, _ = layer_policy("strict", PROFILES, {}, {"cpu_limit": 64}, cpus=lambda: None)
    assert policy.cpu_limit == 64.0  # an engine on another machine: it says for itself
    profiles = {**PROFILES, "big": {"cpu_limit": 8}}
    policy, sources = layer_policy("big", profiles, {}, {}, {"cpu_limit": 4}, cpus=lambda: 2)
    assert policy.cpu_limit == 2.0 and sources["cpu_limit"].startswith("host (2 CPUs; the ceiling")


def test_the_host_is_this_machine_unless_the_engine_is_elsewhere(monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert host_cpus() == os.cpu_count()
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    assert host_cpus() == os.cpu_count()
    monkeypatch.setenv("DOCKER_HOST", "tcp://build-farm.test:2376")
    assert host_cpus() is None


def test_a_kernelspec_asking_for_more_cpus_than_the_host_fails_its_policy(jupyter_path):
    """Through the real provisioner: what install, doctor and run's preflight call."""
    more = (os.cpu_count() or 1) + 1
    spec = make_kernelspec(f"cpus-{uuid.uuid4().hex[:6]}", {"cpu_limit": more})
    with pytest.raises(PolicyError) as info:
        effective_policy(spec, Config())
    assert str(info.value).startswith(f"kernelspec {spec}: cpu_limit: {more} (from kernelspec)")
    assert str(info.value).count("kernelspec ") == 1


def test_values_under_a_ceiling_pass():
    policy, _ = layer_policy(
        "educator",
        PROFILES,
        {},
        {"memory_limit": "1g"},
        {"memory_limit": "1g", "idle_timeout": "2h"},
    )
    assert policy.memory_limit == G and policy.idle_timeout == 3600
    assert set(CEILING_KEYS) >= {"memory_limit", "cpu_limit", "pids_limit", "tmpfs_size"}


# -- through jupyter_client: Config objects and the kernelspec ------------------------------


def provisioner_of(kernel_name: str, config: Config | None = None) -> DockerSandboxProvisioner:
    """The provisioner jupyter_client itself would create for ``kernel_name`` (not started)."""
    km = KernelManager(kernel_name=kernel_name, config=config or Config())
    provisioner = KernelProvisionerFactory.instance(parent=km).create_provisioner_instance(
        str(uuid.uuid4()), km.kernel_spec, parent=km
    )
    assert isinstance(provisioner, DockerSandboxProvisioner)
    return provisioner


def test_traitlets_config_on_the_kernel_manager_sits_between_profile_and_kernelspec(jupyter_path):
    name = make_kernelspec(
        f"prec-{uuid.uuid4().hex[:6]}",
        {"profile": "analyst", "pids_limit": 64, "env": {"B": "spec"}},
    )
    config = Config()
    config.DockerSandboxProvisioner.memory_limit = "3g"
    config.DockerSandboxProvisioner.pids_limit = 300
    config.DockerSandboxProvisioner.env = {"A": "config"}
    provisioner = provisioner_of(name, config)
    policy, sources = provisioner.policy, provisioner.policy_sources
    assert (policy.memory_limit, sources["memory_limit"]) == (3 * G, "jupyter config")
    assert (policy.pids_limit, sources["pids_limit"]) == (64, "kernelspec")
    assert (policy.cpu_limit, sources["cpu_limit"]) == (2.0, "profile analyst")
    assert (policy.tmpfs_size, sources["tmpfs_size"]) == (G, "profile analyst")
    assert (policy.image, sources["image"]) == (SandboxPolicy().image, "default")
    assert policy.env == {"A": "config", "B": "spec"}


def test_profile_and_user_profiles_from_config(jupyter_path):
    name = make_kernelspec(f"prec-{uuid.uuid4().hex[:6]}", {})
    config = Config()
    config.DockerSandboxProvisioner.profile = "course"
    config.DockerSandboxProvisioner.profiles = {
        "course": {"extends": "educator", "memory_limit": "768m"}
    }
    policy = provisioner_of(name, config).policy
    assert policy.memory_limit == 768 * M and policy.idle_timeout == 3600


def test_ceilings_from_config_bind_the_kernelspec_which_cannot_set_its_own(jupyter_path):
    config = Config()
    config.DockerSandboxProvisioner.ceilings = {"memory_limit": "2g"}
    over = make_kernelspec(f"prec-{uuid.uuid4().hex[:6]}", {"memory_limit": "8g"})
    with pytest.raises(PolicyError) as info:
        provisioner_of(over, config).policy  # noqa: B018
    assert "exceeds the operator's ceiling of 2g" in str(info.value)
    assert f"kernelspec {over}" in str(info.value)
    sneaky = make_kernelspec(f"prec-{uuid.uuid4().hex[:6]}", {"ceilings": {"memory_limit": "64g"}})
    with pytest.raises(PolicyError, match="unknown provisioner config key 'ceilings'"):
        provisioner_of(sneaky, config).policy  # noqa: B018


# -- the policy table: everything else is derived from it, or tied to it here ----------------


def test_sandbox_policy_fields_are_the_table_one_to_one():
    """SandboxPolicy spells its fields out for typing; they must be the table's keys exactly."""
    fields = dataclasses.fields(SandboxPolicy)
    assert [f.name for f in fields] == [key.name for key in POLICY_KEYS]
    hints = typing.get_type_hints(SandboxPolicy)
    strict = SandboxPolicy()
    for key in POLICY_KEYS:
        assert hints[key.name] == key.type, key.name
        assert getattr(strict, key.name) == key.default, key.name
        assert validate(key.name, strict.to_dict()[key.name]) == key.default, key.name
    assert SandboxPolicy().env is not SandboxPolicy().env  # mutable defaults are not shared


def test_every_policy_key_is_a_config_trait_with_the_tables_help():
    traits = DockerSandboxProvisioner.class_traits(config=True)
    for key in POLICY_KEYS:
        trait = traits.get(key.name)
        assert trait is not None, f"policy key {key.name} has no DockerSandboxProvisioner trait"
        assert trait.help == key.help and trait.allow_none
        assert trait.default_value is None
    config = Config()
    config.DockerSandboxProvisioner.memory_limit = "4g"
    assert DockerSandboxProvisioner(kernel_id="t", config=config).memory_limit == "4g"


def test_every_policy_key_is_documented_and_every_documented_key_exists():
    docs = (REPO / "docs" / "configuration.md").read_text()
    section = docs[docs.index("## The keys") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE)
    assert rows == [key.name for key in POLICY_KEYS]


def test_install_flags_come_from_the_table():
    assert [(f.key, f.flag, f.metavar) for f in POLICY_FLAGS] == [
        (key.name, key.flag.spelling, key.flag.metavar) for key in POLICY_KEYS if key.flag
    ]
    install = next(
        action
        for action in build_parser()._subparsers._group_actions[0].choices.values()
        if action.prog.endswith(" install")
    )
    options = {option for action in install._actions for option in action.option_strings}
    for key in POLICY_KEYS:
        spelling = key.flag.spelling if key.flag else key.other_flag
        if spelling is not None:
            assert spelling in options, f"{key.name}: install has no {spelling}"


def test_ceilings_and_merging_come_from_the_table():
    assert CEILING_KEYS == tuple(key.name for key in POLICY_KEYS if key.ceiling)
    assert MERGED_KEYS == ("env",)
    assert KEYS["runtime"].ceiling.pinned and not KEYS["memory_limit"].ceiling.pinned


def test_docs_profile_table_matches_the_code():
    """docs/configuration.md's table of profile defaults says what the code does."""
    docs = (REPO / "docs" / "configuration.md").read_text()
    header = next(line for line in docs.splitlines() if line.startswith("| key | strict |"))
    names = [cell.strip() for cell in header.strip("|").split("|")][1:]
    assert names == list(PROFILES)
    rows = {}
    for line in docs.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == len(names) + 1 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    policies = [SandboxPolicy.from_mapping(profile_values(n)) for n in names]
    for key in (
        "image",
        "memory_limit",
        "cpu_limit",
        "pids_limit",
        "tmpfs_size",
        "workspace",
        "runtime",
        "network",
        "idle_timeout",
    ):
        expected = [display_value(key, getattr(p, key)) for p in policies]
        assert [cell.strip("`") for cell in rows[key]] == expected, key


# -- through real Jupyter config files, read by another process ------------------------------


def test_real_config_files_via_jupyter_config_dir(jupyter_path, tmp_path):
    name = make_kernelspec(f"prec-{uuid.uuid4().hex[:6]}", {"pids_limit": 64})
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.py").write_text(
        "c.DockerSandboxProvisioner.profile = 'analyst'\n"
        "c.DockerSandboxProvisioner.memory_limit = '3g'\n"
        "c.DockerSandboxProvisioner.pids_limit = 300\n"
        "c.DockerSandboxProvisioner.ceilings = {'cpu_limit': 1.5}\n"
    )
    (config_dir / "jupyter_config.json").write_text(
        json.dumps({"DockerSandboxProvisioner": {"tmpfs_size": "48m"}})
    )
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "kernel_sandbox.cli", "policy", "show", name, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["profile"] == "analyst" and shown["profile_source"] == "jupyter config"
    assert shown["policy"]["memory_limit"] == "3g"
    assert shown["sources"]["memory_limit"] == "jupyter config"
    assert shown["policy"]["pids_limit"] == 64 and shown["sources"]["pids_limit"] == "kernelspec"
    assert shown["policy"]["tmpfs_size"] == "48m"
    assert shown["policy"]["cpu_limit"] == 1.5
    assert shown["sources"]["cpu_limit"].startswith("ceiling")
    assert shown["policy"]["workspace"] == "rw"
    assert shown["sources"]["workspace"] == "profile analyst"
    assert {Path(f).name for f in shown["config_files"]} >= {
        "jupyter_server_config.py",
        "jupyter_config.json",
    }


def test_run_and_policy_show_read_the_same_config_and_resolve_the_same_policy(
    jupyter_path, tmp_path, monkeypatch
):
    """`kernel-sandbox run` and `kernel-sandbox policy show` share one Jupyter-config loader."""
    name = make_kernelspec(f"prec-{uuid.uuid4().hex[:6]}", {"pids_limit": 64})
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_config.json").write_text(
        json.dumps({"DockerSandboxProvisioner": {"tmpfs_size": "48m", "memory_limit": "2g"}})
    )
    (config_dir / "jupyter_server_config.py").write_text(
        "c.DockerSandboxProvisioner.profile = 'analyst'\n"
        "c.DockerSandboxProvisioner.memory_limit = '3g'\n"  # wins over jupyter_config's
        "c.DockerSandboxProvisioner.ceilings = {'cpu_limit': 1.5}\n"
    )
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))

    # run's path: its config for the kernel managers, and the provisioner they create
    run_config = batch_config.kernel_config(None, 30, batch_config.load_jupyter_config())
    run_side = provisioner_of(name, run_config)
    # policy show's path
    show_config, files = load_jupyter_config()
    shown = effective_policy(name, show_config)

    assert run_side.policy == shown.policy
    assert run_side.policy_sources == shown.sources
    assert {Path(f).name for f in files} >= {"jupyter_config.json", "jupyter_server_config.py"}
    policy = shown.policy
    assert (policy.memory_limit, policy.tmpfs_size, policy.pids_limit) == (3 * G, 48 * M, 64)
    assert policy.workspace == "rw" and shown.sources["workspace"] == "profile analyst"
    assert policy.cpu_limit == 1.5 and shown.sources["cpu_limit"].startswith("ceiling")


def test_a_broken_config_file_is_a_policy_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "jupyter_server_config.py").write_text("c.DockerSandboxProvisioner.x = (\n")
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    with pytest.raises(PolicyError, match="cannot read the Jupyter config"):
        load_jupyter_config()
    with pytest.raises(SyntaxError):  # run reports it itself ("cannot load Jupyter config")
        batch_config.load_jupyter_config()


def test_the_public_names_of_the_old_policy_module_are_still_there():
    """``kernel_sandbox.policy`` was one module; its public names live on in the package."""
    import kernel_sandbox.policy as policy

    old = ["DEFAULT_IMAGE", "Dataset", "PROFILES", "Mount", "SandboxPolicy", "parse_dataset"]
    old += ["apply_ceilings", "display_value", "format_size", "layer_policy", "parse_mount"]
    old += ["parse_size", "profile_values", "validate"]
    assert set(old) <= set(policy.__all__)
    assert all(hasattr(policy, name) for name in policy.__all__)


# -- egress hosts as users paste them: one parser for the policy, install and the service --------


@pytest.mark.parametrize(
    ("pasted", "rule"),
    [
        ("https://api.example.test/v1", "api.example.test:443"),
        ("http://api.example.test", "api.example.test:80"),
        ("HTTPS://API.Example.test/", "api.example.test:443"),
        ("https://api.example.test:8443/v1?x=1#y", "api.example.test:8443"),
        ("api.example.test:8443/v1", "api.example.test:8443"),
        ("api.example.test/v1", "api.example.test"),  # no scheme: ports 80 and 443, as before
        ("https://*.corp.test/simple", "*.corp.test:443"),
        ("https://[fd00::5]/x", "[fd00::5]:443"),
        ("api.example.test", "api.example.test"),
    ],
)
def test_egress_hosts_are_taken_as_pasted_everywhere(pasted, rule, tmp_path):
    from kernel_sandbox.cli.install import egress_install_policy
    from kernel_sandbox.egress.rules import parse_rule
    from kernel_sandbox.service.rules import ServiceRules

    policy = SandboxPolicy.from_mapping({"network": "allowlist", "egress": [pasted]})
    assert policy.egress == (rule,)
    args = build_parser().parse_args(["install", "--network", "allowlist", "--egress", pasted])
    assert egress_install_policy(args)["egress"] == (rule,)
    rules_file = tmp_path / "service.toml"
    rules_file.write_text(f"[everyone]\negress = [{json.dumps(pasted)}]\n")
    rules_file.chmod(0o644)
    everyone = ServiceRules.load(str(rules_file)).everyone
    assert everyone is not None and everyone.values["egress"] == (rule,)
    assert str(parse_rule(rule)) == rule  # stored as it reads


@pytest.mark.parametrize(
    ("pasted", "message"),
    [
        ("ftp://files.test/x", "only http:// and https:// URLs name a host and port"),
        ("https://user:secret@api.test/", "credentials do not belong in an egress target"),
        ("https://", "names no host"),
        ("https://api.test:99999/", "is not a port number"),
        ("https://*/", "would allow every host"),
    ],
)
def test_egress_hosts_that_cannot_be_taken(pasted, message):
    with pytest.raises(PolicyError) as info:
        SandboxPolicy.from_mapping({"network": "allowlist", "egress": [pasted]})
    assert str(info.value).startswith("egress: ") and message in str(info.value)


def test_thread_pools_follow_cpu_limit_unless_set():
    from kernel_sandbox.provisioner.container import container_env

    assert container_env({}, (), {}, {}, 2.5)["OMP_NUM_THREADS"] == "2"
    assert container_env({}, (), {}, {}, 0.5)["OPENBLAS_NUM_THREADS"] == "1"
    assert container_env({}, (), {}, {"OMP_NUM_THREADS": "4"}, 1.0)["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in container_env({}, (), {}, {})

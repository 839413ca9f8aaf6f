"""The shipped seccomp profile: derived from Docker's default as documented, and applied.

Unit tier: no engine. What the profile does to a real kernel is attacked in
tests/security/test_privilege.py (``priv-io-uring``, ``priv-cross-process``, ``priv-ptrace*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel_sandbox.engine.container import ContainerRequest, container_options
from kernel_sandbox.engine.seccomp import (
    ALREADY_REFUSED,
    REFUSED,
    derive,
    load_profile,
    main,
    security_options,
)
from kernel_sandbox.errors import PolicyError
from kernel_sandbox.policy import SandboxPolicy

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = REPO / "tests" / "data" / "docker-seccomp-default-v20.10.24.json"  # moby v20.10.24
SHIPPED = REPO / "kernel_sandbox" / "engine" / "seccomp.json"


def allowed(profile: dict) -> set[str]:
    """Every name some rule allows (under any condition: argument, capability, arch)."""
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }


def test_shipped_profile_is_derived_from_dockers_default(tmp_path):
    """The reviewable file is exactly what the documented command makes from upstream."""
    out = tmp_path / "seccomp.json"
    assert main([str(UPSTREAM), str(out)]) == 0
    assert out.read_text() == SHIPPED.read_text()


def test_only_the_refused_calls_are_taken_away():
    upstream = json.loads(UPSTREAM.read_text())
    shipped = json.loads(SHIPPED.read_text())
    assert allowed(upstream) - allowed(shipped) == set(REFUSED)
    assert allowed(shipped) <= allowed(upstream)
    assert not allowed(shipped) & (set(REFUSED) | set(ALREADY_REFUSED))
    assert shipped["defaultAction"] == upstream["defaultAction"] == "SCMP_ACT_ERRNO"
    assert shipped["archMap"] == upstream["archMap"]
    assert {"io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace"} <= set(REFUSED)


def test_derive_refuses_an_upstream_that_reopens_a_refused_call():
    upstream = json.loads(UPSTREAM.read_text())
    upstream["syscalls"][0]["names"].append("userfaultfd")
    with pytest.raises(ValueError, match="userfaultfd"):
        derive(upstream)
    with pytest.raises(ValueError, match="not Docker's default"):
        derive({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []})


def test_security_options_per_setting(tmp_path):
    default = security_options("kernel-sandbox")
    assert default[0] == "no-new-privileges" and default[1].startswith("seccomp={")
    assert json.loads(default[1].removeprefix("seccomp=")) == json.loads(SHIPPED.read_text())
    assert security_options("docker-default") == ["no-new-privileges"]
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    assert security_options(str(own)) == [
        "no-new-privileges",
        'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}',
    ]


def test_unusable_profiles_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(PolicyError, match="seccomp: cannot read the profile .*kernel-sandbox"):
        load_profile(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_profile(str(bad))
    bad.write_text("[]")
    with pytest.raises(PolicyError, match="not a seccomp profile"):
        load_profile(str(bad))


def test_policy_key_values():
    assert SandboxPolicy().seccomp == "kernel-sandbox"
    assert SandboxPolicy.from_mapping({"seccomp": "docker-default"}).seccomp == "docker-default"
    assert SandboxPolicy.from_mapping({"seccomp": "/etc/p.json"}).seccomp == "/etc/p.json"
    for bad in ("unconfined", "p.json", 3, None):
        with pytest.raises(PolicyError, match="seccomp: expected kernel-sandbox or"):
            SandboxPolicy.from_mapping({"seccomp": bad})


def test_container_gets_the_profile_and_keeps_no_new_privileges():
    request = ContainerRequest(
        name="ks-test",
        policy=SandboxPolicy(),
        command=["true"],
        env={},
        labels={},
        runtime_dir="/tmp/x",
        user="1000:1000",
    )
    options = container_options(request)["security_opt"]
    assert options[0] == "no-new-privileges"
    assert '"io_uring_setup"' not in options[1] and '"read"' in options[1]

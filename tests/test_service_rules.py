"""The sandbox service's policy file (kernel_sandbox.service.rules): real TOML files, real callers.

Unit tier: no engine. Each refusal is checked for the rule it names (file, section, key), since
that is what a user on a shared machine sees and what an operator has to find.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from kernel_sandbox.errors import PolicyError, SandboxError, ServiceRefused
from kernel_sandbox.policy import PROFILES, layer_policy, parse_size
from kernel_sandbox.service import rules as rules_module
from kernel_sandbox.service.callers import Caller
from kernel_sandbox.service.rules import (
    BUILTIN_DEFAULTS,
    DEFAULT_RULES_PATH,
    RulesFile,
    ServiceRules,
)

G = 1024**3


def caller(name: str, home: str, *groups: str, uid: int = 1001) -> Caller:
    return Caller(uid, uid, 4242, name, home, frozenset({name, *groups}), frozenset({uid}))


def write(tmp_path: Path, text: str, name: str = "service.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def homes(tmp_path: Path) -> Path:
    (tmp_path / "home" / "alice").mkdir(parents=True)
    (tmp_path / "home" / "bob").mkdir(parents=True)
    (tmp_path / "srv" / "course").mkdir(parents=True)
    (tmp_path / "srv" / "census").mkdir(parents=True)
    return tmp_path


def course_file(tmp: Path) -> str:
    """The class of docs/service.md: students and instructors, course material read-only."""
    return write(
        tmp,
        f"""
[datasets]
census = "{tmp}/srv/census:read"

[everyone]
profiles = ["educator"]
kernelspecs = ["python3-sandbox"]
mounts = [{{ path = "{{home}}", mode = "rw" }}, {{ path = "{tmp}/srv/course", mode = "ro" }}]
max_kernels = 2
memory_limit = "1g"

[group.students]
max_kernels = 3
datasets = ["census"]

[group.instructors]
profiles = ["analyst", "strict"]
kernelspecs = ["*"]
mounts = [{{ path = "{tmp}/srv/course", mode = "rw" }}]
max_kernels = 8
max_memory = "32g"
memory_limit = "4g"
egress = ["*.corp.test", "pypi.org"]
operator = true

[user.alice]
max_kernels = 1
""",
    )


# -- defaults ----------------------------------------------------------------------------------


def test_no_file_at_the_default_path_means_the_builtin_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(rules_module, "DEFAULT_RULES_PATH", str(tmp_path / "absent.toml"))
    rules = ServiceRules.load()
    assert rules.path is None and rules.mtime is None and rules.sections() == []
    allowed = rules.for_caller(caller("alice", str(tmp_path / "alice")))
    assert allowed.profiles == frozenset(PROFILES) and allowed.kernelspecs is None
    for name in PROFILES:
        allowed.check_profile(name)
    allowed.check_kernelspec("anything-at-all")
    assert allowed.max_kernels == 10 and allowed.max_memory == 16 * G
    assert allowed.ceilings == {
        "memory_limit": 8 * G,
        "cpu_limit": 2.0,
        "pids_limit": 1024,
        "nofile_limit": 4096,
        "tmpfs_size": 2 * G,
    }
    # "anywhere the caller can access": the service checks the access, the rule allows all
    assert allowed.check_mount("/srv/anything", "rw").path == "/"
    assert allowed.datasets == {} and allowed.egress == () and allowed.operator is False
    assert allowed.sources["max_kernels"] == ("the built-in default max_kernels = 10",)
    assert DEFAULT_RULES_PATH == "/etc/kernel-sandbox/service.toml"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_default_ceilings_leave_every_builtin_profile_as_it_is(profile, tmp_path, monkeypatch):
    monkeypatch.setattr(rules_module, "DEFAULT_RULES_PATH", str(tmp_path / "absent.toml"))
    allowed = ServiceRules.load().for_caller(caller("alice", "/home/alice"))
    uncapped, sources = layer_policy(profile, {}, {}, {})
    capped, capped_sources = allowed.apply_ceilings(uncapped, sources)
    assert capped == uncapped and capped_sources == sources
    allowed.check_count(0, 0, capped.memory_limit)


def test_an_explicit_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="absent.toml: cannot read the policy file"):
        ServiceRules.load(str(tmp_path / "absent.toml"))


def test_everyone_starts_from_the_builtin_defaults(tmp_path):
    path = write(tmp_path, "[everyone]\nmax_kernels = 3\n")
    allowed = ServiceRules.load(path).for_caller(caller("alice", "/home/alice"))
    assert allowed.max_kernels == 3 and allowed.profiles == frozenset(PROFILES)
    assert allowed.ceilings["memory_limit"] == 8 * G
    assert allowed.sources["max_kernels"] == (f"{path} [everyone] max_kernels = 3",)


# -- how sections combine ----------------------------------------------------------------------


def test_lists_are_the_union_and_values_the_most_specific(homes):
    rules = ServiceRules.load(course_file(homes))
    assert rules.sections() == ["[everyone]", "[group.students]", "[group.instructors]",
                                "[user.alice]"]  # fmt: skip
    student = rules.for_caller(caller("carol", f"{homes}/home/carol", "students", uid=1003))
    assert student.profiles == {"educator"} and student.kernelspecs == {"python3-sandbox"}
    assert student.max_kernels == 3  # the group beats [everyone]
    assert student.ceilings["memory_limit"] == G  # [everyone] beats the built-in default
    assert student.ceilings["cpu_limit"] == 2.0  # the built-in default, nobody set it
    assert list(student.datasets) == ["census"] and student.egress == ()
    assert not student.operator

    alice = rules.for_caller(caller("alice", f"{homes}/home/alice", "students"))
    assert alice.max_kernels == 1  # her own section beats her group's
    assert alice.sources["max_kernels"] == (f"{homes}/service.toml [user.alice] max_kernels = 1",)

    teacher = rules.for_caller(caller("bob", f"{homes}/home/bob", "instructors", uid=1002))
    assert teacher.profiles == {"educator", "analyst", "strict"} and teacher.kernelspecs is None
    assert teacher.max_kernels == 8 and teacher.max_memory == 32 * G and teacher.operator
    assert teacher.ceilings["memory_limit"] == 4 * G
    assert teacher.egress == ("*.corp.test", "pypi.org") and teacher.datasets == {}
    # the union of the mount rules: [everyone]'s two and the group's rw one
    assert [(m.path, m.mode) for m in teacher.mounts] == [
        (f"{homes}/home/bob", "rw"),
        (f"{homes}/srv/course", "ro"),
        (f"{homes}/srv/course", "rw"),
    ]
    assert teacher.check_mount(f"{homes}/srv/course/week1", "rw").section == (
        f'{homes}/service.toml [group.instructors] mounts {{ path = "{homes}/srv/course", '
        'mode = "rw" }'
    )
    # both groups: the union of the lists, the most permissive value among the groups
    both = rules.for_caller(caller("dave", "/home/dave", "students", "instructors", uid=1004))
    assert both.max_kernels == 8 and list(both.datasets) == ["census"] and both.operator
    assert both.egress == ("*.corp.test", "pypi.org")


def test_groups_combine_deterministically(tmp_path):
    path = write(
        tmp_path,
        """
[group.a]
idle_timeout = "1h"
runtime = "runsc"
cpu_limit = 1
[group.b]
idle_timeout = 0
runtime = "runc"
cpu_limit = 4
[group.c]
operator = false
[user.eve]
cpu_limit = 0.5
""",
    )
    rules = ServiceRules.load(path)
    allowed = rules.for_caller(caller("fred", "/home/fred", "b", "a", "c"))
    assert allowed.ceilings["idle_timeout"] == 0  # 0 ("never") is the loosest
    assert allowed.ceilings["cpu_limit"] == 4.0
    assert allowed.ceilings["runtime"] == "runsc"  # a pin: the group whose name sorts first
    assert not allowed.operator
    # a user's own section wins even when it is stricter than a group's
    assert rules.for_caller(caller("eve", "/home/eve", "b")).ceilings["cpu_limit"] == 0.5


def test_the_most_specific_mount_rule_is_returned(tmp_path):
    (tmp_path / "srv" / "course" / "answers").mkdir(parents=True)
    path = write(
        tmp_path,
        f"""
[everyone]
mounts = [{{ path = "{tmp_path}/srv", mode = "ro" }},
          {{ path = "{tmp_path}/srv/course/answers", mode = "rw" }}]
""",
    )
    allowed = ServiceRules.load(path).for_caller(caller("alice", "/home/alice"))
    assert allowed.check_mount(f"{tmp_path}/srv/course/answers/1", "ro").path.endswith("answers")
    assert allowed.check_mount(f"{tmp_path}/srv/course", "ro").path == f"{tmp_path}/srv"


# -- refusals name the rule --------------------------------------------------------------------


def test_each_refusal_names_the_rule(homes):
    path = course_file(homes)
    rules = ServiceRules.load(path)
    carol = rules.for_caller(caller("carol", f"{homes}/home/carol", "students", uid=1003))

    def refused(action) -> ServiceRefused:
        with pytest.raises(ServiceRefused) as info:
            action()
        error = info.value
        assert isinstance(error, PermissionError) and isinstance(error, SandboxError)
        assert str(error).startswith(f"refused by {error.rule}: carol (uid 1003) ")
        return error

    error = refused(lambda: carol.check_count(3, 3 * G, G))
    assert error.rule == f"{path} [group.students] max_kernels = 3"
    assert "already has 3 live kernels; stop one (kernel-sandbox ps / stop)" in str(error)
    carol.check_count(2, 2 * G, G)

    error = refused(lambda: carol.check_count(2, 15 * G, 2 * G))
    assert error.rule == 'the built-in default max_memory = "16g"'
    assert "has 15g memory in 2 live kernels, and this one asks for 2g more" in str(error)

    error = refused(lambda: carol.check_profile("analyst"))
    assert error.rule == f'{path} [everyone] profiles = ["educator"]'
    assert "may not use the profile 'analyst'; allowed: educator" in str(error)

    error = refused(lambda: carol.check_kernelspec("python3"))
    assert error.rule == f'{path} [everyone] kernelspecs = ["python3-sandbox"]'

    error = refused(lambda: carol.check_mount(f"{homes}/srv/course/week1", "rw"))
    assert error.rule == (
        f'{path} [everyone] mounts {{ path = "{homes}/srv/course", mode = "ro" }}'
    )
    assert "read-only only" in str(error)

    error = refused(lambda: carol.check_mount(f"{homes}/home/bob", "ro"))
    assert error.rule.startswith(f'{path} [everyone] mounts = [{{ path = "{{home}}"')
    assert f"{homes}/home/carol (rw), {homes}/srv/course (ro)" in str(error)

    error = refused(lambda: carol.check_datasets(["census", "payroll"]))
    assert "the dataset 'payroll'" in str(error) and "granted: census" in str(error)
    assert f'{path} [group.students] datasets = ["census"]' in error.rule
    assert carol.check_datasets(["census"])[0].source == f"{homes}/srv/census"

    error = refused(lambda: carol.check_egress(["pypi.org"]))
    assert error.rule == "the built-in default egress = []"

    policy, sources = layer_policy("educator", {}, {}, {"memory_limit": "2g"})
    error = refused(lambda: carol.apply_ceilings(policy, sources))
    assert error.rule == f'{path} [everyone] memory_limit = "1g"'
    assert "asks for memory_limit 2g (from kernelspec), over this ceiling; use 1g or less" in str(
        error
    )


def test_a_profile_value_over_a_ceiling_is_lowered_not_refused(homes):
    teacher = ServiceRules.load(course_file(homes)).for_caller(
        caller("bob", f"{homes}/home/bob", "instructors")
    )
    policy, sources = layer_policy("analyst", {}, {}, {})
    assert policy.memory_limit == 4 * G
    path = write(homes, "[everyone]\nmemory_limit = '2g'\nruntime = 'runsc'\n", "low.toml")
    low = ServiceRules.load(path).for_caller(caller("bob", "/home/bob"))
    capped, capped_sources = low.apply_ceilings(policy, sources)
    assert capped.memory_limit == 2 * G and capped.runtime == "runsc"
    assert capped_sources["memory_limit"].startswith("ceiling (the profile analyst value")
    assert teacher.apply_ceilings(policy, sources)[0].memory_limit == 4 * G
    spec_runc, spec_sources = layer_policy("strict", {}, {}, {"runtime": "runc"})
    with pytest.raises(ServiceRefused, match="which differs from it; use runsc$"):
        low.apply_ceilings(spec_runc, spec_sources)


def test_egress_requests_must_lie_within_the_allowlist(homes):
    teacher = ServiceRules.load(course_file(homes)).for_caller(
        caller("bob", f"{homes}/home/bob", "instructors")
    )
    teacher.check_egress(["api.corp.test", "*.x.corp.test", "*.corp.test:443", "PyPI.org."])
    teacher.check_egress([])
    for beyond in ("corp.test", "evil-corp.test", "api.corp.test:8443", "pypi.org:*", "x.org"):
        with pytest.raises(ServiceRefused, match="may not let a kernel reach"):
            teacher.check_egress([beyond])
    with pytest.raises(PolicyError, match="egress"):
        teacher.check_egress(["*"])
    path = write(homes, "[everyone]\negress = ['mirror.corp.test:*', '127.0.0.2:8080']\n", "e.toml")
    ports = ServiceRules.load(path).for_caller(caller("bob", "/home/bob"))
    ports.check_egress(["mirror.corp.test:8443", "mirror.corp.test", "127.0.0.2:8080"])
    with pytest.raises(ServiceRefused):
        ports.check_egress(["127.0.0.2"])


# -- mounts: placeholders and containment ------------------------------------------------------


def test_placeholders_are_expanded_and_resolved(tmp_path):
    (tmp_path / "real" / "alice").mkdir(parents=True)
    (tmp_path / "homes").symlink_to(tmp_path / "real")
    (tmp_path / "scratch" / "alice").mkdir(parents=True)
    path = write(
        tmp_path,
        f"""
[everyone]
mounts = [{{ path = "{{home}}/work", mode = "rw" }},
          {{ path = "{tmp_path}/scratch/{{user}}", mode = "rw" }},
          {{ path = "{tmp_path}/shared" }}]
""",
    )
    rules = ServiceRules.load(path)
    alice = rules.for_caller(caller("alice", f"{tmp_path}/homes/alice"))
    assert [(m.path, m.mode, m.written) for m in alice.mounts] == [
        (f"{tmp_path}/real/alice/work", "rw", "{home}/work"),  # the link is resolved
        (f"{tmp_path}/scratch/alice", "rw", f"{tmp_path}/scratch/{{user}}"),
        (f"{tmp_path}/shared", "ro", f"{tmp_path}/shared"),  # mode defaults to ro
    ]
    alice.check_mount(f"{tmp_path}/real/alice/work/nb", "rw")
    with pytest.raises(ServiceRefused):
        alice.check_mount(f"{tmp_path}/homes/alice/work", "rw")  # not resolved: no match
    # an account whose home is / (or not a path) gets no {home} rule at all
    daemon = rules.for_caller(caller("daemon", "/", uid=2))
    assert [m.written for m in daemon.mounts] == [f"{tmp_path}/scratch/{{user}}",
                                                  f"{tmp_path}/shared"]  # fmt: skip
    with pytest.raises(ServiceRefused):
        daemon.check_mount("/etc", "ro")


def test_containment_compares_whole_path_components(tmp_path):
    home = f"{tmp_path}/home/alice"
    path = write(tmp_path, '[everyone]\nmounts = [{ path = "{home}", mode = "rw" }]\n')
    alice = ServiceRules.load(path).for_caller(caller("alice", home))
    assert alice.check_mount(home, "rw").path == home
    alice.check_mount(home + "/", "rw")  # a trailing slash is the same folder
    alice.check_mount(home + "/nb/data", "ro")
    for outside in (f"{tmp_path}/home/alice2", f"{tmp_path}/home", "/"):
        with pytest.raises(ServiceRefused, match="is not at or under a folder"):
            alice.check_mount(outside, "ro")
    for unresolved in (f"{home}/../bob", f"{home}/./x", "home/alice", f"{home}//x", ""):
        with pytest.raises(PolicyError, match="not an absolute, resolved path"):
            alice.check_mount(unresolved, "ro")
    with pytest.raises(PolicyError, match="mode"):
        alice.check_mount(home, "rwx")


# -- bad files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("[everyone]\nmax_kernel = 3", "[everyone] max_kernel", "unknown key; known: profiles"),
        ("[group.students]\nmax_memory = 'lots'", "[group.students] max_memory", "'lots'"),
        ("[user.alice]\nmemory_limit = '2x'", "[user.alice] memory_limit", "such as '512m'"),
        ("[everyone]\nmemory_limit = '1m'", "[everyone] memory_limit", "at least 32m"),
        ("[everyone]\ncpu_limit = -1", "[everyone] cpu_limit", "a positive number"),
        ("[everyone]\nprofiles = ['analyts']", "[everyone] profiles", "'analyts' is not a known"),
        ("[everyone]\nprofiles = 'strict'", "[everyone] profiles", "expected a list of names"),
        ("[everyone]\nkernelspecs = ['a b']", "[everyone] kernelspecs", "not a valid kernelspec"),
        ("[group.x]\ndatasets = ['nope']", "[group.x] datasets", "'nope' is not defined in"),
        ("[everyone]\nmax_kernels = '3'", "[everyone] max_kernels", "a whole number"),
        ("[everyone]\nmax_kernels = true", "[everyone] max_kernels", "a whole number"),
        ("[everyone]\noperator = 'yes'", "[everyone] operator", "true or false"),
        ("[everyone]\nmounts = '/srv'", "[everyone] mounts", "a list of tables"),
        ("[everyone]\nmounts = [{ path = '/srv', mode = 'rx' }]", "[everyone] mounts", "mode"),
        ("[everyone]\nmounts = [{ path = 'srv' }]", "[everyone] mounts", "not an absolute path"),
        ("[everyone]\nmounts = [{ path = '/s/{uid}' }]", "[everyone] mounts", "not {uid}"),
        ("[everyone]\nmounts = [{ path = '/s', to = '/x' }]", "[everyone] mounts", "tables"),
        ("[everyone]\negress = ['*']", "[everyone] egress", "every host"),
        ("[everyone]\nruntime = 3", "[everyone] runtime", "an OCI runtime name"),
        ("max_kernels = 3", "unknown top-level key 'max_kernels'", "put it in [everyone]"),
        ("[groups.x]\nmax_kernels = 3", "unknown top-level key 'groups'", "[group.NAME]"),
        ("group = 3", "group must be tables", "[group.NAME]"),
        ("[group]\nx = 3", "[group.x] must be a table", ""),
        ("everyone = 3", "[everyone] must be a table", ""),
        ("[datasets]\nx = 'relative/dir'", "[datasets] 'x'", "absolute path"),
        ("[everyone\n", "not valid TOML", "line 1"),
    ],
)
def test_bad_values_give_one_error_naming_file_section_and_key(tmp_path, text, where, message):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        ServiceRules.load(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert where in str(info.value) and message in str(info.value), str(info.value)


def test_a_file_others_can_change_is_refused(tmp_path):
    path = write(tmp_path, "[everyone]\nmax_kernels = 3\n")
    os.chmod(path, 0o664)
    with pytest.raises(PolicyError, match="writable by its owner only.*chmod go-w"):
        ServiceRules.load(path)


# -- reload ------------------------------------------------------------------------------------


def test_reload_takes_a_good_new_version_and_keeps_the_last_good_one(tmp_path, caplog):
    path = write(tmp_path, "[everyone]\nmax_kernels = 3\n")
    held = RulesFile(path)
    first = held.current()
    assert held.current() is first  # unchanged: not read again
    alice = caller("alice", "/home/alice")

    def rewrite(text: str, tick: int) -> None:
        Path(path).write_text(text)
        os.utime(path, ns=(tick, tick))  # a distinct mtime even within one clock tick

    rewrite("[everyone]\nmax_kernels = 4\n", 10**18)
    assert held.current().for_caller(alice).max_kernels == 4 and held.error is None
    good = held.current()
    with caplog.at_level(logging.ERROR, logger="kernel_sandbox.service.rules"):
        rewrite("[everyone]\nmax_kernels = 'many'\n", 2 * 10**18)
        assert held.current() is good and held.current() is good
    assert "max_kernels" in (held.error or "")
    assert len([r for r in caplog.records if "keeping the previous" in r.message]) == 1
    Path(path).unlink()
    assert held.current() is good  # an explicit path that vanished: still the last good
    rewrite("[everyone]\nmax_kernels = 5\n", 3 * 10**18)
    assert held.current().for_caller(alice).max_kernels == 5 and held.error is None


def test_a_malformed_file_at_start_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="max_kernels"):
        RulesFile(write(tmp_path, "[everyone]\nmax_kernels = -1\n"))


def test_describe_is_json_and_names_the_rules(homes):
    rules = ServiceRules.load(course_file(homes))
    summary = rules.for_caller(caller("alice", f"{homes}/home/alice", "students")).describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["profiles"] == ["educator"] and summary["kernelspecs"] == ["python3-sandbox"]
    assert summary["max_memory"] == "16g" and summary["ceilings"]["memory_limit"] == "1g"
    assert summary["datasets"] == {"census": {"source": f"{homes}/srv/census", "access": "read"}}
    alice_rule = f"{homes}/service.toml [user.alice] max_kernels = 1"
    assert summary["sources"]["max_kernels"] == [alice_rule]
    assert rules.describe()["sections"][0] == "[everyone]"
    assert set(BUILTIN_DEFAULTS) <= set(summary) | set(summary["ceilings"])
    assert parse_size("x", BUILTIN_DEFAULTS["max_memory"]) == 16 * G


def test_the_class_example_of_docs_service_md_means_what_the_page_says(tmp_path):
    page = (Path(__file__).parent.parent / "docs" / "service.md").read_text()
    example = page.split("### Example: a class", 1)[1].split("```toml\n", 1)[1].split("```")[0]
    (tmp_path / "census").mkdir()
    rules = ServiceRules.load(
        write(tmp_path, example.replace("/srv/data/census", f"{tmp_path}/census"))
    )
    student = rules.for_caller(caller("sam", "/home/sam", "students"))
    assert student.profiles == {"educator"} and student.kernelspecs == {"python3-sandbox"}
    assert [(m.path, m.mode) for m in student.mounts] == [
        ("/home/sam", "rw"),
        ("/srv/course", "ro"),
    ]
    assert list(student.datasets) == ["census"] and student.egress == ()
    assert (student.max_kernels, student.max_memory) == (3, 2 * G)
    assert student.ceilings["memory_limit"] == 512 * 1024**2
    assert student.ceilings["idle_timeout"] == 7200 and not student.operator
    teacher = rules.for_caller(caller("ines", "/home/ines", "instructors"))
    assert teacher.profiles == {"educator", "analyst", "strict"} and teacher.kernelspecs is None
    assert teacher.check_mount("/srv/course/week1", "rw").mode == "rw"
    assert list(teacher.datasets) == ["census", "results"] and len(teacher.egress) == 2
    assert (teacher.max_kernels, teacher.max_memory, teacher.operator) == (10, 32 * G, True)
    assert rules.for_caller(caller("ta1", "/home/ta1", "students")).max_kernels == 5

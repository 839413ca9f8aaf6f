"""Every ``kernel-sandbox`` command fails the same way: one line on stderr and the exit code
of :data:`kernel_sandbox.cli.console.EXIT_CODES` (2 for every usage or setup error); what it
did, or that there is nothing to show, goes to stdout (unit tests: the engine is a stand-in
handed to ``main``, so none is needed; an egress proxy, a host process, is real).
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel_sandbox.broker.tokens import Grant, TokenStore
from kernel_sandbox.cli.app import build_parser, main
from kernel_sandbox.cli.console import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    exit_code_for,
    one_line,
)
from kernel_sandbox.egress import EgressEndpoint
from kernel_sandbox.errors import (
    EngineUnavailable,
    ImageBuildError,
    KernelspecError,
    PolicyError,
    SandboxError,
)
from kernel_sandbox.policy.model import SandboxPolicy


class StandInEngine:
    """A backend whose every call raises ``error`` (or finds nothing when it is None)."""

    def __init__(self, error: type[BaseException] | None = EngineUnavailable):
        self.error = error
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.error is not None:
                raise self.error(f"stand-in engine: {name} failed")
            return [] if name == "find" else None

        return call


def every_command() -> list[tuple[str, ...]]:
    """Each runnable command of the parser, as its words (``policy show``, ``ps``, ...)."""
    found: list[tuple[str, ...]] = []

    def walk(parser: Any, words: tuple[str, ...]) -> None:
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions:
            found.append(words)
            return
        for name, sub in actions[0].choices.items():
            walk(sub, (*words, name))

    walk(build_parser(), ())
    return found


def one_stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line on stderr (and nothing on stdout: an error is not a result)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert captured.out == "", captured.out
    return lines[0]


def test_the_table_maps_each_kind_of_error():
    assert exit_code_for(ImageBuildError("x")) == EXIT_FAILED
    for error in (PolicyError("x"), EngineUnavailable("x"), KernelspecError("x")):
        assert exit_code_for(error) == EXIT_USAGE
    assert exit_code_for(SandboxError("x")) == EXIT_USAGE
    assert exit_code_for(UsageError("x")) == EXIT_USAGE
    assert exit_code_for(FileNotFoundError(errno.ENOENT, "x", "/p")) == EXIT_USAGE
    assert exit_code_for(PermissionError(errno.EACCES, "x", "/p")) == EXIT_USAGE
    assert exit_code_for(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert exit_code_for(RuntimeError("a bug")) is None  # shown with its traceback
    kinds = [kind for kind, _ in EXIT_CODES]
    for i, kind in enumerate(kinds):  # a subclass never hides behind its base
        assert not any(issubclass(kind, earlier) for earlier in kinds[:i]), kind


@pytest.mark.parametrize("words", every_command(), ids=" ".join)
def test_every_command_refuses_a_bad_flag_in_one_line(words, capsys):
    assert main([*words, "--no-such-flag"]) == EXIT_USAGE
    line = one_stderr_line(capsys)
    assert "error:" in line and "--help" in line


@pytest.fixture
def setup_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[tuple[str, ...], tuple[list[str], int, str]]:
    """For every command: arguments that make it fail, its exit code, and what it says."""
    (tmp_path / "a-file").write_text("")  # a user config dir that cannot be made
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "a-file" / "jupyter"))
    bad_profiles = tmp_path / "bad_profiles.py"
    bad_profiles.write_text("c.DockerSandboxProvisioner.profiles = {'p': {'memory_limit': 'x'}}")
    missing = str(tmp_path / "missing")
    db = str(tmp_path / "tokens.sqlite")
    return {
        ("install",): (["--name", "n", "--memory-limit", "lots", "--prefix", missing], 2, "memo"),
        ("wrap",): (["no-such-kernel", "--image", "x"], 2, "no kernelspec named"),
        ("image", "build"): (["--binder", missing], 2, "does not exist"),
        ("image", "base"): ([], 2, "stand-in engine"),
        ("policy", "show"): (["no-such-kernel"], 2, "no kernelspec named"),
        ("policy", "profiles"): (["--config", str(bad_profiles)], 2, "memory_limit"),
        ("doctor",): (["--config", f"{missing}.py"], 2, "cannot read config file"),
        ("ps",): ([], 2, "stand-in engine"),
        ("stop",): (["no-such-kernel"], 2, "no sandboxed kernel"),
        ("serve",): (["--mode", "rw-rw-rw-"], 2, "octal mode"),
        ("gc",): (["--runtime-root", missing], 2, "stand-in engine"),
        ("run",): ([f"{missing}.ipynb"], 2, "no such notebook or folder"),
        ("tokens", "list"): (["--db", str(tmp_path)], 2, "token database"),
        ("tokens", "revoke"): (["no-such-kernel", "--db", db], 2, "no-such-kernel"),
        ("egress", "pending"): (["--kernel", "nokernel", "--runtime-root", missing], 2, "nokernel"),
        ("egress", "approve"): (
            ["nokernel", "a.test:443", "--runtime-root", missing],
            2,
            "nokernel",
        ),
        ("egress", "deny"): (["nokernel", "a.test:443", "--runtime-root", missing], 2, "nokernel"),
        ("egress", "secrets", "list"): (
            ["--kernel", "nokernel", "--runtime-root", missing],
            2,
            "nokernel",
        ),
        ("egress", "secrets", "revoke"): (
            ["nokernel", "a.test", "--runtime-root", missing],
            2,
            "nokernel",
        ),
        ("egress", "secrets", "rotate"): (
            ["nokernel", "a.test", "--runtime-root", missing],
            2,
            "nokernel",
        ),
        ("lockdown",): (["enable", "--user"], 2, "cannot write"),
        ("mcp",): (["--workspace", missing], 2, "the folder does not exist"),
        ("audit", "show"): (["--log-dir", missing], 2, "not a directory"),
        ("audit", "verify"): (["--log", missing], 2, "no such audit log"),
        ("kube", "seccomp-profile"): (["--install", "--name", "/x"], 2, "kube_seccomp_profile"),
    }


def test_the_setup_errors_cover_every_command(setup_errors):
    assert sorted(setup_errors) == sorted(every_command())
    assert {code for _, code, _ in setup_errors.values()} == {EXIT_USAGE}  # docs: always 2


@pytest.mark.parametrize("words", every_command(), ids=" ".join)
def test_every_command_reports_a_setup_error_in_one_line(words, setup_errors, capsys):
    argv, code, says = setup_errors[words]
    engine = StandInEngine(EngineUnavailable if words != ("stop",) else None)
    assert main([*words, *argv], backend=engine) == code  # type: ignore[arg-type]
    line = one_stderr_line(capsys)
    assert line.startswith("error: ") and says in line, line
    assert "Traceback" not in line


def test_an_interrupted_command_exits_130(capsys):
    assert main(["ps"], backend=StandInEngine(KeyboardInterrupt)) == EXIT_INTERRUPTED  # type: ignore[arg-type]
    assert one_stderr_line(capsys) == "interrupted"


def test_commands_use_the_engine_they_are_handed(capsys):
    engine = StandInEngine(None)
    assert main(["ps", "--json"], backend=engine) == 0  # type: ignore[arg-type]
    assert main(["gc", "--dry-run"], backend=engine) == 0  # type: ignore[arg-type]
    assert engine.calls == ["find", "find"]
    assert capsys.readouterr().out.splitlines()[0] == "[]"


def test_an_error_is_one_line_whatever_its_text():
    assert one_line(ValueError("first\n  second\n\n")) == "first; second"
    assert one_line(FileNotFoundError(errno.ENOENT, "No such file", "/x/y")) == "No such file: /x/y"
    assert one_line(EngineUnavailable("the engine\nis gone")) == "the engine; is gone"
    assert one_line(RuntimeError()) == "RuntimeError"


# -- more bad input, found by trying each command ---------------------------------------------


@pytest.fixture
def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Arguments a person may well give, and what the one error line must say."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    (tmp_path / "service.toml").write_text("")  # the built-in rules
    prefix = str(tmp_path / "prefix")
    root = ["--runtime-root", str(tmp_path / "none")]
    return [
        # the prefix once, not "kernelspec e1: kernelspec e1: ..."
        (["install", "--prefix", prefix, "--name", "e1", "--profile", "nope"], "unknown profile"),
        (["install", "--prefix", prefix, "--name", "e1", "--cpu-limit", "100000"], "this host's"),
        (["install", "--prefix", prefix, "--name", "e1", "--dataset", "d=./no"], "not a directory"),
        (["install", "--prefix", prefix, "--name", "e1", "--mount", "no:/x"], "does not exist"),
        (
            ["install", "--prefix", prefix, "--network", "allowlist", "--egress", "ftp://a.test"],
            "http://",
        ),
        (["install", "--prefix", str(a_file / "p"), "--name", "e1"], "cannot install"),
        (["image", "build", "--binder", str(a_file)], "is not a folder"),
        (["egress", "approve", "k", "ftp://a.test/", *root], "TARGET"),
        (["egress", "deny", "k", "a.test", *root], "has no port"),
        (["egress", "approve", "k", "https://a.test/v1", *root], "no kernel with an egress proxy"),
        (
            [
                "serve",
                "--state-dir",
                str(a_file / "state"),
                "--policy",
                str(tmp_path / "service.toml"),
            ],
            "Not a directory",
        ),
        (["tokens", "list", "--db", str(a_file / "t.sqlite")], "token database"),
        (["policy", "show", "python3-local"], "is not sandboxed"),
        (["run", str(a_file)], "not a notebook"),
    ]


def test_bad_input_is_one_line_and_exit_2(bad_inputs, jupyter_path, capsys):
    engine = StandInEngine(None)
    for argv, says in bad_inputs:
        assert main(argv, backend=engine) == EXIT_USAGE, argv  # type: ignore[arg-type]
        captured = capsys.readouterr()
        lines = [
            line
            for line in captured.err.splitlines()
            if line.strip() and not line.startswith("note: not running as root")  # serve's
        ]
        assert len(lines) == 1 and captured.out == "", (argv, captured)
        line = lines[0]
        assert line.startswith("error: ") and says in line, (argv, line)
        assert line.count("kernelspec e1:") <= 1, line


# -- what a command did goes to stdout, and nothing to stderr ----------------------------------


# Commands with no outcome that the unit tier can bring about, and where it is tested.
NO_QUIET_OUTCOME = {
    ("image", "build"): "builds on the engine (tests/test_image.py)",
    ("image", "base"): "builds on the engine (tests/test_image.py)",
    ("stop",): "needs a running sandbox (tests/test_cli.py, ps and stop)",
    ("run",): "runs kernels (tests/test_run.py)",
    ("egress", "secrets", "revoke"): "needs a kernel with egress_secrets (test_egress_secrets.py)",
    ("egress", "secrets", "rotate"): "needs a kernel with egress_secrets (test_egress_secrets.py)",
    ("mcp",): "serves until stopped; over stdio its stdout is the MCP stream (test_mcp_server.py)",
}


@pytest.fixture
def egress_proxy(tmp_path: Path) -> Iterator[Path]:
    """A real egress proxy in ask mode (a host process) for kernel "kernel-one"; its root."""
    root = tmp_path / "rt"
    (root / "k1" / "s").mkdir(parents=True)
    policy = SandboxPolicy.from_mapping(
        {"network": "allowlist", "egress": ["api.test"], "egress_mode": "ask"}
    )
    endpoint = EgressEndpoint(
        root / "k1",
        root / "k1" / "s",
        "kernel-one",
        policy,
        str(tmp_path / "egress.jsonl"),
        "/run/kernel-sandbox",
        3128,
    )
    endpoint.start()
    asyncio.run(endpoint.wait_ready())
    yield root
    asyncio.run(endpoint.stop())


@pytest.fixture
def outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jupyter_path: Path
) -> dict[tuple[str, ...], tuple[list[str], set[int], str]]:
    """For every command the unit tier can run to the end: arguments, the exit codes it may
    end with, and what its stdout says (egress: with the ``egress_proxy`` under tmp_path/rt)."""
    prefix = tmp_path / "prefix"
    share = prefix / "share" / "jupyter"
    share.mkdir(parents=True)
    monkeypatch.setenv("JUPYTER_PATH", f"{share}:{jupyter_path}")  # every Jupyter sees it
    monkeypatch.setenv("KERNEL_SANDBOX_SERVICE", "off")
    db = tmp_path / "tokens.sqlite"
    TokenStore(db).mint("kernel-1", {"sales": Grant("/srv/sales", "read")}, ttl=60)
    root = ["--runtime-root", str(tmp_path / "rt")]
    missing = str(tmp_path / "missing")
    return {
        ("install",): (["--prefix", str(prefix), "--name", "e1"], {0}, "installed kernelspec e1"),
        ("wrap",): (
            ["python3-local", "--image", "x", "--prefix", str(prefix)],
            {0},
            "installed kernelspec python3-local-sandboxed",
        ),
        ("policy", "show"): (["python3-sandbox"], {0}, "kernelspec python3-sandbox"),
        ("policy", "profiles"): ([], {0}, "untrusted"),
        ("doctor",): ([], {1}, "problem(s) found"),  # the stand-in engine does not answer
        ("ps",): ([], {0}, "no sandboxed kernel is running"),
        ("gc",): (["--dry-run", "--runtime-root", missing], {0}, "would remove 0"),
        ("serve",): (["--print-unit"], {0}, "[Service]"),
        ("tokens", "list"): (["--db", str(tmp_path / "empty.sqlite")], {0}, "no live tokens"),
        ("tokens", "revoke"): (["kernel-1", "--db", str(db)], {0}, "revoked token"),
        ("egress", "pending"): (root, {0}, "no egress request is waiting"),
        ("egress", "approve"): (
            ["kernel-one", "https://pypi.test/simple", "--always", *root],
            {0},
            "approved 0 waiting request(s) to pypi.test:443 in kernel kernel-one",
        ),
        ("egress", "deny"): (
            ["kernel", "http://x.test", "--always", *root],
            {0},
            "denied 0 waiting request(s) to x.test:80",
        ),
        ("egress", "secrets", "list"): (root, {0}, "no running kernel has egress secrets"),
        ("lockdown",): (["status"], {0, 1}, "lockdown is"),
        ("audit", "show"): (["--log-dir", str(tmp_path)], {0}, "no audit records"),
        ("audit", "verify"): (["--log-dir", str(tmp_path)], {0}, "no records"),
        ("kube", "seccomp-profile"): (
            ["--install", "--root", str(tmp_path / "seccomp")],
            {0},
            "installed",
        ),
    }


def test_the_outcomes_cover_every_command(outcomes):
    assert sorted([*outcomes, *NO_QUIET_OUTCOME]) == sorted(every_command())


@pytest.mark.parametrize(
    "words", [w for w in every_command() if w not in NO_QUIET_OUTCOME], ids=" ".join
)
def test_what_a_command_did_goes_to_stdout(words, outcomes, request, capsys):
    argv, codes, says = outcomes[words]
    if words[0] == "egress":
        request.getfixturevalue("egress_proxy")
    engine = StandInEngine(None if words != ("doctor",) else EngineUnavailable)
    assert main([*words, *argv], backend=engine) in codes  # type: ignore[arg-type]
    captured = capsys.readouterr()
    assert says in captured.out, captured
    assert captured.err == "", captured.err


def test_egress_approve_of_an_unknown_kernel_beside_a_live_one(egress_proxy, capsys):
    argv = ["egress", "approve", "nokernel", "api.test:443", "--runtime-root", str(egress_proxy)]
    assert main(argv) == EXIT_USAGE
    line = one_stderr_line(capsys)
    assert "no kernel with an egress proxy matches 'nokernel'" in line
    assert "(kernels: kernel-one)" in line
    argv = ["egress", "approve", "kernel-one", "https://api.test/v1", "--runtime-root"]
    assert main([*argv, str(egress_proxy)]) == EXIT_USAGE  # nothing waits, and not --always
    assert "no request to api.test:443 is waiting" in one_stderr_line(capsys)


def test_json_output_stays_json(capsys):
    """--json prints JSON alone on stdout, whatever else a command says."""
    assert main(["ps", "--json"], backend=StandInEngine(None)) == 0  # type: ignore[arg-type]
    assert json.loads(capsys.readouterr().out) == []


def test_an_unknown_runtime_is_a_setup_error_with_an_honest_hint(jupyter_path, tmp_path, capsys):
    """setup.sh registers runsc only: the hint for any runtime points at doctor instead."""
    import nbformat
    from support.kernels import make_kernelspec

    class Engine:
        async def ping(self) -> None:
            return None

        async def image_labels(self, image: str) -> dict[str, str]:
            return {}

        async def runtimes(self) -> list[str]:
            return ["runc", "runsc"]

        async def engine_info(self) -> dict[str, int]:
            return {"NCPU": 2}

    notebook = tmp_path / "n.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), str(notebook))
    spec = make_kernelspec("kata-spec", {"runtime": "kata"})
    argv = ["run", "--kernel", spec, str(notebook)]
    assert main(argv, backend=Engine()) == EXIT_USAGE  # type: ignore[arg-type]
    line = one_stderr_line(capsys)
    assert "no OCI runtime 'kata'" in line and "kernel-sandbox doctor" in line
    assert "setup.sh" not in line

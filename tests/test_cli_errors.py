"""Every ``kernel-sandbox`` command fails the same way: one line on stderr and the exit code
of :data:`kernel_sandbox.cli.console.EXIT_CODES` (unit tests: the engine is a stand-in
handed to ``main``, so none is needed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kernel_sandbox.cli.app import build_parser, main
from kernel_sandbox.cli.console import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    exit_code_for,
)
from kernel_sandbox.errors import (
    EngineUnavailable,
    ImageBuildError,
    KernelspecError,
    PolicyError,
    SandboxError,
)


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
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_table_maps_each_kind_of_error():
    assert exit_code_for(ImageBuildError("x")) == EXIT_FAILED
    for error in (PolicyError("x"), EngineUnavailable("x"), KernelspecError("x")):
        assert exit_code_for(error) == EXIT_USAGE
    assert exit_code_for(SandboxError("x")) == EXIT_USAGE
    assert exit_code_for(UsageError("x")) == EXIT_USAGE
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
        ("image", "build"): (["--binder", missing], 1, "does not exist"),
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
    }


def test_the_setup_errors_cover_every_command(setup_errors):
    assert sorted(setup_errors) == sorted(every_command())


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
    assert capsys.readouterr().out.strip() == "[]"

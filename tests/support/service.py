"""A real sandbox service and real Unix accounts for tests.

``ServiceProcess`` runs ``kernel-sandbox serve`` (as root, as the unit does) on a socket of its
own with state, logs and runtime directories of its own, and can be killed and started again.
``TestUsers`` makes ordinary accounts (``useradd``; none in the docker group) and runs Python
as them (``run_as``): this interpreter and this checkout are made reachable for them through
read-only bind mounts when they live where other users cannot go (``/root``), without
changing any permission on the host.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTHON_VIEW = Path("/opt/kernel-sandbox-test/python")
REPO_VIEW = Path("/opt/kernel-sandbox-test/src")
USER_PREFIX = "kst"


def _user_can_run(user: str, path: str) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "test", "-r", path]).returncode == 0


def _bind(source: Path, view: Path) -> None:
    view.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(view)]).returncode != 0:
        subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(view)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=False)


@dataclass
class TestUsers:
    """Ordinary accounts for one test session, and a way to run Python as them."""

    base: Path  # a folder every account can read: kernelspecs, scripts
    names: list[str] = field(default_factory=list)
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        kernels = self.base / "jupyter" / "kernels"
        if kernels.exists():
            shutil.rmtree(kernels)
        shutil.copytree(REPO / "kernelspecs", kernels)
        for path in [self.base, *self.base.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)

    def add(self, name: str) -> pwd.struct_passwd:
        """An account ``name`` (made if missing) whose home only it can read."""
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(
                ["useradd", "--create-home", "--shell", "/usr/sbin/nologin", name], check=True
            )
            account = pwd.getpwnam(name)
        if name not in self.names:
            self.names.append(name)
        if os.stat(account.pw_dir).st_uid != account.pw_uid:  # left by an earlier run
            os.chown(account.pw_dir, account.pw_uid, account.pw_gid)
        os.chmod(account.pw_dir, 0o700)
        self._reachable(name)
        return account

    def _reachable(self, user: str) -> None:
        """Make this interpreter and checkout reachable for ``user`` (read-only views)."""
        if self.env:
            return
        prefix = Path(sys.base_prefix).resolve()
        env = {"PYTHONPATH": str(REPO), "JUPYTER_PATH": str(self.base / "jupyter")}
        if not _user_can_run(user, sys.executable):
            _bind(prefix, PYTHON_VIEW)
            self.python = str(PYTHON_VIEW / Path(sys.executable).resolve().relative_to(prefix))
            env["LD_LIBRARY_PATH"] = str(PYTHON_VIEW / "lib")
        if not _user_can_run(user, str(REPO / "pyproject.toml")):
            _bind(REPO, REPO_VIEW)
            env["PYTHONPATH"] = str(REPO_VIEW)
        self.env = env

    def command(
        self, user: str, code: str, *args: str, env: dict[str, str] | None = None
    ) -> list[str]:
        """The command line that runs ``code`` (written to a script file, left for the caller
        to ignore: it is small and in ``base``) with this interpreter as ``user``: its home as
        HOME, a clean environment plus ``env``."""
        account = pwd.getpwnam(user)
        script = self.base / f"script-{secrets.token_hex(4)}.py"
        script.write_text(code)
        script.chmod(0o644)
        full_env = {
            "PATH": "/usr/bin:/bin",
            "HOME": account.pw_dir,
            "USER": user,
            "LANG": "C.UTF-8",
            **self.env,
            **(env or {}),
        }
        variables = [f"{k}={v}" for k, v in full_env.items()]
        return [
            "runuser",
            "-u",
            user,
            "--",
            "env",
            "-i",
            *variables,
            self.python,
            str(script),
            *args,
        ]

    def run_as(
        self,
        user: str,
        code: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 180,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``code`` with this interpreter as ``user`` (its home as HOME, a clean env)."""
        command = self.command(user, code, env=env)
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd or pwd.getpwnam(user).pw_dir,
            )
        finally:
            Path(command[-1]).unlink(missing_ok=True)  # the script (no args here)
        if check and result.returncode != 0:
            raise AssertionError(
                f"as {user}: exit {result.returncode}\nstdout:\n{result.stdout}\n"
                f"stderr:\n{result.stderr[-4000:]}"
            )
        return result

    def popen_as(
        self,
        user: str,
        code: str,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stderr: Any = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start ``code`` as ``user`` (as ``run_as`` does) with text pipes on stdin and stdout,
        for a client the test drives line by line (and may kill)."""
        return subprocess.Popen(
            self.command(user, code, *args, env=env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=cwd or pwd.getpwnam(user).pw_dir,
        )

    def forget(self) -> None:
        """Let the accounts be: they have no password and no login shell, and another test
        session on this host may be using them (removing them, or killing their processes,
        would break it)."""
        self.names.clear()


@dataclass
class ServiceProcess:
    """``kernel-sandbox serve`` as a child process, on its own socket and directories."""

    base: Path  # short: the runtime root lives here and names unix sockets
    policy: Path | None = None
    orphan_timeout: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # more `kernel-sandbox serve` options

    @property
    def socket(self) -> str:
        return str(self.base / "s.sock")

    @property
    def runtime_root(self) -> str:
        return str(self.base / "k")

    @property
    def log_path(self) -> Path:
        return self.base / "serve.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "kernel_sandbox.cli", "serve",
            "--socket", self.socket,
            "--state-dir", str(self.base / "state"),
            "--log-dir", str(self.base / "log"),
            "--runtime-root", self.runtime_root,
            "--orphan-timeout", str(self.orphan_timeout),
            "--log-level", "debug",
        ]  # fmt: skip
        if self.policy is not None:
            cmd += ["--policy", str(self.policy)]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 30) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        log = open(self.log_path, "a")
        offset = log.tell()  # a restart appends: only this run's lines count
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd="/", env={**os.environ}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service ended: {self.log_path.read_text()[-3000:]}")
            if "listening on" in self.log_path.read_text()[offset:]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the service did not listen: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: nothing of the service's cleanup runs."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_policy(self, text: str) -> None:
        """Replace the operator's policy file (the service reloads it on change)."""
        assert self.policy is not None
        staging = self.policy.with_suffix(".tmp")
        staging.write_text(text)
        staging.rename(self.policy)
        future = time.time() + 1
        os.utime(self.policy, (future, future))  # a new mtime even within one second

    def records(self) -> list[dict]:
        state = self.base / "state" / "kernels"
        return [json.loads(p.read_text()) for p in state.glob("*.json")] if state.is_dir() else []

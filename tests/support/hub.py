"""One real JupyterHub classroom for the hub tests (tests/test_hub*.py), shared by them all.

``Classroom.start`` builds what docs/jupyterhub.md tells an operator to build, from the very
files it ships (docs/examples/jupyterhub/): real Unix accounts (``students`` and
``instructors`` groups, PAM passwords), the course material owned by the instructor, the
instructor's private gradebook, each student's own folder with the course notebook, a dataset,
the operator's service policy, its own ``kernel-sandbox serve``, and JupyterHub with
configurable-http-proxy (from npm, installed into a cache folder when missing) and
LocalProcessSpawner. The example files are used as written; only host paths are moved into
this session's folder (``ADAPT``: a test must not take /srv or /etc of a shared machine), and
a test-only config file adds ports, the interpreter the accounts can reach and an API token
for the tests (``tests_config``). What the tests then do on a student's server is in
``support.hub_run``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from support import REPO, unavailable
from support.servers import Server, free_port
from support.service import ServiceProcess, TestUsers

EXAMPLE = REPO / "docs" / "examples" / "jupyterhub"
CHP_VERSION = "5"
CHP_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kernel-sandbox-chp"
STUDENTS = [f"ksts{i:02d}" for i in range(1, 21)]
INSTRUCTOR = "kstteach"
GROUPS = ("students", "instructors")
KERNEL = "course-101"
COURSE_IN_KERNEL = "/srv/course"  # where the kernelspec mounts the course material
GRADEBOOK_SECRET = "GRADEBOOK-SECRET-7f3a"
CULLED_STUDENT = STUDENTS[-1]  # the policy gives this one a short idle_timeout
CULL_SECONDS = 20

# The course notebook (docs/examples/jupyterhub/course/week1.ipynb): tiny, touching what a
# class needs (course material, own folder, dataset). What its code cells print:
EXPECTED = ["course rows 11", "total 55", "census rows 4", "saved "]


def _run(*cmd: str, input: str | None = None) -> None:
    subprocess.run(cmd, check=True, input=input, text=True, capture_output=True)


def chp_command() -> str:
    """configurable-http-proxy: on PATH, in the cache, or installed there from npm now."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    binary = CHP_CACHE / "node_modules" / ".bin" / "configurable-http-proxy"
    if not binary.exists():
        if shutil.which("npm") is None:
            unavailable("npm is missing: configurable-http-proxy comes from npm (Node 20)")
        CHP_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--prefix", str(CHP_CACHE), "--no-audit", "--no-fund",
             f"configurable-http-proxy@{CHP_VERSION}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0 or not binary.exists():
            unavailable(f"npm install configurable-http-proxy failed:\n{done.stderr[-2000:]}")
    return str(binary)


def adapt(text: str, mapping: dict[str, str]) -> str:
    """The example text with its host paths moved; each must be there (else the example
    changed and the tests would no longer test it)."""
    for old, new in mapping.items():
        assert old in text, f"the example no longer mentions {old!r}: update tests/support/hub.py"
        text = text.replace(old, new)
    return text


def _account(users: TestUsers, name: str, group: str, password: str) -> pwd.struct_passwd:
    account = users.add(name)
    _run("usermod", "-a", "-G", group, name)
    _run("chpasswd", input=f"{name}:{password}\n")
    return account


def _own(path: Path, account: pwd.struct_passwd, mode: int) -> None:
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)


@dataclass
class Classroom:
    """The running hub and everything around it."""

    url: str  # the hub's public URL (the proxy)
    base: Path
    service: ServiceProcess
    users: TestUsers
    passwords: dict[str, str]
    token: str  # the tests' own service token (admin:servers, tokens)
    process: subprocess.Popen[bytes]
    course: Path
    singleuser_config: str
    tokens: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the hub's REST API ------------------------------------------------------------------

    def hub_api(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"token {token or self.token}"}
        return requests.request(
            method, f"{self.url}/hub/api{path}", headers=headers, timeout=120, **kw
        )

    def login(self, name: str) -> requests.Session:
        """Log ``name`` in through the hub's login form (PAM checks the password)."""
        session = requests.Session()
        page = session.get(f"{self.url}/hub/login", timeout=120)
        assert page.status_code == 200, page.text[:500]
        form = {"username": name, "password": self.passwords[name]}
        form["_xsrf"] = session.cookies.get("_xsrf", "")
        done = session.post(f"{self.url}/hub/login", data=form, allow_redirects=False, timeout=120)
        assert done.status_code == 302, f"{name}: login answered {done.status_code}"
        return session

    def user_token(self, name: str, session: requests.Session | None = None) -> str:
        """An API token of ``name``'s, asked for with their logged-in browser session."""
        with self.lock:
            if name in self.tokens:
                return self.tokens[name]
        session = session or self.login(name)
        xsrf = session.cookies.get("_xsrf", path="/hub/") or session.cookies.get("_xsrf", "")
        made = session.post(
            f"{self.url}/hub/api/users/{name}/tokens",
            json={"note": "kernel-sandbox hub tests", "expires_in": 3600},
            headers={"X-XSRFToken": xsrf},
            timeout=120,
        )
        assert made.status_code == 201, f"{name}: token: {made.status_code} {made.text[:300]}"
        token = str(made.json()["token"])
        with self.lock:
            self.tokens[name] = token
        return token

    def start_server(self, name: str, timeout: float = 300) -> Server:
        """Start ``name``'s single-user server (if not running) and wait until it answers."""
        token = self.user_token(name)
        asked = self.hub_api("POST", f"/users/{name}/server", token=token)
        assert asked.status_code in (201, 202, 400), f"{name}: {asked.status_code} {asked.text}"
        deadline = time.monotonic() + timeout
        while True:
            user = self.hub_api("GET", f"/users/{name}", token=token).json()
            server = user.get("servers", {}).get("", {})
            if server.get("ready"):
                break
            if not server.get("pending") and not server and asked.status_code != 400:
                raise AssertionError(f"{name}: the server did not start: {user}\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: not ready after {timeout}s: {user}\n{self.log()}")
            time.sleep(0.5)
        return self.server(name)

    def stop_server(self, name: str) -> None:
        stop = self.hub_api("DELETE", f"/users/{name}/server")
        assert stop.status_code in (202, 204, 400), stop.text
        deadline = time.monotonic() + 120
        while self.hub_api("GET", f"/users/{name}").json().get("servers"):
            assert time.monotonic() < deadline, f"{name}: the server did not stop"
            time.sleep(0.5)

    def server(self, name: str) -> Server:
        """``name``'s single-user server, through the proxy, with ``name``'s own token."""
        return Server(f"{self.url}/user/{name}", self.user_token(name), self.process)

    def log(self) -> str:
        return (self.base / "hub.log").read_text()[-4000:]

    def home(self, name: str) -> Path:
        return Path(pwd.getpwnam(name).pw_dir)

    def terminals_on(self) -> bool:
        return 'c.SandboxLockdown.terminals = "off"' not in self.singleuser_config

    # -- building it -------------------------------------------------------------------------

    @classmethod
    def start(cls, users: TestUsers, service_base: Path) -> Classroom:
        base = Path("/tmp") / f"ksh-{os.getpid()}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(mode=0o755)
        for group in GROUPS:
            try:
                grp.getgrnam(group)
            except KeyError:
                _run("groupadd", group)
        passwords = {name: secrets.token_urlsafe(12) for name in [*STUDENTS, INSTRUCTOR]}
        teacher = _account(users, INSTRUCTOR, "instructors", passwords[INSTRUCTOR])
        # the course material: the instructor's, readable by all, mounted read-only
        course = base / "srv" / "course"
        course.mkdir(parents=True)
        (base / "srv").chmod(0o755)
        for source in (EXAMPLE / "course").iterdir():
            shutil.copy(source, course / source.name)
        for path in [course, *course.iterdir()]:
            _own(path, teacher, 0o755 if path.is_dir() else 0o644)
        # the instructor's own: sources and gradebook, in a home only they can read
        source = Path(teacher.pw_dir) / "course-source"
        source.mkdir(exist_ok=True)
        (source / "gradebook.db").write_text(GRADEBOOK_SECRET)
        for path in [source, *source.iterdir()]:
            _own(path, teacher, 0o700 if path.is_dir() else 0o600)
        census = base / "srv" / "data" / "census"
        census.mkdir(parents=True)
        shutil.copy(EXAMPLE / "data" / "census" / "people.csv", census / "people.csv")
        for path in [census.parent, census, *census.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        with ThreadedAccounts() as pool:
            for name in STUDENTS:
                pool.submit(_student, users, name, passwords[name], course)

        # the operator's policy (root's, 0644) and the service that enforces it
        service = ServiceProcess(
            service_base, policy=service_base / "service.toml", orphan_timeout=30.0,
            extra_args=("--stop-kernels-at-exit",),
        )  # fmt: skip
        service_base.mkdir(mode=0o755)
        policy = adapt((EXAMPLE / "service.toml").read_text(), {"/srv/": f"{base}/srv/"})
        policy += f"\n# tests: a short idle timeout for one student\n[user.{CULLED_STUDENT}]\n"
        policy += f"idle_timeout = {CULL_SECONDS}\n"
        service.policy.write_text(policy)  # type: ignore[union-attr]
        service.policy.chmod(0o644)  # type: ignore[union-attr]
        try:
            service.start()
        except BaseException:
            service.stop()
            shutil.rmtree(service_base, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
            raise
        try:
            # the kernelspec, where every account finds it
            spec = json.loads((EXAMPLE / "kernels" / KERNEL / "kernel.json").read_text())
            config = spec["metadata"]["kernel_provisioner"]["config"]
            config["mounts"] = [  # the host side only: in the kernel it is /srv/course
                f"{course}:{m.split(':', 1)[1]}" for m in config["mounts"]
            ]
            assert config["mounts"] == [f"{course}:{COURSE_IN_KERNEL}:ro"], config
            kernels = users.base / "jupyter" / "kernels" / KERNEL
            kernels.mkdir(parents=True, exist_ok=True)
            (kernels / "kernel.json").write_text(json.dumps(spec, indent=1))
            for path in [kernels, *kernels.iterdir()]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            # the single-user servers' config, root's
            singleuser = base / "singleuser"
            singleuser.mkdir(mode=0o755)
            singleuser_config = (EXAMPLE / "singleuser_config.py").read_text()
            (singleuser / "jupyter_server_config.py").write_text(singleuser_config)
            (singleuser / "migrated").touch(mode=0o644)  # see docs/jupyterhub.md
            # the hub: the example config as is, then the tests' own lines
            hub_dir = base / "hub"
            hub_dir.mkdir(mode=0o700)
            example = hub_dir / "example_jupyterhub_config.py"
            example.write_text(
                adapt(
                    (EXAMPLE / "jupyterhub_config.py").read_text(),
                    {"/etc/jupyterhub/singleuser": str(base / "singleuser")},
                )
            )
            port, token = free_port(), secrets.token_hex(16)
            (hub_dir / "jupyterhub_config.py").write_text(
                tests_config(example, port, token, users, service.socket)
            )
            log = open(base / "hub.log", "ab")
            process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(hub_dir / "jupyterhub_config.py")],
                cwd=hub_dir, stdout=log, stderr=subprocess.STDOUT, env=_hub_env(),
            )  # fmt: skip
            room = cls(
                f"http://127.0.0.1:{port}", base, service, users, passwords, token, process,
                course, singleuser_config,
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while True:
                try:
                    if room.hub_api("GET", "/").status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    room.stop()
                    raise RuntimeError(f"JupyterHub did not start:\n{room.log()}")
                time.sleep(0.3)
        except BaseException:
            service.stop()
            shutil.rmtree(service_base, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
            raise
        return room

    def stop(self) -> None:
        """Stop the hub (it stops the servers it spawned), then the service and its kernels."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.service.stop()
        for mount in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            point = mount.split()[1]  # a runtime directory the service left mounted
            if point.startswith(f"{self.service.base}/"):
                subprocess.run(["umount", "-l", point], check=False)
        logs = REPO / "artifacts" / "hub-logs"  # kept for a failure's post-mortem
        logs.mkdir(parents=True, exist_ok=True)
        for log in (self.base / "hub.log", self.service.log_path):
            if log.exists():
                shutil.copy(log, logs / log.name)
        shutil.rmtree(self.service.base, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _hub_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "KERNEL_SANDBOX"))}
    env.pop("PYTHONPATH", None)  # the spawner passes PYTHONPATH on: set in tests_config
    env["PYTHONPATH"] = str(REPO)
    return env


def _student(users: TestUsers, name: str, password: str, course: Path) -> None:
    """An account in ``students`` with its own folder (``~/work``, theirs alone) holding a
    copy of the course notebook and a private file, and nothing left from an earlier run."""
    account = _account(users, name, "students", password)
    home = Path(account.pw_dir)
    for leftover in (".jupyter", ".local", "work"):
        shutil.rmtree(home / leftover, ignore_errors=True)
    work = home / "work"
    work.mkdir()
    shutil.copy(course / "week1.ipynb", work / "week1.ipynb")
    (work / "private.txt").write_text(f"PRIVATE-{name}")
    for path in [work, *work.iterdir()]:
        _own(path, account, 0o700 if path.is_dir() else 0o600)


class ThreadedAccounts:
    """Run account set-up steps in threads (useradd and chpasswd are slow one by one)."""

    def __enter__(self) -> ThreadedAccounts:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        return self

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 (re-raised in __exit__)
                self.errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def __exit__(self, *exc: object) -> None:
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


def tests_config(example: Path, port: int, token: str, users: TestUsers, socket: str) -> str:
    """The hub config the tests run: the example's, then test-only settings."""
    env = {**users.env, "KERNEL_SANDBOX_SERVICE": socket}
    return f"""\
c = get_config()  # noqa
load_subconfig({str(example)!r})  # noqa: F821 (the example, as shipped, paths moved)
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.command = [{chp_command()!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
# the accounts reach this interpreter and checkout through read-only views (support.service);
# -P: the home folder (the server's working directory) is not put on sys.path
c.Spawner.cmd = [{users.python!r}, "-P", "-m", "jupyterhub.singleuser"]
c.Spawner.environment.update({env!r})
c.Spawner.start_timeout = 300
c.Spawner.http_timeout = 300
c.JupyterHub.services = [{{"name": "kst-tests", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "kst-tests",
    "scopes": ["admin:users", "admin:servers", "read:users", "list:users", "tokens"],
    "services": ["kst-tests"],
}}]
"""

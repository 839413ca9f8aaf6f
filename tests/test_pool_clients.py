"""The warm pool through the clients people use: nbclient, `kernel-sandbox run`, and the
operator's `kernel-sandbox ps` / `stop`.

A pooled sandbox is recognised from both sides: on the host by its container (``ks-pool-``
name, label ``io.kernel-sandbox.pooled=true``, the claiming kernel's id in the host-only
``<runtime_dir>/kernel-id``), and inside by the kernel process's command line, which is the
pool's waiter (``kernel_sandbox.inside.pool_waiter``) instead of ``ipykernel_launcher``. Every
test closes the pools of its process before the leak check, and checks nothing is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from support.kernels import make_kernelspec, run_cell, sandbox_kernel
from support.leaks import assert_nothing_left
from support.pools import COLD, POOL_WAITER, WHO_RUNS, sandboxes_of, waiting_of
from traitlets.config import Config

from kernel_sandbox.cli.app import main
from kernel_sandbox.host.pool import WarmPool, process_pool
from kernel_sandbox.host.rundir import CLAIMED_BY
from kernel_sandbox.host.sandboxes import Sandbox, claimed_by

WAIT = 90.0  # seconds: a refill on a busy two-core machine


# -- helpers ----------------------------------------------------------------------------------


def wait_for(condition, what: str, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def warm_pool(leak_check) -> Iterator[WarmPool]:  # type: ignore[no-untyped-def]
    """This process's pool, closed (its waiting sandboxes removed) before the leak check."""
    pool = process_pool()
    yield pool
    pool.close()


def ready_of(pool: WarmPool, client: docker.DockerClient, kernelspec: str) -> list[Sandbox]:
    """Waiting pooled sandboxes of this process that its pool can hand out now. A pooled
    container shows in the engine (and `ps`) from its start, before its waiter is ready: a
    start in between is cold."""
    with pool._lock:
        names = {s.container_name for p in pool._pools.values() for s in p.ready}
    return [s for s in waiting_of(client, os.getpid(), kernelspec) if s.container in names]


def pool_config(size: int = 1) -> Config:
    config = Config()
    config.DockerSandboxProvisioner.pool_size = size
    return config


# -- unit: reading who claimed a pooled sandbox ----------------------------------------------


def summary(labels: dict[str, str], name: str = "/ks-pool-0123abcd") -> dict:
    full = {f"io.kernel-sandbox.{k}": v for k, v in labels.items()}
    return {"Id": "f" * 64, "Names": [name], "State": "running", "Created": 0, "Labels": full}


def test_a_waiting_pooled_sandbox_has_no_kernel_id_and_a_claimed_one_names_its_kernel(tmp_path):
    labels = {"pooled": "true", "kernel-id": "", "runtime-dir": str(tmp_path)}
    waiting = Sandbox.from_summary(summary(labels))
    assert waiting.pooled and waiting.waiting and waiting.kernel_id == ""
    kernel = str(uuid.uuid4())
    (tmp_path / CLAIMED_BY).write_text(kernel + "\n")
    claimed = Sandbox.from_summary(summary(labels))
    assert claimed.pooled and not claimed.waiting and claimed.kernel_id == kernel
    # an ordinary kernel's container: its label, never a file
    cold = Sandbox.from_summary(summary({"kernel-id": "abc", "runtime-dir": str(tmp_path)}))
    assert not cold.pooled and not cold.waiting and cold.kernel_id == "abc"


def test_claimed_by_reads_only_a_plain_short_id(tmp_path):
    assert claimed_by("") == claimed_by(str(tmp_path / "gone")) == ""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not-followed")
    (tmp_path / CLAIMED_BY).symlink_to(elsewhere)
    assert claimed_by(str(tmp_path)) == ""  # a link is never followed
    (tmp_path / CLAIMED_BY).unlink()
    for junk in ("a b", "x" * 300, "\x1b[31mred", "../../etc"):
        (tmp_path / CLAIMED_BY).write_text(junk)
        assert claimed_by(str(tmp_path)) == "", junk


# -- ps and stop ------------------------------------------------------------------------------


def ps_json(capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    """`kernel-sandbox ps --json`, by container name."""
    capsys.readouterr()
    assert main(["ps", "--json", "--direct"]) == 0
    return {row["container"]: row for row in json.loads(capsys.readouterr().out)}


def ps_line(capsys: pytest.CaptureFixture[str], container: str) -> str:
    """The line of `kernel-sandbox ps` (the table) that shows ``container``."""
    capsys.readouterr()
    assert main(["ps", "--direct"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if container in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_ps_shows_pooled_sandboxes_and_stop_ends_a_claimed_one(
    tmp_path, warm_pool, docker_client, leak_check, capsys
):
    me, config = os.getpid(), pool_config(1)  # a trait, as in Jupyter config
    spec = leak_check.spec(make_kernelspec(f"pool-ps-{uuid.uuid4().hex[:6]}"))
    work = tmp_path / "work"
    work.mkdir()
    with sandbox_kernel(spec, config=config, cwd=str(work)) as (first, first_kc):
        # the recipe's first start is cold; then its pool fills
        assert not first.provisioner.container_name.startswith("ks-pool-")
        ready = wait_for(lambda: ready_of(warm_pool, docker_client, spec), "a refill")
        pooled = ready[0].container
        assert pooled.startswith("ks-pool-")
        row = ps_json(capsys)[pooled]
        assert row["pooled"] is True and row["kernel_id"] == ""
        assert row["kernelspec"] == spec and row["owner_pid"] == me
        assert row["state"] == "running" and 0 < row["memory"] < row["memory_limit"]
        assert ps_line(capsys, pooled).split()[0] == "(pooled)"
        assert ps_json(capsys)[first.provisioner.container_name]["kernel_id"] == first.kernel_id

        with sandbox_kernel(spec, config=config, cwd=str(work)) as (second, kc):
            assert second.provisioner.container_name == pooled  # claimed
            assert run_cell(kc, "print(6 * 7)")["stdout"] == "42\n"
            row = ps_json(capsys)[pooled]
            assert row["pooled"] is True and row["kernel_id"] == second.kernel_id
            assert ps_line(capsys, pooled).split()[0] == second.kernel_id
            # stop by a prefix of the kernel id, as for any kernel: its owner shuts it down
            assert main(["stop", "--direct", second.kernel_id[:13]]) == 0
            assert "shut down by its owner" in capsys.readouterr().out
            wait_for(lambda: not second.is_alive(), "the claimed kernel to end", 30)
            assert pooled not in ps_json(capsys)

        # a waiting one can be stopped by its container name; the pool starts another
        refill = wait_for(lambda: ready_of(warm_pool, docker_client, spec), "a refill")
        name = refill[0].container
        assert main(["stop", "--direct", name]) == 0
        assert "not claimed yet; container removed" in capsys.readouterr().out
        again = wait_for(
            lambda: [s for s in waiting_of(docker_client, me, spec) if s.container != name],
            "the pool to replace a stopped sandbox",
        )
        assert again[0].container.startswith("ks-pool-")
        assert run_cell(first_kc, "print('still', 1 + 1)")["stdout"] == "still 2\n"
    warm_pool.close()
    # (only this test's kernelspec: a session fixture's kernel of this process may live on)
    wait_for(
        lambda: not [s for s in sandboxes_of(docker_client, me) if s.kernelspec == spec],
        "the pool to be drained",
        30,
    )


# -- nbclient ---------------------------------------------------------------------------------


def pooled_notebook() -> nbformat.NotebookNode:
    return new_notebook(
        cells=[
            new_code_cell("x = 6 * 7\nassert 'seen' not in globals()\nseen = True"),
            new_code_cell(WHO_RUNS),
            new_code_cell("print(x, open('marker.txt').read())"),  # the notebook's folder
        ]
    )


def execute(nb: nbformat.NotebookNode, kernel: str, folder: Path) -> tuple[list[str], str]:
    """Execute ``nb`` with nbclient as a user would; return the container names its kernel
    ran in (seen after each cell) and its outputs."""
    names: list[str] = []
    client = NotebookClient(
        nb, kernel_name=kernel, timeout=120, resources={"metadata": {"path": str(folder)}}
    )
    client.on_cell_executed = lambda **_: names.append(client.km.provisioner.container_name)
    client.execute()
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    return names, text


def test_nbclient_twice_in_one_process_the_second_from_the_pool(
    tmp_path, warm_pool, docker_client, leak_check
):
    kernel = leak_check.spec(make_kernelspec(f"pool-nb-{uuid.uuid4().hex[:6]}", {"pool_size": 1}))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    (folder / "marker.txt").write_text("next-to-the-notebook")
    names, text = execute(pooled_notebook(), kernel, folder)
    assert len(set(names)) == 1 and not names[0].startswith("ks-pool-")  # cold: a new recipe
    assert COLD in text and "42 next-to-the-notebook" in text
    ready = wait_for(lambda: ready_of(warm_pool, docker_client, kernel), "a refill")

    names, text = execute(pooled_notebook(), kernel, folder)
    assert set(names) == {ready[0].container}  # the one that waited
    assert POOL_WAITER in text and "42 next-to-the-notebook" in text  # same outputs, fresh globals
    # used once: the claimed container is gone, the pool made another
    wait_for(
        lambda: [
            s for s in waiting_of(docker_client, os.getpid(), kernel) if s.container != names[0]
        ],
        "the next refill",
    )
    assert names[0] not in {s.container for s in sandboxes_of(docker_client, os.getpid())}


# -- kernel-sandbox run -------------------------------------------------------------------------


def command() -> list[str]:
    return [sys.executable, "-m", "kernel_sandbox.cli"]


class Watcher(threading.Thread):
    """Records the sandboxes of process ``pid`` while it runs: container -> claiming kernel."""

    def __init__(self, client: docker.DockerClient, pid: int):
        super().__init__(daemon=True)
        self.client, self.pid = client, pid
        self.seen: dict[str, Sandbox] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                for sandbox in sandboxes_of(self.client, self.pid):
                    if sandbox.kernel_id or sandbox.container not in self.seen:
                        self.seen[sandbox.container] = sandbox
            except docker.errors.APIError:
                pass

    def stop(self) -> dict[str, Sandbox]:
        self.done.set()
        self.join()
        return self.seen


def test_kernel_sandbox_run_with_a_pooled_kernelspec(tmp_path, docker_client, leak_check):
    prefix = tmp_path / "prefix"
    name = leak_check.spec(f"pool-run-{uuid.uuid4().hex[:6]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env["JUPYTER_PATH"] = os.pathsep.join([str(prefix / "share" / "jupyter"), env["JUPYTER_PATH"]])
    installed = subprocess.run(
        [*command(), "install", "--name", name, "--pool-size", "2", "--prefix", str(prefix)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert installed.returncode == 0, installed.stderr
    spec = json.loads((prefix / "share/jupyter/kernels" / name / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["pool_size"] == 2

    folder = tmp_path / "nbs"
    folder.mkdir()
    count = 6
    for index in range(count):
        cells = [
            new_code_cell(f"n = {index}\nassert 'seen' not in globals()\nseen = True"),
            new_code_cell(WHO_RUNS),
            # the first wave (cold) runs long enough for the pool to fill behind it
            new_code_cell(
                f"import time\ntime.sleep({6 if index < 2 else 1})\nprint('done', n * n)"
            ),
        ]
        nbformat.write(new_notebook(cells=cells), folder / f"nb{index}.ipynb")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*command(), "run", "--kernel", name, "-j", "2", "--output-dir", str(out), str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watcher = Watcher(docker_client, proc.pid)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        seen = watcher.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr

    texts = {}
    for index in range(count):
        executed = nbformat.read(out / f"nb{index}.ipynb", as_version=4)
        texts[index] = "".join(o.get("text", "") for c in executed.cells for o in c.outputs)
        assert f"done {index * index}" in texts[index]
    from_pool = [i for i, t in texts.items() if POOL_WAITER in t]
    assert len(from_pool) >= 2, texts  # the first two start cold, the pool serves later ones
    assert all(COLD in texts[i] for i in texts if i not in from_pool)
    # on the host: claimed pooled containers, each by one kernel, none twice
    claimed = [s for s in seen.values() if s.pooled and s.kernel_id]
    assert len(claimed) >= 2, seen
    assert all(s.container.startswith("ks-pool-") for s in claimed)
    assert len({s.kernel_id for s in claimed}) == len(claimed)
    # the run's end removed everything, waiting pooled sandboxes included
    assert_nothing_left(proc.pid, "kernel-sandbox run", docker_client)


# -- jupyter execute: a process that exits while its pool refills ----------------------------


def test_jupyter_execute_exits_during_a_refill_quietly_and_leaves_nothing(
    tmp_path, docker_client, leak_check
):
    """One notebook per process: the start is cold and fills a pool the process never uses;
    it exits while a pooled sandbox is being made. That refill stops (the interpreter's
    executors refuse new work) and cleans up: no warning about a failed start, nothing left."""
    kernel = leak_check.spec(make_kernelspec(f"pool-ex-{uuid.uuid4().hex[:6]}", {"pool_size": 2}))
    nbformat.write(new_notebook(cells=[new_code_cell("print(6 * 7)")]), tmp_path / "one.ipynb")
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "execute", "--kernel_name", kernel, "one.ipynb"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        assert "cannot start a pooled sandbox" not in stderr, stderr
        assert_nothing_left(proc.pid, "jupyter execute", docker_client)

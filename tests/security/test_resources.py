"""Resource probes: a fork bomb, a memory bomb and a CPU hog, each measured from the host."""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import time
from pathlib import Path

import docker.errors
from support.kernels import run_cell

CGROUP = Path("/sys/fs/cgroup")
PIDS_LIMIT = 256  # the strict profile's


def cgroup_dir(container_id: str, controller: str) -> Path | None:
    """The container's cgroup directory for ``controller`` (cgroup v1 or v2 layout)."""
    for path in (
        CGROUP / controller / "docker" / container_id,
        CGROUP / "system.slice" / f"docker-{container_id}.scope",
        CGROUP / "docker" / container_id,
    ):
        if path.is_dir():
            return path
    return None


def pids_current(container_id: str) -> int | None:
    group = cgroup_dir(container_id, "pids")
    try:
        return int((group / "pids.current").read_text()) if group else None
    except OSError:  # the container has ended
        return None


def cpu_seconds(container_id: str) -> float:
    """CPU time the host has charged to the container's cgroup so far."""
    group = cgroup_dir(container_id, "cpuacct")
    assert group is not None, f"no cpu cgroup for container {container_id[:12]}"
    if (group / "cpuacct.usage").exists():
        return int((group / "cpuacct.usage").read_text()) / 1e9
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6


def host_pid_count() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def wait_for_reply_or_death(kernel, msg_id: str, timeout: float, sample=None) -> dict | None:
    """The execute reply to ``msg_id``, or None once the kernel is dead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sample is not None:
            sample()
        try:
            msg = kernel.kc.get_shell_msg(timeout=0.25)
        except queue.Empty:
            if not kernel.km.is_alive():
                return None
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
    raise AssertionError(f"the kernel neither answered nor died within {timeout:.0f} s")


FORK_BOMB = r'''
import signal, subprocess, sys, time
BOMB = """
import errno, os, time
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        os.fork()
    except OSError as exc:
        try:
            fd = os.open('/tmp/ks-bomb-errno', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, errno.errorcode.get(exc.errno, str(exc.errno)).encode())
            os.close(fd)
        except OSError:
            pass
        time.sleep(0.01)
os._exit(0)
"""
bomb = subprocess.Popen([sys.executable, '-c', BOMB], start_new_session=True)
peak, started = 0, time.monotonic()
while time.monotonic() - started < 4:
    peak = max(peak, sum(1 for d in _os.listdir('/proc') if d.isdigit()))
    time.sleep(0.2)
for _ in range(3):
    try:
        _os.killpg(bomb.pid, signal.SIGKILL)
    except ProcessLookupError:
        break
    time.sleep(0.2)
bomb.wait()
time.sleep(0.5)
errno_file = '/tmp/ks-bomb-errno'
_bomb = dict(peak=peak,
             first_error=open(errno_file).read() if _os.path.exists(errno_file) else None,
             after=sum(1 for d in _os.listdir('/proc') if d.isdigit()))
'''


def test_fork_bomb_is_stopped_by_the_pids_limit(dedicated_kernel, sandbox, docker_client, observe):
    with dedicated_kernel() as bombed:
        container = bombed.container_id
        host_before = host_pid_count()
        samples: list[tuple[int | None, int, float]] = []

        def sample() -> None:
            started = time.monotonic()
            subprocess.run(["true"], check=True)  # the host can still fork and exec
            samples.append((pids_current(container), host_pid_count(), time.monotonic() - started))

        msg_id = bombed.kc.execute(FORK_BOMB)
        reply = wait_for_reply_or_death(bombed, msg_id, timeout=90, sample=sample)
        if reply is not None:
            assert reply["content"]["status"] == "ok", reply["content"]
            inside = bombed.probe("report(**_bomb)")
            after = bombed.probe("report(answer=6 * 7)")  # the kernel itself survived
            outcome = (
                f"fork failed with {inside['first_error']} at {inside['peak']} "
                f"processes; bomb killed, kernel answered again"
            )
        else:
            state = docker_client.api.inspect_container(container)["State"]
            inside, after = None, None
            outcome = (
                f"the whole sandbox ended (exit {state['ExitCode']}): gVisor's kernel "
                "ran out of host threads at the pids limit"
            )
        neighbour = sandbox.probe("report(answer=6 * 7)")
    cgroup_peak = max((s[0] for s in samples if s[0] is not None), default=None)
    host_growth = max(s[1] for s in samples) - host_before
    slowest = max(s[2] for s in samples)
    observe(
        "res-fork-bomb",
        f"{outcome}; host: cgroup pids peak {cgroup_peak}/{PIDS_LIMIT}, "
        f"host processes +{host_growth}, fork+exec of /bin/true <= {slowest * 1000:.0f} ms; "
        "other kernel answered",
    )
    assert cgroup_peak is not None and cgroup_peak <= PIDS_LIMIT
    assert slowest < 2.0
    assert host_growth <= 2 * PIDS_LIMIT  # loose: other work shares this host
    assert neighbour == {"answer": 42}
    if bombed.runtime == "runc":
        assert inside is not None and after == {"answer": 42}
        assert inside["first_error"] == "EAGAIN"
        assert PIDS_LIMIT - 20 <= inside["peak"] <= PIDS_LIMIT
    elif inside is not None:
        assert inside["first_error"] == "EAGAIN" and after == {"answer": 42}


MEMORY_BOMB = r"""
chunks = []
for _ in range(64):  # up to 4 GiB of touched memory, far past the 1 GiB limit
    chunks.append(b'\xa5' * (64 << 20))
"""


def test_memory_bomb_kills_only_its_kernel(
    dedicated_kernel, sandbox, docker_client, observe, caplog
):
    caplog.set_level(logging.WARNING)
    with dedicated_kernel() as bombed:
        first = bombed.container_id
        started = time.monotonic()
        msg_id = bombed.kc.execute(MEMORY_BOMB)
        reply = wait_for_reply_or_death(bombed, msg_id, timeout=90)
        died_after = time.monotonic() - started
        state = docker_client.api.inspect_container(first)["State"]
        reported = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
        neighbour = sandbox.probe("report(answer=6 * 7)")
        bombed.km.restart_kernel(now=True)
        bombed.kc.wait_for_ready(timeout=60)
        second = bombed.container_id
        restarted = run_cell(bombed.kc, "print(6 * 7)")
    gone = []
    for container in (first, second):
        try:
            docker_client.api.inspect_container(container)
        except docker.errors.NotFound:
            gone.append(container)
    observe(
        "res-memory-bomb",
        f"kernel dead after {died_after:.1f} s (exit {state['ExitCode']}, "
        f'OOMKilled={state["OOMKilled"]}, provisioner logged "killed: out of memory": '
        f"{bool(reported)}); other kernel answered; restart answered "
        f"{restarted['stdout'].strip()}; {len(gone)}/2 containers gone after shutdown",
    )
    assert reply is None, "the memory bomb finished: the limit did not hold"
    assert state["OOMKilled"] is True and state["ExitCode"] != 0
    if bombed.runtime == "runc":  # SIGKILLed by the host's OOM killer (under runsc the whole
        assert state["ExitCode"] == 137  # gVisor sandbox goes, and runsc reports its own code)
    assert reported, "the provisioner did not report the OOM kill"
    assert neighbour == {"answer": 42}
    assert second != first and restarted["stdout"] == "42\n"
    assert gone == [first, second]


def test_cpu_hog_is_held_to_the_cpu_limit(sandbox, observe):
    sandbox.probe(r"""
import subprocess, sys
HOG = 'import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass'
_hogs = [subprocess.Popen([sys.executable, '-c', HOG]) for _ in range(3)]
report(hogs=len(_hogs))
""")
    try:
        time.sleep(1.5)  # let the hogs start and the quota settle
        used, started = cpu_seconds(sandbox.container_id), time.monotonic()
        time.sleep(3)
        cpus = (cpu_seconds(sandbox.container_id) - used) / (time.monotonic() - started)
    finally:
        sandbox.probe("for hog in _hogs: hog.kill(); hog.wait()\nreport(stopped=len(_hogs))")
    observe(
        "res-cpu-hog",
        f"{cpus:.2f} CPUs used over 3 s by 3 busy processes "
        f"(limit 1.0, host has {os.cpu_count()} cores)",
    )
    assert cpus <= 1.15
    assert cpus >= 0.25, "the hogs barely ran: the measurement shows nothing"

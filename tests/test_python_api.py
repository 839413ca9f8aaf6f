"""The Python API (kernel_sandbox.Sandbox, AsyncSandbox): real sandboxed kernels, real engine.

What a developer building an agent relies on: outputs and rich results, errors, timeouts that
interrupt and leave the sandbox usable (or restart a kernel that ignores the interrupt), file
transfer where the policy allows it and a clear refusal where not, isolation between two
sandboxes, the async twin, and no container left once the ``with`` block ends.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import IMAGE, REPO

import kernel_sandbox
from kernel_sandbox import AsyncSandbox, RunResult, Sandbox
from kernel_sandbox.errors import (
    CellError,
    CellTimeout,
    KernelspecError,
    PolicyError,
    SandboxClosed,
    TransferRefused,
)

PNG = (  # a 1x1 image
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)
OWNER = (4242, 4243)  # as root: the rw workspace's owner (no account here), outside uid_range


def containers(docker_client, name: str | None) -> list:
    assert name, "the sandbox had no container name"
    return docker_client.containers.list(all=True, filters={"name": name})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A notebook folder the kernel may write: as root, owned by an account of its own."""
    tmp_path.chmod(0o755)
    folder = tmp_path / "project"
    folder.mkdir()
    if os.getuid() == 0:
        os.chown(folder, *OWNER)
    return folder


# -- arguments (no engine) ----------------------------------------------------------------------


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(PolicyError, match=r"unknown policy key 'memroy_limit'.*memory_limit"):
        Sandbox(memroy_limit="1g")
    with pytest.raises(PolicyError, match="memory_limit"):
        Sandbox(memory_limit="lots")
    with pytest.raises(PolicyError, match="workspace"):
        Sandbox(workspace="sometimes")
    with pytest.raises(PolicyError, match="profile"):
        Sandbox(profile="")
    with pytest.raises(ValueError, match="timeout"):
        Sandbox(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        AsyncSandbox(timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not a folder"):
        Sandbox(cwd=tmp_path / "missing")
    sb = Sandbox()
    with pytest.raises(SandboxClosed, match="start"):
        sb.run("1")
    with pytest.raises(TypeError, match="string"):
        sb.run(b"1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes, str or a file object"):
        sb.upload("a.txt", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absolute"):
        sb.download("/etc/shadow")
    with pytest.raises(ValueError, match="out of the workspace"):
        sb.upload("a/../../b", b"x")
    with pytest.raises(SandboxClosed, match="not started"):
        sb.download("a.txt")
    sb.close()


def test_a_missing_or_unsandboxed_kernelspec_is_named(jupyter_path):
    with pytest.raises(KernelspecError, match=r"no kernelspec 'nope'.*kernel-sandbox install"):
        Sandbox(kernelspec="nope").start()
    with pytest.raises(KernelspecError, match="does not start a sandboxed kernel"):
        Sandbox(kernelspec="python3-local").start()


def test_an_unknown_profile_is_refused_at_start(jupyter_path):
    with pytest.raises(PolicyError, match="nosuchprofile"):
        Sandbox(profile="nosuchprofile").start()


def test_the_operators_ceilings_still_hold(jupyter_path):
    from traitlets.config import Config

    config = Config({"DockerSandboxProvisioner": {"ceilings": {"memory_limit": "1g"}}})
    with pytest.raises(PolicyError, match=r"memory_limit: 2g.*exceeds the operator's ceiling"):
        Sandbox(memory_limit="2g", config=config).start()


def test_importing_the_package_does_not_import_the_api():
    code = (
        "import sys, kernel_sandbox; assert 'kernel_sandbox.api' not in sys.modules; "
        "assert 'jupyter_client' not in sys.modules; kernel_sandbox.Sandbox; "
        "assert 'kernel_sandbox.api' in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_the_public_names():
    import kernel_sandbox.api as api

    assert set(api.__all__) == {"AsyncSandbox", "ExecutionError", "Result", "RunResult", "Sandbox"}
    assert all(getattr(kernel_sandbox, name) is getattr(api, name) for name in api.__all__)


def test_a_result_raises_what_it_holds():
    ok = RunResult(stdout="x")
    assert ok.raise_for_error() is ok and ok.ok and ok.text is None


# -- running code -------------------------------------------------------------------------------


def test_outputs_results_and_errors(jupyter_path, leak_check, docker_client, kernel_image, project):
    with kernel_sandbox.Sandbox(cwd=project) as sb:
        r = sb.run("import sys; print(1); print('warn', file=sys.stderr); 2+2")
        assert (r.stdout, r.stderr, r.text, r.error) == ("1\n", "warn\n", "4", None)
        assert r.ok and r.execution_count == 1 and len(r.results) == 1
        assert r.results[0].is_main_result and r.main_result is r.results[0]

        rich = sb.run(
            "import base64\n"
            "from IPython.display import HTML, JSON, Image, display\n"
            f"display(Image(data=base64.b64decode({PNG!r})))\n"
            "display(HTML('<b>bold</b>'))\n"
            "display(JSON({'a': 1}))\n"
            "'last'"
        )
        assert rich.ok, rich.error
        png, html, js, main = rich.results
        assert png.png is not None and base64.b64decode(png.png) == base64.b64decode(PNG)
        assert "image/png" in png.formats and not png.is_main_result
        assert html.html == "<b>bold</b>" and js.json == {"a": 1}
        assert main.is_main_result and rich.text == "'last'"

        failed = sb.run("x = 1\nprint('before')\n1/0")
        assert failed.stdout == "before\n" and not failed.ok
        assert failed.error is not None
        assert (failed.error.ename, failed.error.evalue) == (
            "ZeroDivisionError",
            "division by zero",
        )
        assert "ZeroDivisionError" in failed.error.traceback_text
        assert "\x1b[" not in failed.error.traceback_text
        with pytest.raises(CellError) as raised:
            failed.raise_for_error()
        assert raised.value.result is failed
        assert sb.run("x + 1").text == "2"  # the state lives on after an error
        name = sb.container_name
        assert sb.is_running and sb.kernel_id
        assert len(containers(docker_client, name)) == 1
    assert not sb.is_running
    assert containers(docker_client, name) == []


def test_a_timeout_interrupts_and_the_sandbox_goes_on(jupyter_path, leak_check, kernel_image):
    with Sandbox(timeout=30) as sb:
        sb.run("kept = 'still here'")
        started = time.monotonic()
        r = sb.run("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=1.5)
        took = time.monotonic() - started
        assert r.timed_out and not r.restarted and r.error is not None
        assert r.error.name == "TimeoutError" and "1.5s" in r.error.value
        assert "KeyboardInterrupt" in r.error.traceback_text  # the kernel's own report
        assert r.stdout == "started\n" and 1.5 <= took < 10, took
        with pytest.raises(CellTimeout) as raised:
            r.raise_for_error()
        assert raised.value.result is r and isinstance(raised.value, TimeoutError)
        # the interrupted cell is over: the next one runs, with the kernel's state intact
        after = sb.run("kept")
        assert after.ok and after.text == "'still here'"


def test_code_that_ignores_the_interrupt_gets_a_new_kernel(jupyter_path, leak_check, kernel_image):
    with Sandbox(interrupt_grace=2) as sb:
        sb.run("kept = 1")
        first = sb.container_name
        r = sb.run(
            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(120)",
            timeout=1,
        )
        assert r.timed_out and r.restarted
        assert r.error is not None and "restarted" in r.error.value
        again = sb.run("'kept' in dir()")
        assert again.ok and again.text == "False"  # a fresh kernel
        assert sb.container_name != first


def test_a_kernel_out_of_memory_is_reported_and_can_restart(jupyter_path, leak_check, kernel_image):
    with Sandbox(memory_limit="96m") as sb:
        r = sb.run("hog = b'x' * (512 * 1024 * 1024)", timeout=60)
        assert r.error is not None and not r.timed_out
        assert r.error.name in ("KernelOutOfMemory", "KernelDied"), r.error
        assert "memory" in r.error.value
        with pytest.raises(SandboxClosed, match="restart"):
            sb.run("1")
        sb.restart()
        assert sb.run("1 + 1").text == "2"


# -- files --------------------------------------------------------------------------------------


def test_upload_and_download_with_a_read_write_workspace(
    jupyter_path, leak_check, kernel_image, project
):
    big = os.urandom(9 * 1024 * 1024 + 17)  # more than two transfer chunks
    names = "[n for n in dir() if not n.startswith('_')]"
    with Sandbox(profile="analyst", cwd=project) as sb:
        fresh = sb.run(names).text
        sb.upload("in/data.csv", "a,b\n1,2\n")
        sb.upload("in/big.bin", big)
        assert (project / "in" / "data.csv").read_text() == "a,b\n1,2\n"
        assert (project / "in" / "big.bin").read_bytes() == big
        if os.getuid() == 0:  # written by the kernel, as the folder's owner
            info = (project / "in" / "data.csv").stat()
            assert (info.st_uid, info.st_gid) == OWNER
        r = sb.run("print(open('in/data.csv').read(), end='')")
        assert r.stdout == "a,b\n1,2\n"
        sb.run("open('out.txt', 'w').write('from the kernel')").raise_for_error()
        assert sb.download("out.txt") == b"from the kernel"
        assert sb.download("in/big.bin") == big
        assert sb.download("in/../out.txt") == b"from the kernel"
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            sb.download("missing.txt")
        with pytest.raises(ValueError, match="absolute"):
            sb.upload("/etc/passwd", b"x")
        with pytest.raises(ValueError, match="out of the workspace"):
            sb.download("../secret")
        # the transfers left no trace in the user's namespace nor in the history
        assert sb.run(names).text == fresh
        assert sb.run("1").execution_count == 5  # four runs before: transfers do not count


def test_a_read_only_workspace_refuses_uploads_and_allows_downloads(
    jupyter_path, leak_check, kernel_image, project
):
    (project / "notes.txt").write_text("course notes")
    (project / "notes.txt").chmod(0o644)
    with Sandbox(profile="strict", cwd=project) as sb:
        with pytest.raises(TransferRefused, match=r"read-only.*workspace 'ro'.*workspace='rw'"):
            sb.upload("new.txt", b"x")
        assert sb.download("notes.txt") == b"course notes"
        # the kernel cannot write there either: the refusal is the policy, not the API's taste
        r = sb.run("open('new.txt', 'w')")
        assert r.error is not None and "Read-only file system" in r.error.value
    assert not (project / "new.txt").exists()


def test_no_workspace_refuses_both(jupyter_path, leak_check, kernel_image, project):
    with Sandbox(profile="untrusted", cwd=project) as sb:
        assert sb.policy.workspace == "none" and sb.profile == "untrusted"
        for attempt in (lambda: sb.upload("a.txt", b"x"), lambda: sb.download("a.txt")):
            with pytest.raises(TransferRefused, match="no workspace.*'none'.*untrusted"):
                attempt()


# -- isolation, lifecycle, async -------------------------------------------------------------


def test_two_sandboxes_are_isolated_and_each_leaves_nothing(
    jupyter_path, leak_check, docker_client, kernel_image
):
    with Sandbox() as one, Sandbox() as two:
        assert one.container_name != two.container_name
        assert len(containers(docker_client, one.container_name)) == 1
        one.run("secret = 42; open('/tmp/mine', 'w').write('one')").raise_for_error()
        seen = two.run("import os; print('secret' in dir(), os.path.exists('/tmp/mine'))")
        assert seen.stdout == "False False\n"
        assert two.run("secret").error.name == "NameError"  # type: ignore[union-attr]
        names = (one.container_name, two.container_name)
    for name in names:
        assert containers(docker_client, name) == []  # removed when the block ended


def test_leaving_the_block_on_an_error_removes_the_container(
    jupyter_path, leak_check, docker_client, kernel_image
):
    with pytest.raises(RuntimeError, match="boom"):
        with Sandbox() as sb:
            name = sb.container_name
            raise RuntimeError("boom")
    assert containers(docker_client, name) == []
    sb.close()  # idempotent


def test_the_async_twin(jupyter_path, leak_check, docker_client, kernel_image, project):
    async def main() -> tuple[list[RunResult], list[str | None]]:
        async with AsyncSandbox() as one, AsyncSandbox(profile="analyst", cwd=project) as two:
            names = [one.container_name, two.container_name]
            slow = "import time; time.sleep(1); print('done')"
            started = time.monotonic()
            results = await asyncio.gather(one.run(slow), two.run(slow))
            assert time.monotonic() - started < 1.9  # side by side, not one after the other
            await two.upload("a.txt", b"async")
            assert await two.download("a.txt") == b"async"
            timed = await one.run("import time; time.sleep(30)", timeout=1)
            assert timed.timed_out and (await one.run("1")).text == "1"
            return results, names

    results, names = asyncio.run(main())
    assert [r.stdout for r in results] == ["done\n", "done\n"]
    for name in names:
        assert containers(docker_client, name) == []


def test_a_sandbox_works_from_inside_a_running_event_loop(jupyter_path, leak_check, kernel_image):
    async def agent_step() -> str | None:
        # a blocking Sandbox called from async code (a framework's sync tool) must not deadlock
        with Sandbox() as sb:
            return sb.run("6 * 7").text

    assert asyncio.run(agent_step()) == "42"


def test_policy_keywords_reach_the_container(jupyter_path, leak_check, docker_client, kernel_image):
    with Sandbox(memory_limit="300m", env={"KS_API": "yes"}, image=IMAGE) as sb:
        attrs = docker_client.api.inspect_container(sb.container_name)
        assert attrs["HostConfig"]["Memory"] == 300 * 1024 * 1024
        assert sb.run("import os; os.environ['KS_API']").text == "'yes'"
        assert sb.policy.memory_limit == 300 * 1024 * 1024


def test_kernelspec_overrides_are_laid_over_its_config(
    jupyter_path, leak_check, kernel_image, project
):
    from support.kernels import make_kernelspec

    name = make_kernelspec(f"api-{uuid.uuid4().hex[:6]}", {"profile": "ci"})
    with Sandbox(kernelspec=name) as sb:  # the kernelspec's profile when none is given
        assert sb.profile == "ci" and sb.run("import os; os.environ['TZ']").text == "'UTC'"
    with Sandbox("educator", kernelspec=name, cwd=project) as sb:  # the argument wins
        assert sb.profile == "educator" and sb.policy.memory_limit == 512 * 1024 * 1024

"""The operator's policy file wins over what a user's kernelspec asks, through the service,
with real accounts: ceilings, allowed profiles, live kernel count and memory total, each
refusal naming the rule (issue 15)."""

from __future__ import annotations

import json
import textwrap
import uuid

import pytest

pytestmark = pytest.mark.integration

# As a test account: start N sandboxed kernels of KERNELSPEC, print each outcome as JSON,
# then shut the started ones down.
STARTS = """
import json
import jupyter_client
managers, outcomes = [], []
for _ in range({count}):
    km = jupyter_client.KernelManager(kernel_name={spec!r})
    try:
        km.start_kernel()
        kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
        out = []
        hook = lambda m: out.append(m["content"].get("text", ""))
        kc.execute_interactive({code!r}, timeout=60, output_hook=hook)
        kc.stop_channels()
        managers.append(km)
        outcomes.append({{"ok": True, "output": "".join(out)}})
    except Exception as exc:
        outcomes.append({{"ok": False, "type": type(exc).__name__, "error": str(exc)}})
for km in managers:
    km.shutdown_kernel(now=True)
print(json.dumps(outcomes))
"""


def user_kernelspec(users, config: dict) -> str:
    """A kernelspec only the test accounts' Jupyter sees, asking for ``config``."""
    name = f"svc-{uuid.uuid4().hex[:6]}"
    folder = users.base / "jupyter" / "kernels" / name
    folder.mkdir(parents=True)
    spec = {
        "argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "docker-sandbox", "config": config}
        },
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    folder.chmod(0o755)
    (folder / "kernel.json").chmod(0o644)
    return name


def starts(users, service, user: str, spec: str, count: int, code: str = "1") -> list[dict]:
    result = users.run_as(
        user,
        STARTS.format(count=count, spec=spec, code=code),
        env={"KERNEL_SANDBOX_SERVICE": service.socket},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def policy(sandbox_service):
    """Write the operator's policy file for one test; the empty (default) one after."""
    yield sandbox_service.write_policy
    sandbox_service.write_policy("")


def test_the_operators_ceiling_wins_over_a_users_kernelspec(sandbox_service, test_users, policy):
    policy(
        textwrap.dedent(
            """
            [user.kstcarol]
            memory_limit = "256m"
            """
        )
    )
    asks_more = user_kernelspec(test_users, {"memory_limit": "1g"})
    [outcome] = starts(test_users, sandbox_service, "kstcarol", asks_more, 1)
    assert not outcome["ok"]
    assert outcome["type"] == "ServiceRefused", outcome
    assert "[user.kstcarol] memory_limit" in outcome["error"], outcome
    # what a profile chose is lowered to the ceiling instead: the kernel starts capped
    plain = user_kernelspec(test_users, {"profile": "analyst"})  # analyst: 4g
    code = "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read())"
    [outcome] = starts(test_users, sandbox_service, "kstcarol", plain, 1, code)
    assert outcome["ok"], outcome
    assert int(outcome["output"]) == 256 * 1024**2, outcome
    assert sandbox_service.records() == []  # shut down: nothing left


def test_a_profile_the_operator_did_not_grant_is_refused(sandbox_service, test_users, policy):
    policy(
        textwrap.dedent(
            """
            [everyone]
            profiles = ["strict", "educator"]
            """
        )
    )
    spec = user_kernelspec(test_users, {"profile": "analyst"})
    [outcome] = starts(test_users, sandbox_service, "kstcarol", spec, 1)
    assert outcome["type"] == "ServiceRefused", outcome
    assert "profiles" in outcome["error"] and "analyst" in outcome["error"], outcome


def test_live_kernel_count_and_memory_total_per_user(sandbox_service, test_users, policy):
    policy(
        textwrap.dedent(
            """
            [user.kstcarol]
            max_kernels = 2
            max_memory = "1g"
            """
        )
    )
    small = user_kernelspec(test_users, {"memory_limit": "256m"})
    outcomes = starts(test_users, sandbox_service, "kstcarol", small, 3)
    assert [o["ok"] for o in outcomes] == [True, True, False], outcomes
    assert "max_kernels = 2" in outcomes[2]["error"], outcomes[2]
    assert "kstcarol" in outcomes[2]["error"]
    # another user is not counted against carol
    assert all(o["ok"] for o in starts(test_users, sandbox_service, "kstbob", small, 1))
    big = user_kernelspec(test_users, {"memory_limit": "768m"})
    outcomes = starts(test_users, sandbox_service, "kstcarol", big, 2)
    assert [o["ok"] for o in outcomes] == [True, False], outcomes
    assert "max_memory" in outcomes[1]["error"], outcomes[1]

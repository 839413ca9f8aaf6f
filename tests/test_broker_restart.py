"""Token records outlive the broker: the owner process (and its broker) dies, a new one adopts.

A separate process starts a kernel with a dataset and is killed with SIGKILL, taking its
in-process broker with it. This process adopts the kernel as a restarted Jupyter Server does
(``load_provisioner_info``): its own broker serves the kernel's socket again, and the token
the dead broker minted still works, because the record is in SQLite. A revocation made
then (from the CLI, another process) holds too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from support.kernels import make_kernelspec, run_cell
from test_broker import TRY, broker_config

from kernel_sandbox.broker.tokens import TokenStore

pytestmark = pytest.mark.integration

OWNER = textwrap.dedent("""
    import asyncio, json, sys
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    config = Config({"DockerSandboxProvisioner": {
        "orphan_timeout": 120.0, "token_db": sys.argv[2], "audit_log": sys.argv[3]}})
    km = KernelManager(kernel_name=sys.argv[1], config=config)
    km.start_kernel()
    km.client().wait_for_ready(timeout=60)
    print(json.dumps(asyncio.run(km.provisioner.get_provisioner_info())), flush=True)
    sys.stdin.read()  # until killed
""")

LS = TRY + 'print(json.dumps(attempt(lambda: data.ls("sales"))))'


def test_an_adopted_kernel_keeps_its_token_across_a_broker_restart(
    tmp_path: Path, leak_check
) -> None:
    sales = tmp_path / "sales"
    sales.mkdir()
    (sales / "q1.csv").write_text("a,b\n")
    os.chmod(tmp_path, 0o755)
    state = tmp_path / "state"
    name = make_kernelspec("data-adopt", {"datasets": {"sales": f"{sales}:read"}})
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            OWNER,
            name,
            str(state / "tokens.sqlite"),
            str(state / "audit.jsonl"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        line = owner.stdout.readline()
        assert line, "the owner process did not start its kernel"
        info = json.loads(line)
    finally:
        owner.send_signal(signal.SIGKILL)  # the owner and its broker die without cleanup
        owner.wait()
        owner.stdin.close()
        owner.stdout.close()

    km = KernelManager(kernel_name=name, kernel_id=info["kernel_id"], config=broker_config(state))
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km
    )
    asyncio.run(provisioner.load_provisioner_info(info))
    km.provisioner = provisioner
    km.load_connection_info(provisioner.connection_info)
    kc = km.client()
    kc.start_channels()
    db = str(state / "tokens.sqlite")
    try:
        kc.wait_for_ready(timeout=30)
        first = run_cell(kc, LS)
        assert json.loads(first["stdout"]) == ["ok", ["sales/q1.csv"]], first
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "kernel_sandbox.cli",
                "tokens",
                "revoke",
                info["kernel_id"],
                "--db",
                db,
            ],
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(run_cell(kc, LS)["stdout"]) == ["TokenRevoked", "token revoked"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    records = [
        r for r in TokenStore(db).records(include_dead=True) if r.kernel_id == info["kernel_id"]
    ]
    assert len(records) == 1 and records[0].reason == "revoked by user"

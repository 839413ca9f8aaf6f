"""fs-audit-log: the kernel tries to reach the host-side audit, and to forge records in it.

The audit log (``kernel-sandbox audit``) is written by the provisioner's process from what
clients send through the host's shell relay. The kernel looks for it everywhere it can see,
then sends messages of its own on its shell socket: an ``execute_request`` (toward the client,
as if one had been sent) and an ``execute_reply`` to a request nobody made. The host checks
that the forged messages did reach the client through the relay, that none became a record,
that the probe cell itself is recorded with its exact code, and that the chain verifies.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import KernelManager
from test_containment import runtime_kernel
from traitlets.config import Config

from kernel_sandbox.audit.show import rows
from kernel_sandbox.audit.verify import verify_chain

from .battery import PRELUDE, parse_report

FORGED = "KS-FORGED-REQUEST"
FORGED_PARENT = "KS-FORGED-PARENT"

PROBE = r"""
import os
found, seen = [], 0
for top in ('/',):
    for folder, dirs, files in os.walk(top):
        if folder.startswith(('/proc', '/sys', '/dev', '/usr', '/lib')):
            dirs[:] = []
            continue
        for name in files:
            seen += 1
            if name.lstrip('.').startswith(('audit.jsonl', 'egress.jsonl', 'tokens.sqlite')):
                found.append(os.path.join(folder, name))
mounts = [line.split()[4] for line in open('/proc/self/mountinfo')]
k = get_ipython().kernel
ident = k._parent_ident['shell']
k.session.send(k.shell_stream, 'execute_request', {'code': FORGED, 'silent': False}, ident=ident)
k.session.send(k.shell_stream, 'execute_reply', {'status': 'ok', 'execution_count': 1},
               parent={'msg_id': FORGED_PARENT, 'msg_type': 'execute_request'}, ident=ident)
report(found=found[:20], seen=seen, mounts=mounts)
"""


def test_fs_audit_log(runtime, observe, jupyter_path, kernel_image):
    """fs-audit-log: see the module docstring."""
    folder = Path(tempfile.mkdtemp(prefix="ks-audit-"))
    log = folder / "state" / "audit.jsonl"
    config = Config({"DockerSandboxProvisioner": {"audit_log": str(log)}})
    km = KernelManager(kernel_name=runtime_kernel(runtime), config=config)
    km.start_kernel(cwd=tempfile.mkdtemp(prefix="ks-audit-cwd-"))
    kc = km.client()
    kc.start_channels()
    code = PRELUDE + f"FORGED, FORGED_PARENT = {FORGED!r}, {FORGED_PARENT!r}\n" + PROBE
    try:
        kc.wait_for_ready(timeout=120)
        msg_id = kc.execute(code)
        arrived, reply, deadline = [], None, time.monotonic() + 120
        while reply is None:
            assert time.monotonic() < deadline, "no reply to the probe cell"
            msg = kc.get_shell_msg(timeout=120)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
                reply = msg
            else:
                arrived.append(msg)
        stdout = ""
        while True:
            out = kc.get_iopub_msg(timeout=60)
            if out["parent_header"].get("msg_id") != msg_id:
                continue
            if out["msg_type"] == "stream" and out["content"]["name"] == "stdout":
                stdout += out["content"]["text"]
            if out["msg_type"] == "status" and out["content"]["execution_state"] == "idle":
                break
        assert reply["content"]["status"] == "ok", reply["content"]
        seen = parse_report(stdout)
        container = km.provisioner.container_id
        kernel_id = km.kernel_id
        mounts = [
            m["Source"]
            for m in km.provisioner.engine.client.api.inspect_container(container)["Mounts"]
        ]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    forged_types = sorted(m["msg_type"] for m in arrived)
    assert forged_types == ["execute_reply", "execute_request"]  # they did pass the relay
    records = rows([log])
    mine = [r for r in records if r["event"] == "execute" and r["kernel_id"] == kernel_id]
    assert [r["code_sha256"] for r in mine] == [hashlib.sha256(code.encode()).hexdigest()]
    others = json.dumps([r for r in records if r is not mine[0]])
    assert FORGED not in others and FORGED_PARENT not in others
    assert mine[0]["status"] == "ok"
    report = verify_chain(log)
    assert report.intact, report.broken
    assert seen["found"] == [], seen["found"]
    assert not any(str(folder) in m for m in mounts + seen["mounts"])
    observe(
        "fs-audit-log",
        f"no audit file among {seen['seen']} files visible inside; forged request and reply "
        f"reached the client but made no record; the cell's request recorded (code hash "
        f"matches, status ok); chain intact ({report.records} records)",
    )

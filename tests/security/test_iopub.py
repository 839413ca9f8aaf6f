"""IOPub flood: what a kernel can make its owner process buffer (kernel_sandbox.host.relay).

The client stays idle (it waits on the shell channel only), as a Jupyter Server does for a tab
that is gone or slow: with clients connected straight to the kernel's PUB socket, libzmq
queued every complete message in the owner's process, whatever its size.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

MiB = 1024**2
COPIES, SIZE = 10, 200 * MiB
# The owner may grow by less than one flood message: the relay never holds one.
BOUND = 128 * MiB
WINDOW = {"runc": 10.0, "runsc": 25.0}  # seconds the flood may take to arrive

FLOOD = f"""
from comm import create_comm
_buffer = memoryview(bytearray({SIZE}))
_comm = create_comm(target_name="ks-flood")
for _i in range({COPIES}):
    _comm.send({{"copy": _i}}, buffers=[_buffer])  # one buffer, sent 10 times without copies
"""


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def counted(notices: list[str]) -> int:
    """How many dropped outputs the notices tell of."""
    return sum(
        int(m.group(1)) if (m := re.match(r"kernel-sandbox: (\d+) outputs", n)) else 1
        for n in notices
    )


def test_iopub_flood_is_bounded_with_a_notice(dedicated_kernel, observe):
    with dedicated_kernel() as flooded:
        kc = flooded.kc
        while kc.iopub_channel.msg_ready():  # start from an empty client queue
            kc.get_iopub_msg(timeout=1)
        before = rss()
        msg_id = kc.execute(FLOOD)
        deadline = time.monotonic() + 120
        while True:  # idle on IOPub: only the shell reply is read
            reply = kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        peak = rss()
        settle = time.monotonic() + WINDOW[flooded.runtime]
        while time.monotonic() < settle:
            peak = max(peak, rss())
            time.sleep(0.1)
        grown = peak - before
        # now read what arrived: the notices under this cell (or, unbounded, the flood itself)
        notices, arrived = [], 0
        while counted(notices) + arrived < COPIES:
            try:
                msg = kc.get_iopub_msg(timeout=30)
            except Exception:  # queue.Empty
                break
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "comm_msg":
                arrived += 1
            elif msg["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                notices.append(msg["content"]["text"])
        after = flooded.probe("report(answer=6 * 7)")
    print(f"owner grew by {grown / MiB:.0f} MiB; notices: {notices}")
    observe(
        "res-iopub-flood",
        f"owner RSS +{grown / MiB:.0f} MiB for {COPIES} x {SIZE // MiB} MiB published; "
        f"{arrived} reached the client; notice: {notices[0].strip() if notices else 'none'!r}"
        f"{' (+ a summary)' if len(notices) > 1 else ''}; kernel answered afterwards: "
        f"{after == {'answer': 42}}",
    )
    assert grown < BOUND, f"the owner grew by {grown / MiB:.0f} MiB"
    assert arrived == 0
    assert notices, "no drop notice in the cell's output"
    assert notices[0] == (
        "kernel-sandbox: an output of 200 MiB was dropped (limit 64 MiB, "
        "c.DockerSandboxProvisioner.iopub_max_message)\n"
    )
    assert counted(notices) == COPIES  # every drop noticed, the later ones summed up
    assert after == {"answer": 42}

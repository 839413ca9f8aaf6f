"""A jupyter_client driven line by line, for tests that run it as a test account and kill
things around it (the service, the client itself).

Run as a script (``python service_client.py [adopt FILE]``): it starts a sandboxed kernel with
jupyter_client (through the service ``KERNEL_SANDBOX_SERVICE`` names), or with ``adopt FILE``
rebuilds its manager from the provisioner info a previous client saved there (as a restarted
Jupyter Server does), prints one JSON line ``{"ready": kernel_id, "pid": ...}`` and then
answers one JSON line per command read from stdin:

- ``exec CODE``: run a cell; ``{"output": stdout+errors, "status": ...}``
- ``reply CODE``: run a cell, waiting for its execute reply only (not for its output, which
  comes through the IOPub relay); ``{"status": ...}``
- ``send CODE``: send an execute request, not waiting; ``{"sent": msg_id}``
- ``wait MSG_ID``: wait for that request's execute reply; ``{"status": ...}``
- ``sync``: wait until IOPub delivers again; ``{"synced": seconds}``
- ``alive``: ``{"alive": km.is_alive()}`` (the provisioner's poll, through the service)
- ``restart``: ``km.restart_kernel()`` and wait for the kernel; ``{"restarted": true}``
- ``save FILE``: write the provisioner info to FILE; ``{"saved": FILE}``
- ``shutdown``: shut the kernel down and end; ``{"down": true}``

An exception becomes ``{"error": ...}`` and the loop goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import jupyter_client
from jupyter_client.provisioning import KernelProvisionerFactory

SPEC = "python3-sandbox"


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def run_cell(kc: Any, code: str) -> dict[str, Any]:
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append(f"ERROR {msg['content']['ename']}: {msg['content']['evalue']}")

    reply = kc.execute_interactive(code, timeout=60, output_hook=hook)
    return {"output": "".join(out), "status": reply["content"]["status"]}


def iopub_back(kc: Any, timeout: float = 60) -> float:
    """Seconds until IOPub delivers again (a kernel_info's status), as a client that
    reconnected checks before it runs a cell: what is published while no relay or
    subscriber is there is lost."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        msg_id = kc.kernel_info()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                msg = kc.get_iopub_msg(timeout=0.1)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return time.monotonic() - began
    raise TimeoutError(f"IOPub silent for {timeout} s")


def adopted_manager(path: str) -> jupyter_client.KernelManager:
    info = json.loads(open(path).read())
    km = jupyter_client.KernelManager(kernel_name=SPEC, kernel_id=info["kernel_id"])
    provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km.kernel_spec, parent=km
    )
    asyncio.run(provisioner.load_provisioner_info(info))
    km.provisioner = provisioner
    km.load_connection_info(provisioner.connection_info)
    return km


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "adopt":
        km = adopted_manager(sys.argv[2])
    else:
        km = jupyter_client.KernelManager(kernel_name=SPEC)
        km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    say(ready=km.kernel_id, pid=os.getpid())
    for line in sys.stdin:
        command, _, argument = line.rstrip("\n").partition(" ")
        try:
            if command == "exec":
                say(**run_cell(kc, argument))
            elif command == "reply":
                msg_id = kc.execute(argument)
                while (reply := kc.get_shell_msg(timeout=60))["parent_header"].get(
                    "msg_id"
                ) != msg_id:
                    pass
                say(status=reply["content"]["status"])
            elif command == "send":
                say(sent=kc.execute(argument))
            elif command == "wait":
                while (reply := kc.get_shell_msg(timeout=90))["parent_header"].get(
                    "msg_id"
                ) != argument:
                    pass
                say(status=reply["content"]["status"])
            elif command == "sync":
                say(synced=iopub_back(kc))
            elif command == "alive":
                say(alive=km.is_alive())
            elif command == "restart":
                km.restart_kernel(now=True)
                kc.wait_for_ready(timeout=60)
                say(restarted=True)
            elif command == "save":
                info = asyncio.run(km.provisioner.get_provisioner_info())  # type: ignore[union-attr]
                with open(argument, "w") as handle:
                    json.dump(info, handle)
                say(saved=argument)
            elif command == "shutdown":
                kc.stop_channels()
                km.shutdown_kernel(now=True)
                say(down=True)
                return
            else:
                say(error=f"unknown command {command!r}")
        except Exception as exc:
            say(error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()

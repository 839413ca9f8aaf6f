"""A locked-down Jupyter Server for tests, and what each test asks of what it starts: is this
kernel or terminal in a sandbox (hostname, uid, network interfaces, no docker socket)?"""

from __future__ import annotations

import json
import re
import time
import uuid

import docker
import websocket

from support.servers import Server, execute

ENABLE = "--ServerApp.jpserver_extensions={'kernel_sandbox.lockdown': True}"
REFUSE = "--SandboxLockdown.on_unsandboxed=refuse"
TERMINALS_OFF = "--SandboxLockdown.terminals=off"

# What a kernel prints about where it runs; a host kernel prints this machine's facts. A
# sandbox run by root gets a uid of its own from uid_range (2000000-2065535 by default).
FACTS = (
    "import os, socket\n"
    "uid = os.getuid()\n"
    "print('FACTS', socket.gethostname(), 'own-uid' if uid >= 2000000 else uid, "
    "','.join(sorted(os.listdir("
    "'/sys/class/net'))), os.environ.get('KERNEL_SANDBOX'), os.path.exists("
    "'/var/run/docker.sock'))"
)
SANDBOXED_FACTS = "FACTS sandbox own-uid lo 1 False"

# The same, asked of a shell in a terminal (interfaces from /proc/net/dev: gVisor has no
# /sys/class/net); the root must be read-only.
SHELL_FACTS = (
    "echo FACTS $(hostname) $(test $(id -u) -ge 2000000 && echo own-uid || id -u) "
    "$(sed -n 's/^ *\\([^:]*\\):.*/\\1/p' /proc/net/dev | tr '\\n' ,) "
    "$(test -e /var/run/docker.sock && echo sock || echo nosock) "
    "$(touch /probe 2>/dev/null && echo rw || echo ro) END"
)
SANDBOXED_SHELL = "FACTS sandbox own-uid lo, nosock ro END"
SHELL_FACTS_LINE = r"FACTS [\w.-]+ [\w-]+ [\w,-]* \w+ \w+ END"


def kernel_facts(server: Server, kernel_id: str) -> str:
    """The FACTS line of a kernel of ``server`` (run through the channels websocket)."""
    ws = server.channels(kernel_id)
    try:
        result = execute(ws, FACTS)
    finally:
        ws.close()
    assert result["reply"]["status"] == "ok", result
    return result["stdout"].strip()


def terminal_run(server: Server, name: str, command: str, until: str, timeout: float = 60) -> str:
    """Type ``command`` into terminal ``name`` over its websocket; return the output up to and
    including the first match of the regular expression ``until`` (which must not match the
    command's own echo)."""
    url = server.url.replace("http://", "ws://") + f"/terminals/websocket/{name}"
    ws = websocket.create_connection(
        url, header=[f"Authorization: token {server.token}"], timeout=2
    )
    try:
        ws.send(json.dumps(["set_size", 40, 400]))
        ws.send(json.dumps(["stdin", command + "\r"]))
        out, deadline = "", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = json.loads(ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                break
            if message[0] == "stdout":
                out += message[1]
            found = re.search(until, out)
            if found:
                return out[: found.end()]
            if message[0] == "disconnect":
                break
        raise AssertionError(f"terminal {name}: no {until!r} in:\n{out[-2000:]}")
    finally:
        ws.close()


def sandbox_containers(client: docker.DockerClient, owner_pid: int) -> list[str]:
    """Names of the sandbox containers (kernels and terminals, running or not) of a server."""
    labels = ["io.kernel-sandbox.managed=true", f"io.kernel-sandbox.owner-pid={owner_pid}"]
    # one listing call: containers.list() inspects each one after listing, and fails when
    # a container goes in between (the very thing these tests wait for)
    listed = client.api.containers(all=True, filters={"label": labels})
    return sorted(c["Names"][0].lstrip("/") for c in listed)


def new_path() -> str:
    return f"nb-{uuid.uuid4().hex[:8]}.ipynb"


def terminal_screen(server: Server, name: str, timeout: float = 3) -> str:
    """What terminal ``name`` has shown lately: terminado replays its recent output to every
    client that connects (so a test can read what a browser's terminal displays)."""
    url = server.url.replace("http://", "ws://") + f"/terminals/websocket/{name}"
    ws = websocket.create_connection(
        url, header=[f"Authorization: token {server.token}"], timeout=timeout
    )
    out, deadline = "", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                message = json.loads(ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if message[0] == "stdout":
                out += message[1]
    finally:
        ws.close()
    return out

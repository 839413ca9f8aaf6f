"""Runs INSIDE a pooled sandbox: import the kernel ahead of time, then become it when claimed.

``python -m kernel_sandbox.inside.pool_waiter CLAIM_SOCKET MODULE``

A warm pool (:mod:`kernel_sandbox.host.pool`) starts sandboxes before anyone needs them. Each
runs this waiter, which imports ``MODULE`` (the kernel, e.g. ``ipykernel_launcher``: the
200 ms of a Python kernel's start-up that are only imports), connects to the owner's claim
socket (host-served, read-only inside) and says it is ready. Nothing secret exists yet: no key,
no token, no session. When a kernel start claims the sandbox, the owner has just written the
connection file and sends one JSON line ``{"argv": [...], "env": {...}}``; the waiter sets the
environment and runs ``MODULE`` as ``__main__`` with that argv, in this process (the imports
are done). A sandbox is claimed once: the socket is closed before the kernel runs. Standard
library only until the claim (and the kernel's own imports).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import socket
import sys
import time

READY = b"ready\n"
MAX_CLAIM = 1024 * 1024  # the claim is argv and environment: far below this
CONNECT_FOR = 60.0  # seconds to reach the claim socket (the owner made it before the start)

# What a kernel's start imports after the module itself: done ahead of the claim too.
WARM_IMPORTS = {
    "ipykernel_launcher": (
        "ipykernel.kernelapp",
        "ipykernel.ipkernel",
        "ipykernel.zmqshell",
        "ipykernel.comm",
        "IPython.core.interactiveshell",
        "IPython.core.completer",
        "IPython.core.history",
        "jupyter_client.session",
        "kernel_sandbox.inside.hints",
        # imported while the kernel app initializes (measured with the default image)
        "ipykernel.debugger",
        "IPython.extensions",
        "sqlite3",
        "pdb",
        "psutil",
        "faulthandler",
        "unicodedata",
        "tornado.gen",
        "tornado.locks",
        "tornado.queues",
        # and after it binds its sockets (the shell, default extensions, debugger hooks, the
        # event loop): bench/pool.py measured 30 ms less per claim with these ahead too
        "IPython.core.completerlib",
        "IPython.core.debugger",
        "IPython.core.logger",
        "IPython.core.magics.packaging",
        "IPython.core.oinspect",
        "IPython.extensions.storemagic",
        "IPython.utils.wildcard",
        "kernel_sandbox.inside.iopub",
        "tornado.platform.asyncio",
    ),
}


def _warm(module: str) -> None:
    for name in (module, *WARM_IMPORTS.get(module.split(".")[0], ())):
        try:
            importlib.import_module(name)
        except Exception:  # an image without it: the kernel imports what it needs itself
            pass


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + CONNECT_FOR
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read_claim(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the owner closed the claim socket without a claim")
        data += chunk
        if len(data) > MAX_CLAIM:
            raise ValueError("claim too large")
    claim = json.loads(data)
    if not isinstance(claim, dict) or not isinstance(claim.get("argv"), list):
        raise ValueError("malformed claim")
    return claim


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(
            "usage: python -m kernel_sandbox.inside.pool_waiter CLAIM_SOCKET MODULE",
            file=sys.stderr,
        )
        return 2
    path, module = argv
    _warm(module)
    sock = _connect(path)
    try:
        sock.sendall(READY)
        claim = _read_claim(sock)
    except (OSError, EOFError, ValueError) as exc:
        # drained, or an owner gone: a pooled sandbox that was never claimed just ends
        print(f"kernel-sandbox: pooled sandbox not claimed: {exc}", file=sys.stderr)
        return 0
    finally:
        sock.close()
    env = claim.get("env") or {}
    os.environ.update({str(k): str(v) for k, v in env.items()})
    if claim.get("cwd"):
        os.chdir(claim["cwd"])
    sys.argv = [module, *map(str, claim["argv"])]
    sys.path[0] = os.getcwd()  # as `python -m` sets it
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

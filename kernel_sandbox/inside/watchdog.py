"""Runs INSIDE the sandbox: start the kernel, and end it when its host side has vanished.

``python -m kernel_sandbox.inside.watchdog LIFELINE GRACE -- KERNEL ARGV...``

The host process that owns the kernel listens on the unix socket LIFELINE (in the runtime
directory). This watchdog stays connected to it; when the connection breaks (the owner was
killed) it keeps trying to reconnect for GRACE seconds, so that a Jupyter Server that restarts
and re-adopts its kernels keeps them, and otherwise terminates the kernel, so an orphaned
container never runs on indefinitely. Standard library only: it runs in the kernel image.
"""

from __future__ import annotations

# Only what the interpreter has loaded anyway comes before the kernel is spawned: the kernel's
# start is what a user waits for, and socket/threading would add 25-30 ms in front of it.
import os
import signal
import sys

RECONNECT_EVERY = 1.0
TERMINATE_WAIT = 3.0
# What Python's own startup ignores, back to the default for the kernel (as subprocess does).
RESTORED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)


def _connect(path: str):
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _wait_for_break(sock) -> None:
    """Block until the owner's end of the lifeline closes."""
    try:
        while sock.recv(64):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def watch(lifeline: str, grace: float, kernel: int, ended) -> None:
    """Keep the lifeline; terminate ``kernel`` once it has been broken for ``grace`` seconds."""
    import time

    sock = _connect(lifeline)
    while True:
        if sock is not None:
            _wait_for_break(sock)
        deadline = time.monotonic() + grace
        sock = None
        while sock is None and time.monotonic() < deadline:
            time.sleep(RECONNECT_EVERY)
            sock = _connect(lifeline)
        if sock is None:
            print(
                f"kernel-sandbox: host side gone for {grace:.0f}s; ending the kernel",
                file=sys.stderr,
                flush=True,
            )
            _signal(kernel, signal.SIGTERM)
            if not ended.wait(TERMINATE_WAIT):
                _signal(kernel, signal.SIGKILL)
            return


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(
            "usage: python -m kernel_sandbox.inside.watchdog LIFELINE GRACE -- ARGV...",
            file=sys.stderr,
        )
        return 2
    lifeline, grace, command = argv[0], float(argv[1]), argv[3:]
    kernel = os.posix_spawnp(command[0], command, os.environ, setsigdef=RESTORED_SIGNALS)
    import threading

    # Interrupts reach the whole process group (the kernel too); the watchdog ignores them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: _signal(kernel, signal.SIGTERM))
    ended = threading.Event()
    threading.Thread(target=watch, args=(lifeline, grace, kernel, ended), daemon=True).start()
    _, status = os.waitpid(kernel, 0)
    ended.set()
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

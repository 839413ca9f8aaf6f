"""Who owns a sandbox: the host process, recorded so orphans can be told from live kernels.

A kernel's owner is the process running its KernelManager (a Jupyter Server, an nbclient
run). It is recorded as host name, pid and the pid's start time (so a reused pid is not
mistaken for the owner) in the host-only part of the runtime directory (and in the
container's labels): what the reaper decides from, since the kernel can change neither. The
owner also serves the kernel's lifeline, a unix socket in the host-served part (read-only
inside, so the kernel cannot replace it with one of its own) that the in-sandbox watchdog stays
connected to. When the owner dies the lifeline breaks and the watchdog ends the kernel after a
grace period.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from kernel_sandbox.inside.contract import LIFELINE

__all__ = ["Lifeline", "Owner"]

OWNER_FILE = "owner.json"


def process_start_time(pid: int) -> str | None:
    """The pid's start time in clock ticks since boot, or None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str | None

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start_time(os.getpid()))

    def is_alive(self) -> bool | None:
        """True or False for an owner on this host; None when it lives on another host."""
        if self.host != socket.gethostname():
            return None
        return self.start is not None and process_start_time(self.pid) == self.start

    def save(self, runtime_dir: Path) -> None:
        (runtime_dir / OWNER_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, runtime_dir: Path) -> Owner | None:
        try:
            return cls(**json.loads((runtime_dir / OWNER_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


class Lifeline:
    """The owner's end of the lifeline: a listening unix socket in the runtime directory."""

    def __init__(self, host_dir: Path):
        """``host_dir`` is the host-served ``h/`` (read-only inside) of a runtime dir."""
        self.path = host_dir / LIFELINE
        self._listener: socket.socket | None = None
        self._peers: list[socket.socket] = []

    def listen(self) -> None:
        """Serve the lifeline (again, after a restart of the owner); idempotent."""
        if self._listener is not None:
            return
        # Bound in the host-only directory, made connectable, then renamed into place: a
        # chmod by path never runs where anything but us could have put an entry.
        staging = self.path.parent.parent / f".{LIFELINE}.tmp"
        staging.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(staging))
        os.chmod(staging, 0o666)  # the directory (0700, kernel's uid) is the real guard
        os.rename(staging, self.path)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener

    def accept_pending(self) -> None:
        """Accept watchdogs that connected, so the backlog never fills over many restarts."""
        while self._listener is not None:
            try:
                peer, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            self._peers.append(peer)

    def drop_peers(self) -> None:
        """Close the connections of previous containers (they are gone after a restart)."""
        for peer in self._peers:
            peer.close()
        self._peers.clear()

    def close(self) -> None:
        self.drop_peers()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:  # only our socket: whatever else is there (a runtime dir of an older layout,
            # where the kernel could plant a directory) is left for the directory's removal
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except OSError:
            pass

"""Who is asking: the caller of the sandbox service, taken from the socket, never from a request.

The kernel tells the service the peer's uid, gid and pid (``SO_PEERCRED``) as they were when it
connected; the user name, home and groups come from the host's account database for that uid.
Nothing a request says about its sender is ever used.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field

__all__ = ["Caller", "peer_caller"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Caller:
    """A local account asking the service for something, as the kernel vouches for it."""

    uid: int
    gid: int
    pid: int
    name: str
    home: str
    groups: frozenset[str] = field(default_factory=frozenset)  # names, the primary one included
    gids: frozenset[int] = field(default_factory=frozenset)  # ids, the primary one included

    @classmethod
    def for_uid(cls, uid: int, gid: int, pid: int = 0) -> Caller:
        """The caller with ``uid`` (and primary ``gid``), its name, home and groups looked up.

        A uid without an account gets its number as name, ``/nonexistent`` as home and no
        group but its primary one.
        """
        try:
            account = pwd.getpwuid(uid)
            name, home = account.pw_name, account.pw_dir
            gids = set(os.getgrouplist(name, gid))
        except KeyError:
            name, home, gids = str(uid), "/nonexistent", {gid}
        gids.add(gid)
        names = set()
        for number in gids:
            try:
                names.add(grp.getgrgid(number).gr_name)
            except KeyError:
                names.add(str(number))
        return cls(uid, gid, pid, name, home, frozenset(names), frozenset(gids))

    @property
    def owner(self) -> tuple[int, int]:
        return (self.uid, self.gid)

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid})"


def peer_caller(sock: socket.socket) -> Caller:
    """The caller at the other end of a connected unix socket, from ``SO_PEERCRED``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Caller.for_uid(uid, gid, pid)

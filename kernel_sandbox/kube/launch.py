"""What runs first in a pod that uses its owner's services (the egress proxy, the data broker):
variables made from the Secret's files, links, and relays from unix sockets in the pod to the
owner's TCP ports, then the kernel.

A container reaches those services through unix sockets in its runtime directory; the image's
code (the notice extension, ``kernel_sandbox.data``) looks for them there. In a pod the same
paths are served by relays this launcher forks: each accepted unix connection is carried to
``host:port`` on the pod network (after a preamble line read from a Secret file, where the
service wants one). Standard library only (any image with a Python runs it); the spec is
JSON in the pod's command, so it must never hold a secret: secrets are named by their file
in the Secret's mount.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Launch", "Relay"]

_LAUNCH = r"""
import json, os, socket, sys, threading
a = sys.argv
i = a.index("--")
spec = json.loads(a[1])
def read(path):
    with open(path) as f:
        return f.read().strip()
for name, (template, path) in spec["secret_env"].items():
    os.environ[name] = template.replace("{secret}", read(path))
os.environ.update(spec["env"])
for link, target in spec["links"].items():
    os.symlink(target, link)
relays = []
for r in spec["relays"]:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(r["path"])
    srv.listen(16)
    pre = (read(r["preamble"]) + "\n").encode() if r["preamble"] else b""
    relays.append((srv, r["host"], r["port"], pre))
parent = os.getpid()
if relays and os.fork() == 0:
    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    def carry(conn, host, port, pre):
        try:
            up = socket.create_connection((host, port), timeout=10)
            up.settimeout(None)
            up.sendall(pre)
        except OSError:
            conn.close()
            return
        other = threading.Thread(target=pump, args=(conn, up), daemon=True)
        other.start()
        pump(up, conn)
        other.join()
        conn.close()
        up.close()
    def accept(srv, host, port, pre):
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=carry, args=(conn, host, port, pre), daemon=True).start()
    for relay in relays:
        threading.Thread(target=accept, args=relay, daemon=True).start()
    while os.getppid() == parent:
        threading.Event().wait(2)
    os._exit(0)
for relay in relays:
    relay[0].close()
os.execvp(a[i + 1], a[i + 1:])
"""


@dataclass(frozen=True)
class Relay:
    """A unix socket at ``path`` in the pod, carried to ``host:port`` (``preamble``: a
    Secret file whose content is sent first, as a line)."""

    path: str
    host: str
    port: int
    preamble: str = ""


@dataclass
class Launch:
    """What the launcher sets up before the kernel (merged from each service)."""

    env: dict[str, str] = field(default_factory=dict)
    # NAME -> (template with {secret}, Secret file): the value is made in the pod
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    relays: list[Relay] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.env or self.secret_env or self.links or self.relays)

    def extend(self, other: Launch) -> Launch:
        """This and ``other`` (another service's), merged in place."""
        self.env.update(other.env)
        self.secret_env.update(other.secret_env)
        self.links.update(other.links)
        self.relays.extend(other.relays)
        return self

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started by the launcher (unchanged when there is nothing to set up)."""
        if not self:
            return list(argv)
        spec = {
            "env": self.env,
            "secret_env": {k: list(v) for k, v in self.secret_env.items()},
            "links": self.links,
            "relays": [r.__dict__ for r in self.relays],
        }
        return ["python", "-c", _LAUNCH, json.dumps(spec, sort_keys=True), "--", *argv]

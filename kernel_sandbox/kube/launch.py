"""What runs first in a pod that uses its owner's services (the egress proxy, the data broker):
variables made from the Secret's files, links, and relays from sockets in the pod to the
owner's TCP ports (over TLS to a pinned certificate), then the kernel.

A container reaches those services through unix sockets in its runtime directory; the image's
code (the notice extension, ``kernel_sandbox.data``) looks for them there. In a pod the same
paths (and the proxy's loopback port, as on Docker) are served by relays this launcher forks:
each accepted connection is carried to ``host:port`` on the pod network, over TLS to the one
certificate whose SHA-256 a Secret file holds, after a preamble line read from a Secret
file where the service wants one. Standard library only (any image with a Python runs it);
the spec is JSON in the pod's command, so it must never hold a secret: secrets are named by
their file in the Secret's mount.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Launch", "Relay"]

_LAUNCH = r"""
import json, os, socket, sys
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
    if r["path"].startswith("/"):
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(r["path"])
        srv.listen(128)
    else:  # HOST:PORT in the pod (its own loopback)
        address, _, number = r["path"].rpartition(":")
        srv = socket.create_server((address, int(number)), backlog=128)
    pre = (read(r["preamble"]) + "\n").encode() if r["preamble"] else b""
    relays.append((srv, r["host"], r["port"], pre, read(r["pin"]) if r["pin"] else ""))
parent = os.getpid()
if relays and os.fork() == 0:
    import asyncio, hashlib, ssl
    async def pump(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except Exception:
            writer.close()
    async def carry(host, port, pre, pin, reader, writer):
        tls = None
        if pin:  # TLS to a certificate known only by its SHA-256 (from the Secret)
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        try:
            opened = asyncio.open_connection(host, port, ssl=tls)
            up_reader, up_writer = await asyncio.wait_for(opened, 10)
            if pin:
                der = up_writer.get_extra_info("ssl_object").getpeercert(True)
                if hashlib.sha256(der).hexdigest() != pin:
                    up_writer.close()
                    raise OSError("not the pinned certificate")
            up_writer.write(pre)
        except Exception:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        up_writer.close()
        writer.close()
    async def serve():
        for srv, *args in relays:
            await asyncio.start_server(lambda r, w, args=args: carry(*args, r, w), sock=srv)
        while os.getppid() == parent:
            await asyncio.sleep(2)
    asyncio.run(serve())
    os._exit(0)
for relay in relays:
    relay[0].close()
os.execvp(a[i + 1], a[i + 1:])
"""


@dataclass(frozen=True)
class Relay:
    """A unix socket at ``path`` in the pod (or ``HOST:PORT``, a TCP listener there),
    carried to ``host:port`` (``preamble``: a
    Secret file whose content is sent first, as a line; ``pin``: a Secret file holding the
    SHA-256 of the server's certificate, which makes the connection TLS to that one
    certificate)."""

    path: str
    host: str
    port: int
    preamble: str = ""
    pin: str = ""


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

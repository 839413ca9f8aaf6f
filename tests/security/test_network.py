"""Network probes. Every target is a listener this test starts on this machine, on the Docker
bridge gateway address or on 127.0.0.1; name lookups use only `.test` names."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.kernels import bridge_gateway

from security.battery import REFUSED


@dataclass
class Listener:
    host: str
    port: int
    tcp: socket.socket
    udp: socket.socket

    def heard(self) -> list[str]:
        """What reached the listener (connections, datagrams); nothing, if the sandbox held."""
        time.sleep(0.3)  # anything in flight has arrived by now
        heard = []
        for sock, take in ((self.tcp, self.tcp.accept), (self.udp, self.udp.recvfrom)):
            sock.setblocking(False)
            while True:
                try:
                    got = take(4096) if sock is self.udp else take()
                except BlockingIOError:
                    break
                heard.append(repr(got[1]))
                if sock is self.tcp:
                    got[0].close()
        return heard


@pytest.fixture(params=["gateway", "loopback"])
def listener(request: pytest.FixtureRequest) -> Iterator[Listener]:
    """A TCP and a UDP listener on the same port of one of this machine's own addresses."""
    host = bridge_gateway() if request.param == "gateway" else "127.0.0.1"
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind((host, 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind((host, tcp.getsockname()[1]))
    except OSError:
        udp.bind((host, 0))
    try:
        yield Listener(host, tcp.getsockname()[1], tcp, udp)
    finally:
        tcp.close()
        udp.close()


def kind(listener: Listener) -> str:
    return "loopback" if listener.host == "127.0.0.1" else "gateway"


def test_tcp_to_host_listener(sandbox, listener, observe):
    got = sandbox.probe(f"""
import socket
s = socket.socket(); s.settimeout(3)
report(connect=attempt(s.connect, ({listener.host!r}, {listener.port})))
s.close()
""")
    heard = listener.heard()
    observe(
        f"net-tcp-{kind(listener)}",
        f"connect: {got['connect']}; host listener: " + (", ".join(heard) or "nothing"),
    )
    assert got["connect"] != "ok"
    assert heard == []
    # the gateway is unroutable; 127.0.0.1 is the container's own, empty loopback
    if kind(listener) == "loopback":
        assert got["connect"] == "ECONNREFUSED"
    else:  # runc's kernel says "network", gVisor's netstack "host" unreachable
        assert got["connect"] in ("ENETUNREACH", "EHOSTUNREACH")


def test_udp_to_host_listener(sandbox, listener, observe):
    got = sandbox.probe(f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = [attempt(s.sendto, b'ks-probe', ({listener.host!r}, {listener.port})) for _ in range(3)]
s.close()
report(send=sent[0], sends=sent)
""")
    heard = listener.heard()
    observe(
        f"net-udp-{kind(listener)}",
        f"sendto: {got['send']}; host listener: " + (", ".join(heard) or "nothing"),
    )
    assert heard == []
    if kind(listener) == "gateway":
        assert got["send"] in ("ENETUNREACH", "EHOSTUNREACH")


def test_raw_ip_socket(sandbox, observe):
    got = sandbox.probe("""
import socket
report(icmp=attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
       raw=attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
""")
    observe("net-raw", f"IPPROTO_ICMP: {got['icmp']}; IPPROTO_RAW: {got['raw']}")
    assert got["icmp"] in REFUSED and got["raw"] in REFUSED


def test_packet_socket(sandbox, observe):
    got = sandbox.probe("""
import socket
report(packet=attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)),
       dgram=attempt(socket.socket, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3)))
""")
    observe("net-packet", f"SOCK_RAW: {got['packet']}; SOCK_DGRAM: {got['dgram']}")
    assert got["packet"] in REFUSED and got["dgram"] in REFUSED


def test_name_resolution_has_nowhere_to_go(sandbox, observe):
    got = sandbox.probe("""
import socket, time
conf = open('/etc/resolv.conf').read()
started = time.monotonic()
try:
    socket.getaddrinfo('ks-probe.test', 80)
    resolved = 'resolved'
except socket.gaierror as exc:
    resolved = f'gaierror {exc.errno}: {exc.strerror}'
routes = [line.split() for line in open('/proc/net/route').read().splitlines()[1:] if line.strip()]
report(write=attempt(lambda: open('/etc/resolv.conf', 'a').close()),
       nameservers=[l.split()[1] for l in conf.splitlines() if l.startswith('nameserver')],
       resolved=resolved, seconds=round(time.monotonic() - started, 2),
       interfaces=sorted(_os.listdir('/sys/class/net')), routes=len(routes))
""")
    observe(
        "net-dns",
        f"resolv.conf write: {got['write']}, nameservers "
        f"{', '.join(got['nameservers'])}; getaddrinfo: {got['resolved']} in "
        f"{got['seconds']} s; interfaces {got['interfaces']}, {got['routes']} routes",
    )
    assert got["write"] in ("EROFS", "EACCES")
    assert got["nameservers"] == ["127.0.0.1"]  # not the host's resolver
    assert got["resolved"].startswith("gaierror")
    assert got["interfaces"] == ["lo"] and got["routes"] == 0

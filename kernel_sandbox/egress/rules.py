"""The egress decision: which targets a kernel may reach. Pure data and functions, no I/O.

A rule is a host pattern with an optional port, written in a policy's ``egress`` list::

    api.corp.test          exactly this name, ports 80 and 443
    *.corp.test            any name below corp.test (not corp.test itself), ports 80 and 443
    data.corp.test:8443    this name, port 8443 only
    mirror.corp.test:*     this name, any port
    10.1.2.3:8080          this address (IP literals match only when listed like this)
    [fd00::5]:443          an IPv6 address

What users paste is taken too: a URL stands for its host and port, ``https://api.corp.test/v1``
for ``api.corp.test:443``, ``http://...`` for port 80, a port in the URL kept, the path ignored
(:func:`parse_rule`, :func:`parse_target`). Every place that reads egress hosts (the policy's
``egress``, ``install --egress``, the service's rules, ``egress approve``) parses them here.

Names are compared in lower case without a trailing dot. Anything that is not a plain DNS
name or a canonical IP literal (``0x7f.1``, ``2130706433``, ``a.test@b.test``, ``%``-escapes,
non-ASCII) is refused before any rule is looked at, so the name that is checked is the name
that is resolved and connected to.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from kernel_sandbox.errors import TargetError  # defined there, kept here

__all__ = [
    "DEFAULT_PORTS",
    "Decision",
    "Rule",
    "Target",
    "TargetError",
    "address_is_public",
    "decide",
    "parse_address",
    "parse_authority",
    "parse_host_map",
    "parse_rule",
    "parse_target",
]

DEFAULT_PORTS = (80, 443)
URL_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")

# Rule names, as they appear in the decision log.
NOT_LISTED = "not-listed"
IP_LITERAL = "ip-literal"
BAD_TARGET = "bad-target"


@dataclass(frozen=True)
class Target:
    """Where a request wants to go: a normalised host (name or IP literal) and a port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        return _ip(self.host) is not None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Rule:
    """One allowlist entry: ``host`` is a name, ``*.suffix`` or an IP literal; port None = any."""

    host: str
    ports: tuple[int, ...] | None = DEFAULT_PORTS

    def matches(self, target: Target) -> bool:
        if self.ports is not None and target.port not in self.ports:
            return False
        if self.host.startswith("*."):
            return not target.is_ip and target.host.endswith(self.host[1:])
        return target.host == self.host

    def covers(self, other: Rule) -> bool:
        """Whether every target ``other`` matches is matched by this rule too (the sandbox
        service checks a kernelspec's patterns against the operator's this way)."""
        if self.ports is not None and (other.ports is None or set(other.ports) - set(self.ports)):
            return False
        if not self.host.startswith("*."):
            return other.host == self.host
        if other.host.startswith("*."):
            return other.host[1:].endswith(self.host[1:])
        return _ip(other.host) is None and other.host.endswith(self.host[1:])

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.ports is None:
            return f"{host}:*"
        if self.ports == DEFAULT_PORTS:
            return host
        return f"{host}:{self.ports[0]}"


@dataclass(frozen=True)
class Decision:
    """The verdict on one target, and the rule that gave it (for the log and the message)."""

    allowed: bool
    rule: str
    reason: str = ""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalize_host(raw: str) -> str:
    """A DNS name in lower case or a canonical IP literal; anything else raises TargetError."""
    if raw.startswith("[") and raw.endswith("]"):
        ip = _ip(raw[1:-1])
        if not isinstance(ip, ipaddress.IPv6Address) or "%" in raw:
            raise TargetError(f"{raw!r} is not an IPv6 address")
        return str(ip)
    if not raw.isascii():
        raise TargetError(f"{raw!r} is not an ASCII host name")
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    ip = _ip(host)
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address):
            raise TargetError(f"{raw!r}: an IPv6 address must be written in brackets")
        if str(ip) != host:  # leading zeros and the like
            raise TargetError(f"{raw!r} is not a canonical IP address")
        return host
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise TargetError(f"{raw!r} is not a valid host name")
    # "2130706433", "0x7f.1", "127.1" are addresses to inet_aton: never treat them as names
    last = labels[-1]
    if last.isdigit() or re.fullmatch(r"0x[0-9a-f]*", last):
        raise TargetError(f"{raw!r} looks like a numeric address, not a host name")
    return host


def _parse_port(text: str, what: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise TargetError(f"{what}: {text!r} is not a port number (1-65535)")
    return int(text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError(f"{text!r}: unclosed '['")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise TargetError(f"{text!r}: unexpected text after the address")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:
        raise TargetError(f"{text!r}: write IPv6 addresses in brackets, e.g. [fd00::1]:443")
    host, sep, port = text.partition(":")
    return host, port if sep else None


def _pasted(text: str) -> tuple[str, int | None]:
    """``host[:port]`` and the URL scheme's port from what a user pasted: a URL (its path,
    query and fragment dropped) or ``host[:port][/path]``. Credentials are refused."""
    text = pasted = text.strip()
    scheme_port = None
    match = _SCHEME.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme not in URL_PORTS:
            raise TargetError(
                f"{text!r}: only http:// and https:// URLs name a host and port; "
                "write host:port for others"
            )
        scheme_port = URL_PORTS[scheme]
        text = text[match.end() :]
    authority = re.split(r"[/?#]", text, maxsplit=1)[0]
    if "@" in authority:
        raise TargetError(f"{pasted!r}: credentials do not belong in an egress target")
    if not authority:
        raise TargetError(f"{pasted!r} names no host")
    return authority, scheme_port


def parse_target(text: str) -> Target:
    """One target a person names (``egress approve``): ``host:port``, or a URL (its scheme
    gives the port when it has none).

    Raises:
        TargetError: a bad name or port, or no port.
    """
    if not isinstance(text, str) or not text.strip():
        raise TargetError(f"expected host:port or a URL, got {text!r}")
    authority, scheme_port = _pasted(text)
    return parse_authority(authority, scheme_port)


def parse_authority(text: str, default_port: int | None = None) -> Target:
    """Parse ``host[:port]`` from a CONNECT line, a URL or a Host header.

    Raises:
        TargetError: userinfo, escapes, a bad name or port, or no port where one is needed.
    """
    if any(c in text for c in "@%/\\?#") or any(c.isspace() for c in text) or not text:
        raise TargetError(f"{text!r} is not a plain host[:port]")
    host, port = _split_host_port(text)
    if port is None:
        if default_port is None:
            raise TargetError(f"{text!r} has no port")
        number = default_port
    else:
        number = _parse_port(port, text)
    return Target(normalize_host(host), number)


def parse_rule(text: str) -> Rule:
    """Parse one allowlist pattern (see the module docstring).

    Raises:
        TargetError: the pattern is malformed, or it would allow every host.
    """
    if not isinstance(text, str) or not text.strip():
        raise TargetError(f"expected a host pattern such as 'api.corp.test', got {text!r}")
    text = text.strip()
    authority, scheme_port = _pasted(text)
    host, port = _split_host_port(authority)
    ports: tuple[int, ...] | None
    if port is None:
        ports = DEFAULT_PORTS if scheme_port is None else (scheme_port,)
    elif port == "*":
        ports = None
    else:
        ports = (_parse_port(port, text),)
    if host.startswith("*."):
        suffix = normalize_host(host[2:])
        if _ip(suffix) is not None or "." not in suffix:
            raise TargetError(
                f"{text!r}: a wildcard needs a domain with at least two labels, "
                "e.g. '*.corp.test' (a bare '*' or '*.test' would open too much)"
            )
        return Rule("*." + suffix, ports)
    if host == "*":
        raise TargetError(f"{text!r} would allow every host; name the hosts or domains")
    if "*" in host:
        raise TargetError(f"{text!r}: '*' is only allowed as the first label ('*.corp.test')")
    return Rule(normalize_host(host), ports)


def parse_address(text: str) -> str:
    """An IP address for ``egress_hosts``, in canonical form.

    Raises:
        TargetError: not an IP address.
    """
    ip = _ip(str(text).strip().strip("[]"))
    if ip is None:
        raise TargetError(f"{text!r} is not an IP address")
    return str(ip)


def parse_host_map(values: dict[str, str]) -> dict[str, str]:
    """Validate ``egress_hosts`` (name -> address), like lines of a hosts file."""
    out: dict[str, str] = {}
    for name, address in values.items():
        host = normalize_host(str(name))
        if _ip(host) is not None:
            raise TargetError(f"{name!r}: egress_hosts maps names, not addresses")
        out[host] = parse_address(address)
    return out


def address_is_public(address: str) -> bool:
    """Whether an address found through DNS may be connected to (no loopback, private, ...)."""
    ip = _ip(address)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def decide(target: Target, rules: tuple[Rule, ...]) -> Decision:
    """Allowed if a rule matches; IP literals only through a rule naming that address."""
    for rule in rules:
        if rule.matches(target):
            return Decision(True, f"allow {rule}")
    if target.is_ip:
        reason = "IP addresses are refused unless the allowlist names them"
        return Decision(False, IP_LITERAL, reason)
    return Decision(False, NOT_LISTED, "not in this kernel's allowlist")

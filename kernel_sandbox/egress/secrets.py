"""Secrets by domain: which host gets which credential, read where, and applied how.

A policy's ``egress_secrets`` maps a host pattern (as in ``egress``) to ``SOURCE[:HOW]``::

    api.model.test      env:MODEL_API_KEY              Authorization: Bearer <value> (default)
    api.corp.test:8443  file:/home/me/.corp-key:header:X-Api-Key
    files.corp.test     keyring:corp-files/me:basic    the value is "user:password"
    maps.test           env:MAPS_KEY:query:key         ?key=<value> added to the URL

The policy holds only these references; the value is read by the host-side proxy
(:mod:`.intercept`), never by anything the sandbox can reach. This module is pure apart from
:meth:`SecretSource.read`: parsing, the headers a kernel may not send to such a host, and the
:class:`Masker` that keeps the value out of what the kernel reads back.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass
from typing import Any

from kernel_sandbox.egress.rules import Rule, Target, parse_rule
from kernel_sandbox.errors import CredentialsError, TargetError

__all__ = [
    "HOWS",
    "SOURCES",
    "Application",
    "Masker",
    "SecretSource",
    "SecretSpec",
    "parse_secret",
    "parse_secret_item",
    "strip_credentials",
]

SOURCES = ("env", "file", "keyring")
HOWS = ("bearer", "basic", "header", "query")
MAX_SECRET = 16 * 1024
MASK = b"*"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_PARAM = re.compile(r"[A-Za-z0-9_.~-]+")
# Header names a kernel may not send to a host that has a secret: they carry credentials.
_CREDENTIAL_HEADER = re.compile(
    r"auth|token|secret|passw|credential|api-?key|apikey|cookie|session|signature", re.I
)
_HINT = (
    "expected SOURCE[:HOW] with SOURCE env:NAME, file:/ABSOLUTE/PATH or keyring:SERVICE/USER "
    "and HOW bearer (default), basic, header:NAME or query:NAME"
)


@dataclass(frozen=True)
class SecretSource:
    """Where on the host the value is: ``env:NAME``, ``file:PATH``, ``keyring:SERVICE/USER``."""

    kind: str
    ref: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"

    def read(self) -> str:
        """The value, read now (in the proxy process, on the host).

        Raises:
            CredentialsError: unset, missing, unsafe (a file others may read) or malformed.
        """
        if self.kind == "env":
            value = os.environ.get(self.ref)
            if value is None:
                raise CredentialsError(
                    f"egress secret {self}: the variable {self.ref} is not set in the "
                    "environment of the Jupyter Server (which starts the egress proxy)"
                )
        elif self.kind == "file":
            value = _read_owner_file(self.ref, str(self))
        else:
            value = _read_keyring(self.ref, str(self))
        value = value.strip()
        if not value or len(value) > MAX_SECRET or not all(32 <= ord(c) < 127 for c in value):
            raise CredentialsError(
                f"egress secret {self}: the value is empty, over {MAX_SECRET} characters, or "
                "not one line of printable ASCII (not shown here)"
            )
        return value


def _read_owner_file(path: str, what: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise CredentialsError(f"egress secret {what}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"egress secret {what}: not a regular file")
        if info.st_uid != os.geteuid() or mode & 0o077:
            raise CredentialsError(
                f"egress secret {what}: it must be yours and readable by you only (it is "
                f"uid {info.st_uid}, mode {mode:04o}); run `chmod 600 {path}`"
            )
        data = os.read(fd, MAX_SECRET + 2)
    finally:
        os.close(fd)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CredentialsError(f"egress secret {what}: the file is not ASCII text") from None


def _read_keyring(ref: str, what: str) -> str:
    service, _, user = ref.rpartition("/")
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        raise CredentialsError(
            f"egress secret {what}: the keyring package is not installed where the Jupyter "
            "Server runs (`pip install keyring`)"
        ) from None
    try:
        value = keyring.get_password(service, user)
    except KeyringError as exc:
        raise CredentialsError(f"egress secret {what}: the keyring refused: {exc}") from None
    if value is None:
        raise CredentialsError(
            f"egress secret {what}: no password for service {service!r}, user {user!r} in the "
            f"keyring (`keyring set {service} {user}`)"
        )
    return str(value)


@dataclass(frozen=True)
class Application:
    """How the value is applied: ``bearer``, ``basic``, ``header:NAME`` or ``query:NAME``."""

    how: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.how}:{self.name}" if self.name else self.how

    def headers(self, value: str) -> list[tuple[bytes, bytes]]:
        if self.how == "bearer":
            return [(b"authorization", b"Bearer " + value.encode())]
        if self.how == "basic":
            return [(b"authorization", b"Basic " + base64.b64encode(value.encode()))]
        if self.how == "header":
            return [(self.name.lower().encode(), value.encode())]
        return []

    def path(self, path: bytes, value: str | None) -> bytes:
        """``path`` without the kernel's own ``NAME=`` parameter, and with the real one."""
        if self.how != "query":
            return path
        base, sep, query = path.partition(b"?")
        kept = [
            p
            for p in query.split(b"&")
            if p and urllib.parse.unquote_to_bytes(p.partition(b"=")[0]) != self.name.encode()
        ]
        if value is not None:
            kept.append(self.name.encode() + b"=" + urllib.parse.quote(value, safe="").encode())
        return base + (b"?" + b"&".join(kept) if kept else b"")

    def forms(self, value: str) -> list[bytes]:
        """The shapes the value may come back in, to be masked in responses."""
        raw = value.encode()
        found = {
            raw,
            urllib.parse.quote(value, safe="").encode(),
            urllib.parse.quote_plus(value).encode(),
            value.replace("/", "\\/").encode(),  # JSON may escape "/"
            base64.b64encode(raw),
        }
        if self.how == "basic":
            found.add(base64.b64encode(raw).rstrip(b"="))
        return sorted(f for f in found if len(f) >= 4)


@dataclass(frozen=True)
class SecretSpec:
    """One ``egress_secrets`` entry: the hosts it is for, its source and its application."""

    rule: Rule
    source: SecretSource
    apply: Application

    @property
    def value_text(self) -> str:
        """The policy's form of the value: ``SOURCE:HOW`` (never the secret itself)."""
        return f"{self.source}:{self.apply}"

    def matches(self, target: Target) -> bool:
        return self.rule.matches(target)


def parse_secret(pattern: str, value: Any) -> SecretSpec:
    """Parse one ``egress_secrets`` entry.

    Raises:
        TargetError: a bad host pattern, or an unknown source or application. The value is
            never quoted back (it might be a secret pasted by mistake).
    """
    rule = parse_rule(pattern)
    if Target(rule.host, 1).is_ip:
        raise TargetError(f"{pattern!r}: a secret is for a host name, not an address")
    if not isinstance(value, str):
        raise TargetError(f"{pattern}: {_HINT}")
    kind, sep, rest = value.partition(":")
    if kind not in SOURCES or not sep or not rest:
        raise TargetError(f"{pattern}: {_HINT} (the value given is not shown)")
    parts = rest.split(":")
    apply = Application("bearer")
    if parts[-1] in ("bearer", "basic"):
        apply, parts = Application(parts[-1]), parts[:-1]
    elif len(parts) >= 3 and parts[-2] in ("header", "query"):
        apply, parts = Application(parts[-2], parts[-1]), parts[:-2]
        check = _TOKEN if apply.how == "header" else _PARAM
        if not check.fullmatch(apply.name):
            raise TargetError(f"{pattern}: {apply.how}:{apply.name!r} is not a valid name")
        if apply.how == "header" and apply.name.lower() in ("host", "content-length", "cookie"):
            raise TargetError(f"{pattern}: the credential cannot go in the {apply.name} header")
    ref = ":".join(parts)
    if kind == "env" and not _NAME.fullmatch(ref):
        raise TargetError(f"{pattern}: env:{ref!r} is not a variable name")
    if kind == "file" and not os.path.isabs(ref):
        raise TargetError(f"{pattern}: file:{ref!r} must be an absolute path")
    if kind == "keyring" and not re.fullmatch(r"[^/\s]+(?:/[^/\s]+)*/[^/\s]+", ref):
        raise TargetError(f"{pattern}: keyring:{ref!r} must be SERVICE/USER")
    return SecretSpec(rule, SecretSource(kind, ref), apply)


def parse_secret_item(item: str) -> tuple[str, str]:
    """``HOST=SOURCE[:HOW]`` (the install flag) as (pattern, value)."""
    pattern, sep, value = item.partition("=")
    if not sep or not pattern or not value:
        raise TargetError(f"--egress-secret: expected HOST=SOURCE[:HOW]; {_HINT}")
    return pattern, value


def strip_credentials(
    headers: list[tuple[bytes, bytes]], apply: Application
) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """The headers without the credential-shaped ones (and the one the secret goes in), and
    the names dropped (for the log)."""
    own = apply.name.lower().encode() if apply.how == "header" else b""
    kept, dropped = [], []
    for name, value in headers:
        text = name.decode("latin-1")
        if name == own or _CREDENTIAL_HEADER.search(text):
            dropped.append(text)
        else:
            kept.append((name, value))
    return kept, dropped


class Masker:
    """Replaces every form of a secret in a byte stream by ``*`` of the same length.

    The same length keeps ``Content-Length`` right. Up to ``longest - 1`` bytes are held back
    between chunks, so a value split across two chunks is still found.
    """

    def __init__(self, forms: list[bytes]):
        self.forms = sorted(forms, key=len, reverse=True)
        self.keep = max((len(f) for f in self.forms), default=1) - 1
        self.pending = b""
        self.hits = 0

    def mask(self, data: bytes) -> bytes:
        for form in self.forms:
            if form in data:
                self.hits += data.count(form)
                data = data.replace(form, MASK * len(form))
        return data

    def feed(self, data: bytes) -> bytes:
        data = self.mask(self.pending + data)
        if self.keep <= 0:
            self.pending = b""
            return data
        cut = max(len(data) - self.keep, 0)
        out, self.pending = data[:cut], data[cut:]
        return out

    def flush(self) -> bytes:
        out, self.pending = self.mask(self.pending), b""
        return out

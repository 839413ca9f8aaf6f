"""The per-kernel certificate authority the egress proxy terminates TLS with.

Made by the proxy at start (``cryptography``), for the hosts of the kernel's ``egress_secrets``
only: its certificate carries a critical Name Constraints extension that permits exactly those
names, so even a leaked key could not vouch for any other site. The private key lives in the
proxy's memory only; the certificate (with the host's trust store, so tunnelled hosts still
verify) is the CA bundle of that one kernel, in its ``h/`` directory. Leaf certificates are
minted per host on first use and loaded into an ``ssl.SSLContext`` through a memfd, never a
file. TLS itself is Python's ``ssl`` (OpenSSL); nothing here speaks TLS by hand.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "KernelCA",
    "pinned_context",
    "pinned_identity",
    "pinned_server_context",
    "upstream_context",
]

VALIDITY = datetime.timedelta(days=30)
SKEW = datetime.timedelta(hours=1)


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kernel-sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common[:64]),
        ]
    )


class KernelCA:
    """One kernel's CA: a name-constrained root, and server contexts for the permitted hosts."""

    def __init__(self, kernel_id: str, domains: list[str]):
        """``domains``: names the CA may vouch for (``corp.test`` covers ``*.corp.test``)."""
        self.kernel_id = kernel_id
        self.domains = sorted(set(domains))
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.not_before, self.not_after = now - SKEW, now + VALIDITY
        public = self._key.public_key()
        subject = _name(f"kernel-sandbox egress CA {kernel_id}")
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName(d) for d in self.domains],
                    excluded_subtrees=None,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._contexts: dict[str, ssl.SSLContext] = {}

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def bundle(self, base: str | None) -> bytes:
        """This CA after the certificates of ``base`` (the host's trust store), if readable."""
        trusted = b""
        if base:
            try:
                with open(base, "rb") as handle:
                    trusted = handle.read()
            except OSError:
                trusted = b""
        if trusted and not trusted.endswith(b"\n"):
            trusted += b"\n"
        return trusted + self.pem

    def write_bundle(self, path: str, base: str | None, private: str) -> None:
        """Put :meth:`bundle` at ``path`` (mode 0644): written in the host-only directory
        ``private`` and renamed into place, so a link planted at ``path`` is replaced, never
        followed."""
        staging = os.path.join(private, f".ca-bundle.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.bundle(base))
        os.chmod(staging, 0o644)
        os.rename(staging, path)

    def leaf(self, host: str) -> tuple[bytes, bytes]:
        """A certificate for ``host`` signed by this CA, and its key (both PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        ca_public = self._key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting ``host``'s certificate (made once per host)."""
        context = self._contexts.get(host)
        if context is None:
            cert, key = self.leaf(host)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])
            # ssl loads a chain from a path only: a memfd keeps the key out of every file system
            fd = os.memfd_create("kernel-sandbox-leaf", os.MFD_CLOEXEC)
            try:
                os.write(fd, cert + key)
                context.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            self._contexts[host] = context
        return context


def pinned_identity(address: str, what: str) -> tuple[bytes, str]:
    """A new self-signed certificate for ``address`` (EC P-256) with its key, as PEM, and the
    certificate's SHA-256, which the client pins (a pod kernel's launcher:
    kernel_sandbox.kube.launch). Kept by the owner so that a re-adopting one serves the same
    certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kernel-sandbox {what}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=400))  # pinned: the dates do not matter
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pinned_context(pem: bytes) -> tuple[ssl.SSLContext, str]:
    """A TLS server context presenting ``pem`` (loaded through a memfd, never a file), and
    the certificate's SHA-256."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create("kernel-sandbox-pinned", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    cert = x509.load_pem_x509_certificate(pem)
    return context, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pinned_server_context(address: str, what: str) -> tuple[ssl.SSLContext, str]:
    """:func:`pinned_context` of a new :func:`pinned_identity`."""
    return pinned_context(pinned_identity(address, what)[0])


def upstream_context(cafile: str | None) -> ssl.SSLContext:
    """How the proxy verifies the real server: the host's trust store, or ``cafile``."""
    context = ssl.create_default_context(cafile=cafile or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context

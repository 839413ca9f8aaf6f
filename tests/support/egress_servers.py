"""Local targets for the egress tests: servers on 127.0.0.1 only, reached as ``.test`` names.

Nothing here ever talks to another machine: every listener binds 127.0.0.1, and the names the
kernels use (api.test, pypi.test, ...) are mapped to it through the policy's egress_hosts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sysconfig
import threading
import zipfile
from pathlib import Path

NAMES = ("api.test", "pypi.test", "echo.test", "evil.test", "ask.test", "a.corp.test")
WHEEL_NAME = "ksegress_probe-1.0-py3-none-any.whl"
PROBE_VALUE = "installed through the egress proxy"


def build_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel (module ksegress_probe), built by hand: no build tools."""
    files = {
        "ksegress_probe.py": f"VALUE = {PROBE_VALUE!r}\n".encode(),
        "ksegress_probe-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: ksegress-probe\nVersion: 1.0\n"
        ),
        "ksegress_probe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: kernel-sandbox-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("ksegress_probe-1.0.dist-info/RECORD,,")
    files["ksegress_probe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / WHEEL_NAME
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the test names (the kernel trusts it as its CA)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    names = ",".join(f"DNS:{n}" for n in NAMES)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=api.test",
            "-addext",
            f"subjectAltName={names}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wheel: bytes = b""
    seen: list[dict] = []  # what reached the server: {"path", "headers"} (per LocalTargets)

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, status: int = 200, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path
        self.seen.append({"path": path, "headers": dict(self.headers)})
        del self.seen[:-200]
        if path.startswith("/reflect"):  # the whole request back, as an echoing API would
            body = json.dumps({"path": path, "headers": dict(self.headers)}).encode()
            self._send(body, kind="application/json")
        elif path.startswith("/gzip"):  # compressed whatever the client accepts
            body = gzip.compress(json.dumps(dict(self.headers)).encode())
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path.startswith("/hello"):
            self._send(f"hello from {self.headers.get('Host')} at {path}\n".encode())
        elif path.startswith("/headers"):
            self._send(json.dumps(dict(self.headers)).encode(), kind="application/json")
        elif path.startswith("/bytes/"):
            size = int(path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * (1024 * 1024)
            while size > 0:
                self.wfile.write(block[: min(size, len(block))])
                size -= len(block)
        elif path.rstrip("/") == "/simple":
            self._send(
                b'<html><body><a href="/simple/ksegress-probe/">ksegress-probe</a></body></html>',
                kind="text/html",
            )
        elif path.rstrip("/") == "/simple/ksegress-probe":
            digest = hashlib.sha256(self.wheel).hexdigest()
            link = f'<a href="/files/{WHEEL_NAME}#sha256={digest}">{WHEEL_NAME}</a>'
            self._send(f"<html><body>{link}</body></html>".encode(), kind="text/html")
        elif path == f"/files/{WHEEL_NAME}":
            self._send(self.wheel, kind="application/octet-stream")
        else:
            self._send(b"not found\n", status=404)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class EchoServer:
    """A raw TCP echo on 127.0.0.1: a non-HTTP target behind CONNECT."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()


class LocalTargets:
    """An HTTP server, the same over TLS (a package index too), and a TCP echo, on 127.0.0.1."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.cert, key = make_certificate(folder)
        wheel = build_wheel(folder)
        self.seen: list[dict] = []
        handler = type("Handler", (_Handler,), {"wheel": wheel.read_bytes(), "seen": self.seen})
        self.handler = handler
        self.http = _Server(("127.0.0.1", 0), handler)
        self.https = _Server(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.https.socket = context.wrap_socket(self.https.socket, server_side=True)
        self.echo = EchoServer()
        self.extra: list[_Server] = []
        for server in (self.http, self.https):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def http_port(self) -> int:
        return int(self.http.server_address[1])

    @property
    def https_port(self) -> int:
        return int(self.https.server_address[1])

    @property
    def ca_pem(self) -> str:
        return self.cert.read_text()

    def tls_server(self, cert: bytes, key: bytes, name: str) -> int:
        """Another HTTPS server on 127.0.0.1 with this certificate chain; returns its port."""
        chain = self.folder / f"{name}.pem"
        chain.write_bytes(cert + key)
        server = _Server(("127.0.0.1", 0), self.handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.extra.append(server)
        return int(server.server_address[1])

    def hosts(self) -> dict[str, str]:
        """Every test name maps to loopback: a refusal is the proxy's, never a lookup's."""
        return {name: "127.0.0.1" for name in NAMES}

    def close(self) -> None:
        for server in (self.http, self.https, *self.extra):
            server.shutdown()
            server.server_close()
        self.echo.close()


def tool_bundle(folder: Path) -> dict[str, bool]:
    """Copy the host's requests (and its dependencies) and curl (with its libraries) into
    ``folder``, to be mounted read-only: the kernel image has neither. Same Debian release
    and Python minor version as the image, so both run there as they are."""
    found = {"requests": False, "curl": False, "httpx": False}
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    try:
        for name in ("requests", "urllib3", "idna", "certifi", "charset_normalizer"):
            shutil.copytree(purelib / name, site / name, dirs_exist_ok=True)
        found["requests"] = True
    except OSError:
        pass
    try:
        for name in ("httpx", "httpcore", "h11", "anyio", "sniffio"):
            shutil.copytree(purelib / name, site / name, dirs_exist_ok=True)
        found["httpx"] = True
    except OSError:
        pass
    curl = shutil.which("curl")
    if curl:
        (folder / "bin").mkdir(exist_ok=True)
        (folder / "lib").mkdir(exist_ok=True)
        shutil.copy(curl, folder / "bin" / "curl")
        ldd = subprocess.run(["ldd", curl], capture_output=True, text=True).stdout
        for line in ldd.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and parts[1].strip().startswith("/"):
                lib = parts[1].split()[0]
                if not os.path.basename(lib).startswith(("libc.so", "ld-linux")):
                    shutil.copy(lib, folder / "lib" / os.path.basename(lib))
        found["curl"] = True
    for path in (folder, *folder.rglob("*")):  # the kernel's uid must read what is lent
        path.chmod(path.stat().st_mode | 0o555 if path.is_dir() else path.stat().st_mode | 0o444)
    return found

"""Helpers for the approvals tests: a listener on 127.0.0.1 that an ask-mode kernel requests
under a ``.test`` name (mapped by egress_hosts), the kernelspec, and the code a cell runs."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from support.kernels import make_kernelspec

NAME = "data.test"  # the name the kernel asks for; egress_hosts maps it to 127.0.0.1
OTHER = "other.test"  # another, mapped the same way


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = f"the data behind {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def listener() -> Iterator[int]:
    """An HTTP server on 127.0.0.1; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def ask_kernelspec(name: str, image: str, timeout: int = 90) -> str:
    """A kernelspec whose kernel asks a person about every target but one that never is."""
    return make_kernelspec(
        name,
        {
            "image": image,
            "network": "allowlist",
            "egress": ["listed.test:1"],
            "egress_mode": "ask",
            "egress_ask_timeout": timeout,
            "egress_hosts": {NAME: "127.0.0.1", OTHER: "127.0.0.1", "listed.test": "127.0.0.1"},
        },
    )


FETCH = """
import urllib.request, urllib.error
def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=150) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:300]
    except Exception as e:
        return type(e).__name__, str(e)[:300]
"""


def fetch_code(port: int, path: str = "/table.csv") -> str:
    return f"print(fetch('http://{NAME}:{port}{path}'))"

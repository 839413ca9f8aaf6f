"""Storage options (credentials, endpoints) for remote datasets, from the host only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kernel_sandbox.errors import CredentialsError

__all__ = ["Credentials", "CredentialsError"]


class Credentials:
    """Storage options (credentials, endpoints) for remote sources, from the host only.

    Looked up by URL prefix, the longest prefix winning, in two places:

    - a JSON file (``path``), mode 0600, mapping URL prefixes to fsspec storage options::

        {"s3://sales-bucket": {"key": "AKIA...", "secret": "...",
                               "client_kwargs": {"endpoint_url": "https://..."}}}

    - the system keyring (if the ``keyring`` package is installed): service
      ``kernel-sandbox``, user name the URL prefix, password the same JSON object.

    With neither, fsspec's own host-side defaults apply (e.g. ``~/.aws/credentials``).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, keyring_service: str = "kernel-sandbox"
    ):
        self.path = Path(path) if path else None
        self.keyring_service = keyring_service

    @staticmethod
    def prefixes(url: str) -> list[str]:
        """``s3://b/x/y`` -> ``["s3://b", "s3://b/x", "s3://b/x/y"]`` (shortest first)."""
        scheme, sep, rest = url.rstrip("/").partition("://")
        parts = rest.split("/")
        return [f"{scheme}{sep}{'/'.join(parts[:i])}" for i in range(1, len(parts) + 1)]

    def _file(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        mode = self.path.stat().st_mode
        if mode & 0o077:
            raise CredentialsError(
                f"credentials file {self.path} is readable by others; `chmod 600 {self.path}`"
            )
        try:
            data = json.loads(self.path.read_text())
        except ValueError as exc:
            raise CredentialsError(
                f"credentials file {self.path} is not valid JSON: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise CredentialsError(f"credentials file {self.path}: expected a JSON object")
        return data

    def _keyring(self, prefix: str) -> dict[str, Any]:
        try:
            import keyring
            import keyring.errors
        except ImportError:
            return {}
        try:
            value = keyring.get_password(self.keyring_service, prefix)
        except keyring.errors.KeyringError:
            return {}
        if not value:
            return {}
        try:
            options = json.loads(value)
        except ValueError:
            raise CredentialsError(
                f"keyring entry {self.keyring_service}/{prefix} is not a JSON object"
            ) from None
        return options if isinstance(options, dict) else {}

    def storage_options(self, url: str) -> dict[str, Any]:
        stored = self._file()
        options: dict[str, Any] = {}
        for prefix in self.prefixes(url):
            options.update(stored.get(prefix) or stored.get(prefix + "/") or {})
            options.update(self._keyring(prefix))
        return options

"""``sandbox://DATASET/PATH``: the data client as an fsspec filesystem (pandas and friends).

Runs INSIDE the sandbox; registered by :mod:`.data` on import, only when fsspec is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["register_fsspec"]


def register_fsspec(default_client: Callable[[], Any]) -> None:
    """Register ``sandbox://`` with fsspec (nothing happens when fsspec is not installed)."""
    import importlib.util

    if importlib.util.find_spec("fsspec") is None:
        return
    import fsspec
    from fsspec.spec import AbstractFileSystem

    class SandboxFileSystem(AbstractFileSystem):  # type: ignore[misc]
        """``sandbox://DATASET/PATH`` through this kernel's data broker."""

        protocol = ("sandbox",)
        root_marker = ""

        def __init__(self, *args: Any, client: Any = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.client = client or default_client()

        @classmethod
        def _strip_protocol(cls, path: Any) -> Any:
            if isinstance(path, list):
                return [cls._strip_protocol(p) for p in path]
            path = str(path)
            if path.startswith("sandbox://"):
                path = path[len("sandbox://") :]
            return path.lstrip("/").rstrip("/")

        def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
            path = self._strip_protocol(path)
            if path and self.client.info(path)["type"] == "file":
                entry = self.info(path)
                return [entry] if detail else [entry["name"]]
            return self.client.ls(path, detail=detail)

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            path = self._strip_protocol(path)
            if not path:
                return {"name": "", "type": "directory", "size": 0}
            return self.client.info(path)

        def cat_file(
            self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
        ) -> bytes:
            path = self._strip_protocol(path)
            size = 0  # only needed (and looked up) for offsets from the end
            if (start is not None and start < 0) or (end is not None and end < 0):
                size = int(self.client.info(path)["size"])
            start = 0 if start is None else (start if start >= 0 else max(0, size + start))
            if end is not None and end < 0:
                end = max(0, size + end)
            return self.client.read_bytes(path, start, end)

        def _open(
            self,
            path: str,
            mode: str = "rb",
            block_size: Any = None,
            autocommit: bool = True,
            cache_options: Any = None,
            **kwargs: Any,
        ) -> Any:
            return self.client.open(self._strip_protocol(path), mode)

        def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
            pass  # directories appear with the files written into them

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            pass

    fsspec.register_implementation("sandbox", SandboxFileSystem, clobber=True)

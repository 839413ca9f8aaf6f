"""What one execution produced, gathered from IOPub and bounded for an agent.

Streams, results, displays and errors arrive as IOPub messages; :class:`Outputs` keeps them
in order as text and images, within :data:`MAX_TEXT` characters (the head and the tail of a
flood, with a line saying how much was left out) and :data:`MAX_IMAGES` images, so a cell
printing without end cannot make the server buffer without end.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_IMAGES", "MAX_TEXT", "Image", "Outputs", "strip_ansi"]

MAX_TEXT = 100_000  # characters of text an execution returns at most
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 4 * 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """Terminal colour codes out (tracebacks are coloured for a terminal, not an agent)."""
    return _ANSI.sub("", text)


@dataclass
class Image:
    mime_type: str
    data: str  # base64


@dataclass
class Outputs:
    """Text and images of one execution, in the order they came, within the bounds."""

    parts: list[str | Image] = field(default_factory=list)
    error: dict[str, Any] | None = None  # ename, evalue, traceback of the error raised
    text_chars: int = 0
    dropped_chars: int = 0
    dropped_images: int = 0
    _tail: str = ""  # the last characters past the limit, kept to show the end

    def add_text(self, text: str) -> None:
        if not text:
            return
        room = MAX_TEXT - self.text_chars
        if room > 0:
            kept = text[:room]
            self.text_chars += len(kept)
            if self.parts and isinstance(self.parts[-1], str):
                self.parts[-1] += kept
            else:
                self.parts.append(kept)
            text = text[room:]
        if text:
            self.dropped_chars += len(text)
            self._tail = (self._tail + text)[-2000:]

    def add_image(self, mime_type: str, data: Any) -> bool:
        if not isinstance(data, str):
            return False
        try:
            size = len(base64.b64decode(data, validate=False))
        except (binascii.Error, ValueError):
            return False
        if len(self.images) >= MAX_IMAGES or size > MAX_IMAGE_BYTES:
            self.dropped_images += 1
            return True
        self.parts.append(Image(mime_type, data.replace("\n", "")))
        return True

    @property
    def images(self) -> list[Image]:
        return [p for p in self.parts if isinstance(p, Image)]

    def add_message(self, msg: dict[str, Any]) -> None:
        """One IOPub message of the execution (status and input messages are ignored)."""
        kind, content = msg["header"]["msg_type"], msg.get("content", {})
        if kind == "stream":
            self.add_text(str(content.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            self.add_data(content.get("data") or {})
        elif kind == "error":
            self.error = {
                "ename": str(content.get("ename", "")),
                "evalue": str(content.get("evalue", "")),
                "traceback": [strip_ansi(str(line)) for line in content.get("traceback", [])],
            }
            self.add_text("\n".join(self.error["traceback"]) + "\n")
        elif kind == "clear_output":
            pass  # progress bars redraw; an agent reads the whole history

    def add_data(self, data: dict[str, Any]) -> None:
        for mime_type in IMAGE_TYPES:
            if mime_type in data and self.add_image(mime_type, data[mime_type]):
                return
        for mime_type in ("text/plain", "text/markdown", "text/html"):
            if mime_type in data:
                text = data[mime_type]
                text = "".join(text) if isinstance(text, list) else str(text)
                self.add_text(strip_ansi(text).rstrip("\n") + "\n")
                return

    def text_parts(self) -> list[str | Image]:
        """The parts, with a note where text or images were left out."""
        parts = list(self.parts)
        if self.dropped_chars:
            parts.append(
                f"\n[... {self.dropped_chars} more characters not shown; the last ones:]\n"
                f"{self._tail}"
            )
        if self.dropped_images:
            parts.append(f"\n[{self.dropped_images} more image(s) not shown]\n")
        return parts

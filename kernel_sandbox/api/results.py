"""What one ``Sandbox.run`` returns, and how it is gathered from the kernel's messages.

A :class:`RunResult` is what E2B's code interpreter and llm-sandbox hand an agent: the text
the code printed (``stdout``, ``stderr``), its rich results (every ``display_data`` and the
``execute_result``, each a MIME bundle: ``text/plain``, ``image/png``, ``text/html``, ...),
and the error if any (``ename``, ``evalue``, ``traceback``). :class:`Outputs` turns the
Jupyter messaging protocol's IOPub messages into one, as a notebook front end would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kernel_sandbox.errors import CellError, CellTimeout

__all__ = ["ExecutionError", "Outputs", "Result", "RunResult"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Result:
    """One rich output: a MIME bundle (``data``) with its ``metadata``.

    ``is_main_result`` marks the value of the code's last expression (``execute_result``);
    the others were displayed (``display(...)``, a matplotlib figure, ...).
    """

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    is_main_result: bool = False

    @property
    def text(self) -> str | None:
        """The ``text/plain`` form (what a console would print), if any."""
        return self.data.get("text/plain")

    @property
    def png(self) -> str | None:
        """A PNG image, base64-encoded as the protocol carries it, if any."""
        return self.data.get("image/png")

    @property
    def html(self) -> str | None:
        return self.data.get("text/html")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    @property
    def formats(self) -> list[str]:
        """The MIME types this result comes in."""
        return sorted(self.data)


@dataclass(frozen=True)
class ExecutionError:
    """The error the code raised (or the timeout, or the kernel's death)."""

    name: str  # the exception's class name (the protocol's ``ename``)
    value: str  # its message (``evalue``)
    traceback: list[str] = field(default_factory=list)  # the kernel's lines, with ANSI colours

    @property
    def ename(self) -> str:
        return self.name

    @property
    def evalue(self) -> str:
        return self.value

    @property
    def traceback_text(self) -> str:
        """The traceback as plain text (colour codes removed)."""
        return _ANSI.sub("", "\n".join(self.traceback))

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclass(frozen=True)
class RunResult:
    """What running code in a sandbox produced.

    ``error`` is None when the code finished without raising. ``timed_out`` says the code ran
    longer than its timeout and was interrupted (``error`` then says so); ``restarted`` that
    the interrupt did not end it and the kernel was restarted (its variables are gone).
    """

    stdout: str = ""
    stderr: str = ""
    results: list[Result] = field(default_factory=list)
    error: ExecutionError | None = None
    execution_count: int | None = None
    timed_out: bool = False
    restarted: bool = False
    duration: float = 0.0  # seconds, from the request to the kernel's reply

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def main_result(self) -> Result | None:
        """The value of the code's last expression, if it had one."""
        return next((r for r in self.results if r.is_main_result), None)

    @property
    def text(self) -> str | None:
        """The ``text/plain`` form of the last expression's value (``"4"`` for ``2+2``)."""
        main = self.main_result
        return main.text if main is not None else None

    def raise_for_error(self) -> RunResult:
        """Return self if the code succeeded; raise :class:`CellTimeout` or
        :class:`CellError` (with this result as ``.result``) if not."""
        if self.error is None:
            return self
        if self.timed_out:
            raise CellTimeout(str(self.error), self)
        raise CellError(str(self.error), self)


class Outputs:
    """Gathers one execution's IOPub messages into a :class:`RunResult`, as a notebook would
    (``clear_output`` clears what came before; ``wait=True`` clears at the next output)."""

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.results: list[Result] = []
        self.error: ExecutionError | None = None
        self.execution_count: int | None = None
        self._clear_pending = False

    def add(self, msg: dict[str, Any]) -> bool:
        """Take one IOPub message of this execution; True when it is the final ``idle``."""
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status":
            return bool(content.get("execution_state") == "idle")
        if kind == "execute_input":
            self.execution_count = content.get("execution_count")
            return False
        if kind == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self._clear()
            return False
        if kind in ("stream", "display_data", "execute_result", "error") and self._clear_pending:
            self._clear()
        if kind == "stream":
            target = self.stderr if content.get("name") == "stderr" else self.stdout
            target.append(content.get("text", ""))
        elif kind in ("display_data", "execute_result"):
            self.results.append(
                Result(
                    dict(content.get("data", {})),
                    dict(content.get("metadata", {})),
                    kind == "execute_result",
                )
            )
            if kind == "execute_result":
                self.execution_count = content.get("execution_count", self.execution_count)
        elif kind == "error":
            self.error = ExecutionError(
                str(content.get("ename", "")),
                str(content.get("evalue", "")),
                list(content.get("traceback", [])),
            )
        return False

    def _clear(self) -> None:
        self.stdout.clear()
        self.stderr.clear()
        self.results.clear()
        self._clear_pending = False

    def result(self, **extra: Any) -> RunResult:
        """The result so far; ``extra`` sets or replaces fields (error, timed_out, ...)."""
        fields: dict[str, Any] = {"error": self.error, "execution_count": self.execution_count}
        return RunResult(
            stdout="".join(self.stdout),
            stderr="".join(self.stderr),
            results=list(self.results),
            **{**fields, **extra},
        )

"""Runs INSIDE the sandbox: an IPython extension that explains the sandbox where it bites.

Loaded into IPython kernels by the provisioner (``--ext=kernel_sandbox.inside.hints``), it
adds one short explanation where a user would otherwise see only a bare failure:

- a network failure under ``network: none`` (a DNS error, "Network is unreachable", a refused
  connection): a note under the traceback that the kernel has no network by policy and how to
  ask for an allowlist; with ``network: allowlist``, that only the proxy leads out;
- ``%pip install`` / ``!pip install`` (and ``pip3``, ``python -m pip``, ``uv pip``, conda,
  mamba, apt): nothing is run; a message says that packages come from the image and how to
  add them (``binder/requirements.txt``, ``binder/apt.txt``), and which are already there;
- ``ModuleNotFoundError``: a note saying the same;
- a notebook whose folder could not keep its host path inside (it is ``/workspace`` there):
  one line in the first cell run, the host's words from ``$KERNEL_SANDBOX_WORKSPACE_NOTE``.

It also lifts the limit on the kernel's own IOPub send queue (``inside/iopub.py``), so a busy
owner cannot make a burst of output lose its end.

Cosmetic only: the kernel can print anything it likes, so nothing here is a security signal;
the sandbox holds whether or not these messages appear. The policy's network mode arrives in
``$KERNEL_SANDBOX_NETWORK``. Standard library and IPython only: it runs in the kernel image.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import socket
import sys
from typing import Any

from kernel_sandbox.inside.contract import NETWORK_ENV, WORKSPACE_NOTE_ENV

__all__ = [
    "NETWORK_ENV",
    "install_command",
    "install_message",
    "load_ipython_extension",
    "network_hint",
]

PREFIX = "kernel-sandbox: "

NO_NETWORK = (
    PREFIX + "this kernel has no network by policy (network: none): name lookups and "
    "connections outside the sandbox fail, and localhost is the sandbox itself.\n"
    "To reach a host, ask whoever runs your Jupyter for a kernel whose policy has "
    "network: allowlist and lists that host (kernel-sandbox's docs/egress.md)."
)
PROXY_ONLY = (
    PREFIX + "this kernel reaches the network only through its egress proxy, and only the "
    "hosts its policy lists (network: allowlist): use a client that honours HTTP_PROXY and "
    "HTTPS_PROXY (urllib, requests, httpx, pip and curl do); name lookups inside the sandbox "
    "fail. To reach another host, ask for it to be added to the policy's egress list."
)
PACKAGES = (
    PREFIX + "nothing was installed. Packages come from the kernel's image: the sandbox has "
    "no network and cannot change its own software."
)
ADD = (
    "Add {what} to {file} and rebuild the image (kernel-sandbox image build --binder binder/), "
    "then restart the kernel."
)
MISSING_MODULE = (
    PREFIX + "packages come from the kernel's image (pip install cannot add them here): add "
    "the package that provides {name!r} to binder/requirements.txt and rebuild the image "
    "(kernel-sandbox image build --binder binder/)."
)

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL}
# Base classes of network errors in popular clients that are not OSError (checked by name,
# never imported here: only a library the user already imported can raise them).
_LIBRARY_ERRORS = (
    ("httpx", "TransportError"),
    ("httpcore", "NetworkError"),
    ("urllib3.exceptions", "HTTPError"),
    ("aiohttp", "ClientError"),
)
_SEPARATORS = re.compile(r"&&|\|\||[;|&\n()]")
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
_PIP = re.compile(r"^pip(\d+(\.\d+)?)?$")
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?(\s*[<>=!~;@].*)?$")


# -- network failures ------------------------------------------------------------------------


def _causes(exc: BaseException, limit: int = 32) -> list[BaseException]:
    """``exc`` and what led to it: causes, contexts, and the errors libraries wrap in
    ``reason`` (urllib) or in their arguments (urllib3), breadth first, each once."""
    seen: list[BaseException] = []
    queue = [exc]
    while queue and len(seen) < limit:
        current = queue.pop(0)
        if any(current is known for known in seen):
            continue
        seen.append(current)
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked += list(getattr(current, "args", ()))
        queue += [item for item in linked if isinstance(item, BaseException)]
    return seen


def network_hint(exc: BaseException, mode: str | None) -> str | None:
    """The explanation for ``exc`` if a lookup or connection failed for lack of network."""
    if mode not in ("none", "allowlist"):
        return None
    for cause in _causes(exc):
        failed = isinstance(cause, socket.gaierror) or (
            isinstance(cause, OSError) and cause.errno in _UNREACHABLE
        )
        if failed:
            return NO_NETWORK if mode == "none" else PROXY_ONLY
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception types worth a look: OSError, and the clients' own base classes for
    those libraries already imported."""
    found: list[type[BaseException]] = [OSError, ModuleNotFoundError]
    for module, name in _LIBRARY_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            found.append(kind)
    return tuple(found)


def _add_note(exc: BaseException, note: str) -> None:
    if note not in getattr(exc, "__notes__", ()):
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(note)
        else:
            print(note, file=sys.stderr)


class _Explainer:
    """IPython's custom exception handler: note the reason, then show the usual traceback."""

    def __init__(self, shell: Any, mode: str | None):
        self.shell = shell
        self.mode = mode
        self.types: tuple[type[BaseException], ...] = ()

    def install(self) -> None:
        """(Re)install the handler, over the types imported so far, unless someone else
        has installed their own since."""
        if self.types and self.shell.custom_exceptions != self.types:
            return
        types = _network_errors()
        if types != self.types:
            self.types = types
            self.shell.set_custom_exc(types, self.handle)

    def handle(self, shell: Any, etype: type, value: BaseException, tb: Any, tb_offset=None):
        try:
            if isinstance(value, ModuleNotFoundError) and value.name:
                _add_note(value, MISSING_MODULE.format(name=value.name.split(".")[0]))
            else:
                hint = network_hint(value, self.mode)
                if hint is not None:
                    _add_note(value, hint)
        except Exception:  # an explanation must never cost the user their traceback
            pass
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
        return None


# -- package installs ------------------------------------------------------------------------


def _words(segment: str) -> list[str]:
    try:
        words = shlex.split(segment)
    except ValueError:
        words = segment.split()
    while words and ("=" in words[0] and not words[0].startswith("-") or words[0] == "sudo"):
        words.pop(0)  # VAR=value prefixes, sudo
    if words and os.path.basename(words[0]) == "env":
        words.pop(0)
        while words and "=" in words[0]:
            words.pop(0)
    return words


def _after(words: list[str], *verbs: str) -> list[str] | None:
    """The arguments after the first non-option word, if that word is one of ``verbs``."""
    for at, word in enumerate(words):
        if word.startswith("-"):
            continue
        return words[at + 1 :] if word in verbs else None
    return None


def install_command(command: str) -> tuple[str, list[str]] | None:
    """``("python" | "conda" | "apt", package names)`` if ``command`` (a shell line) installs
    packages, else None."""
    for segment in _SEPARATORS.split(command):
        words = _words(segment.strip())
        if not words:
            continue
        program, rest = os.path.basename(words[0]), words[1:]
        args: list[str] | None = None
        kind = "python"
        if _PIP.match(program):
            args = _after(rest, "install")
        elif _PYTHON.match(program) and "-m" in rest:
            module = rest[rest.index("-m") + 1 : rest.index("-m") + 2]
            if module == ["pip"]:
                args = _after(rest[rest.index("-m") + 2 :], "install")
        elif program == "uv":
            pip = _after(rest, "pip")
            args = _after(pip, "install") if pip is not None else _after(rest, "add")
        elif program in ("conda", "mamba", "micromamba"):
            kind, args = "conda", _after(rest, "install", "create", "update")
        elif program in ("apt", "apt-get", "aptitude"):
            kind, args = "apt", _after(rest, "install")
        if args is not None:
            return kind, _package_names(args)
    return None


def _package_names(args: list[str]) -> list[str]:
    names: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            # options with a value: -r FILE, -c FILE, -e PATH, -i URL, ...
            skip = arg in ("-r", "-c", "-e", "-i", "-f", "--index-url", "--extra-index-url")
            continue
        match = _NAME.match(arg)
        if match and "/" not in arg:
            names.append(match.group(1))
    return names


def _versions(names: list[str]) -> tuple[list[str], list[str]]:
    """(``name version`` of the packages in the image, names of those that are not)."""
    from importlib import metadata

    present, missing = [], []
    for name in names:
        try:
            present.append(f"{name} {metadata.version(name)}")
        except Exception:
            missing.append(name)
    return present, missing


def install_message(kind: str, names: list[str]) -> str:
    """What to tell a user who tried to install ``names`` with a ``kind`` installer."""
    lines = [PACKAGES]
    if kind == "apt":
        what = ", ".join(names) or "the Debian packages"
        return "\n".join([*lines, ADD.format(what=what, file="binder/apt.txt")])
    present, missing = _versions(names) if kind == "python" else ([], names)
    if present:
        lines.append("Already in the image: " + ", ".join(present) + ".")
    if missing or not present:
        what = ", ".join(missing) or "the packages"
        lines.append(ADD.format(what=what, file="binder/requirements.txt"))
    return "\n".join(lines)


def _refuse(kind: str, names: list[str]) -> None:
    print(install_message(kind, names), file=sys.stderr, flush=True)


def _guard(run: Any, empty: Any) -> Any:
    """Wrap ``shell.system`` or ``shell.getoutput``: an install command is not run."""

    def guarded(cmd: str, *args: Any, **kwargs: Any) -> Any:
        found = install_command(cmd) if isinstance(cmd, str) else None
        if found is None:
            return run(cmd, *args, **kwargs)
        _refuse(*found)
        return empty()

    guarded.__wrapped__ = run  # type: ignore[attr-defined]
    return guarded


def _magic(shell: Any, name: str, kind: str) -> None:
    """Replace the ``%name`` line magic: installs are refused, the rest run as before."""
    original = shell.find_line_magic(name)
    if original is None:
        return

    def magic(line: str) -> Any:
        words = _words(line)
        verbs = {"python": ("install",), "conda": ("install", "create", "update")}[kind]
        if name == "uv":
            pip = _after(words, "pip")
            args = _after(pip, "install") if pip is not None else _after(words, "add")
        else:
            args = _after(words, *verbs)
        if args is None:
            return original(line)
        _refuse(kind, _package_names(args))
        return None

    magic.__doc__ = getattr(original, "__doc__", None)
    shell.register_magic_function(magic, magic_kind="line", magic_name=name)


# -- the workspace's path --------------------------------------------------------------------


def _tell_once(ipython: Any, note: str) -> None:
    """Print ``note`` (stderr) in the first cell that runs, once."""

    def tell(*_: Any) -> None:
        ipython.events.unregister("pre_run_cell", tell)
        print(note, file=sys.stderr, flush=True)

    ipython.events.register("pre_run_cell", tell)


def load_ipython_extension(ipython: Any) -> None:
    try:
        from kernel_sandbox.inside.iopub import unbound_iopub_queue

        unbound_iopub_queue(getattr(ipython, "kernel", None))
    except Exception as exc:  # the kernel still works, only less reliably under a busy owner
        print(f"{PREFIX}could not lift the IOPub queue limit: {exc}", file=sys.__stderr__)
    explainer = _Explainer(ipython, os.environ.get(NETWORK_ENV))
    explainer.install()
    # a library imported by a cell may bring its own network error type: look before each
    ipython.events.register("pre_run_cell", lambda *_: explainer.install())
    for name, kind in (
        ("pip", "python"),
        ("uv", "python"),
        ("conda", "conda"),
        ("mamba", "conda"),
        ("micromamba", "conda"),
    ):
        _magic(ipython, name, kind)
    from IPython.utils.text import SList

    ipython.system = _guard(ipython.system, lambda: None)
    ipython.getoutput = _guard(ipython.getoutput, SList)
    note = os.environ.get(WORKSPACE_NOTE_ENV, "").strip()
    if note:
        _tell_once(ipython, note.splitlines()[0][:500])

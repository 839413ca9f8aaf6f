"""The in-sandbox part of the package stands alone: what the image build copies is all it needs.

The kernel image gets ``kernel_sandbox/__init__.py`` and ``kernel_sandbox/inside/`` whole
(:func:`kernel_sandbox.image.build.inside_files`) and nothing else, on an interpreter that may
have nothing but the standard library. These tests copy exactly those files into an empty
folder and import every module there with ``python -I -S`` (no site-packages at all).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import kernel_sandbox
from kernel_sandbox.image.build import inside_files

PACKAGE = Path(kernel_sandbox.__file__).resolve().parent
INSIDE = PACKAGE / "inside"


def _copy_inside(target: Path) -> Path:
    for path in inside_files():
        dest = target / "kernel_sandbox" / path.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return target


def test_image_copies_every_inside_module():
    copied = {p.relative_to(PACKAGE) for p in inside_files()}
    on_disk = {p.relative_to(PACKAGE) for p in INSIDE.glob("*.py")}
    assert on_disk <= copied
    assert Path("__init__.py") in copied


def test_inside_imports_only_the_standard_library_and_itself():
    # imported only when installed (sandbox:// registration), or only by IPython extensions
    # (zmq: in an ipykernel, which always has it)
    allowed_optional = {"fsspec", "IPython", "zmq"}
    for path in INSIDE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (
                    top in sys.stdlib_module_names
                    or name.startswith("kernel_sandbox.inside")
                    or top in allowed_optional
                    or top == "__future__"
                )
                assert ok, f"{path.name} imports {name}: inside/ may use the standard library only"


def test_inside_modules_import_from_the_copy_alone(tmp_path):
    root = _copy_inside(tmp_path)
    modules = [f"kernel_sandbox.inside.{p.stem}" for p in INSIDE.glob("*.py")]
    imports = "".join(f"importlib.import_module({m!r})\n" for m in modules)
    script = f"import importlib, sys\nsys.path.insert(0, {str(root)!r})\n{imports}"
    script += "from kernel_sandbox import data\nprint(data.Client.__name__)\n"
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Client"


def test_iopub_queue_limit_is_lifted_on_a_live_socket():
    """On a real ipykernel IOPub thread and XPUB socket, with a peer already connected: the
    option is set (from the IOPub thread) and that peer's queue is no longer capped at 1,000."""
    import time
    from types import SimpleNamespace

    import zmq
    from ipykernel.iostream import IOPubThread

    from kernel_sandbox.inside.iopub import unbound_iopub_queue

    context = zmq.Context()
    xpub, sub = context.socket(zmq.XPUB), context.socket(zmq.SUB)
    try:
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.connect(f"tcp://127.0.0.1:{port}")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        thread = IOPubThread(xpub)
        thread.start()
        time.sleep(0.5)  # the subscription reaches the XPUB: the peer's pipe exists
        assert xpub.getsockopt(zmq.SNDHWM) == 1000
        assert unbound_iopub_queue(SimpleNamespace(iopub_thread=thread))
        assert xpub.getsockopt(zmq.SNDHWM) == 0
        for _ in range(5000):
            thread.send_multipart([b"x" * 600])
        time.sleep(0.5)
        received = 0
        while sub.poll(500):
            sub.recv()
            received += 1
        assert received == 5000
        thread.stop()
        thread.close()
    finally:
        sub.close(0)
        xpub.close(0)
        context.term()
    assert not unbound_iopub_queue(SimpleNamespace())  # not an ipykernel: left alone

"""The Python API for programs (agents) that run code in a sandbox (docs/python-api.md).

    results.py   RunResult, Result (a MIME bundle), ExecutionError; gathering IOPub messages
    sandbox.py   AsyncSandbox: the kernel manager's lifecycle, run, upload and download
    execution.py one execution (timeout: interrupt, then restart), one silent evaluation
    files.py     file transfer through the kernel, and the policy's say on it
    sync.py      Sandbox: the blocking twin (the async one on a loop of its own)

Also exported lazily from the package: ``from kernel_sandbox import Sandbox``.
"""

from __future__ import annotations

from kernel_sandbox.api.results import ExecutionError, Result, RunResult
from kernel_sandbox.api.sandbox import AsyncSandbox
from kernel_sandbox.api.sync import Sandbox

__all__ = ["AsyncSandbox", "ExecutionError", "Result", "RunResult", "Sandbox"]

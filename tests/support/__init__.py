"""Test support shared by every test module: one place for each helper.

- ``support.leaks``: the one leak check (``leak_check`` fixture, ``assert_nothing_left``).
- ``support.kernels``: start real sandboxed kernels and run cells in them.
- ``support.servers``: a real Jupyter Server on loopback and a client for it.
- ``support.egress_servers``: loopback HTTP/HTTPS/echo targets for the egress tests.
- ``support.pools``: a warm pool's sandboxes, told apart from the host and from inside.
- ``support.hub``: one real JupyterHub class built from docs/examples/jupyterhub/ (the
  ``classroom`` fixture); ``support.hub_run``: notebooks and memory on a student's server.
- ``support.grading``: a real nbgrader course with honest and attacking submissions and
  canaries (``tests/test_grading*.py``, ``bench/grading.py``).

Tiers: a test that needs the Docker engine, the kernel image, a Jupyter Server or a browser
is an ``integration`` test (marked in its module, or by conftest when it asks for an engine
fixture); every other test is a unit test and runs with the engine out of reach
(``DOCKER_HOST`` = ``NO_ENGINE``), so a unit test that touches the engine fails at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "kernel-sandbox/python:latest"
IN_CI = bool(os.environ.get("CI"))
NO_ENGINE = "unix:///nonexistent/unit-tests-have-no-docker-engine.sock"


def engine_out_of_reach() -> bool:
    """True in a unit test: the engine is deliberately unreachable, so nothing can be left."""
    return os.environ.get("DOCKER_HOST") == NO_ENGINE


def unavailable(reason: str) -> None:
    """Fail in CI (everything the tests need is installed there), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)

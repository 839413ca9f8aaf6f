"""``pandas.read_csv("sandbox://...")`` for real, in a test image that has pandas.

The default kernel image stays small (fsspec, no pandas); this module builds
``kernel-sandbox/python-pandas:test`` from the same Dockerfile with pandas added (hermetic,
wheels fetched on the host; reused while its spec is unchanged) and reads and writes datasets
through the token with pandas' own fsspec support.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import docker.errors
import pytest
from support.kernels import make_kernelspec
from test_broker import data_kernel, run_json

from kernel_sandbox.engine.backend import DockerBackend
from kernel_sandbox.image.build import DEFAULT_BASE, LOCAL_BASE, build_kernel_image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
IMAGE = "kernel-sandbox/python-pandas:test"


@pytest.fixture(scope="module")
def pandas_image(kernel_image: str, docker_client, tmp_path_factory) -> str:
    binder = tmp_path_factory.mktemp("binder-pandas")
    requirements = (REPO / "binder" / "requirements.txt").read_text()
    (binder / "requirements.txt").write_text(requirements + "\npandas>=2\n")
    try:
        docker_client.images.get(LOCAL_BASE)
        base = LOCAL_BASE
    except docker.errors.ImageNotFound:
        base = DEFAULT_BASE
    backend = DockerBackend()
    try:
        asyncio.run(
            build_kernel_image(
                backend, base=base, tag=IMAGE, binder=binder, progress=lambda line: None
            )
        )
    finally:
        backend.close()
    return IMAGE


CODE = r"""
import json
import pandas as pd
from kernel_sandbox import data
df = pd.read_csv("sandbox://sales/2024.csv")
by_region = df.groupby("region")["revenue"].sum().sort_index()
by_region.to_csv("sandbox://out/by_region.csv")
back = pd.read_csv("sandbox://out/by_region.csv")
try:
    pd.read_csv("sandbox://sales/../../etc/passwd")
    escaped = None
except data.PathEscape as exc:
    escaped = str(exc)
print(json.dumps({"rows": len(df), "by_region": by_region.to_dict(),
                  "back": back.to_dict(orient="list"), "escaped": escaped}))
"""


def test_pandas_reads_and_writes_datasets_through_the_token(
    pandas_image: str, tmp_path: Path, leak_check
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(tmp_path, 0o755)
    name = make_kernelspec(
        "data-pandas",
        {
            "image": pandas_image,
            "datasets": {
                "sales": f"{REPO / 'notebooks' / 'data' / 'sales'}:read",
                "out": f"{out}:read-write",
            },
        },
    )
    with data_kernel(name, tmp_path / "state") as (_, kc):
        got = run_json(kc, CODE, timeout=120)
    assert got["rows"] == 9
    assert got["by_region"] == {"east": 2550, "north": 8000, "south": 5150}
    assert got["back"] == {"region": ["east", "north", "south"], "revenue": [2550, 8000, 5150]}
    assert (out / "by_region.csv").read_text().splitlines()[0] == "region,revenue"
    assert got["escaped"] and "path leaves the dataset" in got["escaped"]

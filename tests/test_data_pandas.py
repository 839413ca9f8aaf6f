"""``pandas.read_csv("sandbox://...")`` for real, in the default kernel image (it has pandas).

Reads and writes datasets through the token with pandas' own fsspec support: CSV, and
Parquet (pyarrow) written to and read back from a read-write dataset. The image is the
default one (``test_image.ANALYST_IMAGE``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.kernels import make_kernelspec
from test_broker import data_kernel, run_json
from test_image import ANALYST_IMAGE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pandas_image(kernel_image: str) -> str:
    return ANALYST_IMAGE


CODE = r"""
import json
import pandas as pd
from kernel_sandbox import data
df = pd.read_csv("sandbox://sales/2024.csv")
by_region = df.groupby("region")["revenue"].sum().sort_index()
by_region.to_csv("sandbox://out/by_region.csv")
back = pd.read_csv("sandbox://out/by_region.csv")
by_region.to_frame().to_parquet("sandbox://out/by_region.parquet")
parquet = pd.read_parquet("sandbox://out/by_region.parquet")["revenue"].to_dict()
try:
    pd.read_csv("sandbox://sales/../../etc/passwd")
    escaped = None
except data.PathEscape as exc:
    escaped = str(exc)
print(json.dumps({"rows": len(df), "by_region": by_region.to_dict(),
                  "back": back.to_dict(orient="list"), "parquet": parquet, "escaped": escaped}))
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
    assert got["parquet"] == got["by_region"]
    assert (out / "by_region.parquet").read_bytes()[:4] == b"PAR1"
    assert got["escaped"] and "path leaves the dataset" in got["escaped"]

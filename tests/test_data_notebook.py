"""The demo notebook, executed with nbclient in a sandboxed kernel granted notebooks/data/sales."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from support.kernels import make_kernelspec
from test_broker import broker_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "data-demo.ipynb"


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_demo_notebook_reads_the_dataset_through_its_token(tmp_path: Path, leak_check) -> None:
    name = make_kernelspec(
        "data-demo",
        {
            "datasets": {"sales": f"{REPO / 'notebooks' / 'data' / 'sales'}:read"},
        },
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    km = KernelManager(kernel_name=name, config=broker_config(tmp_path / "state"))
    try:
        NotebookClient(nb, km=km, timeout=120, kernel_name=name).execute()
    finally:
        if km.has_kernel:  # nbclient shuts down only the managers it created itself
            km.shutdown_kernel(now=True)
    text = outputs(nb)
    assert "{'sales': 'read'}" in text
    assert "sales/2024.csv" in text
    assert " north   8,000" in text and " total  15,700" in text
    assert "month,region,product,units,revenue" in text
    assert "NotInScope: dataset 'hr' is not in this kernel's scope" in text
    assert "PathEscape: path leaves the dataset" in text
    assert "ReadOnly: dataset 'sales' is read-only for this kernel" in text
    assert nb.cells[-1]["outputs"][0]["data"]["text/plain"] == "[]"

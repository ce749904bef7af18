"""Every tutorial notebook runs top to bottom (in fast mode) and matches its source.

The notebooks end in assertions, so a notebook whose story stops being true fails here too. Their
kernels inherit MINILORA_BACKEND, so they run on the run's backend (under strict, a notebook that
hands a device array to NumPy or matplotlib fails); the kernel reports its device work in a last
cell added here, and it counts towards the test's.
"""

import copy
import sys
from pathlib import Path

import pytest

from tests.helpers import KERNEL_WORK_CELL, add_kernel_work

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
sys.path.insert(0, str(TUTORIALS))
import build  # noqa: E402  (tutorials/build.py)

NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.host_only("compares file names")
def test_every_source_has_a_committed_notebook():
    sources = {p.stem for p in (TUTORIALS / "src").glob("[0-9][0-9]_*.py")}
    assert sources, "no tutorial sources found"
    assert sources == {p.stem for p in NOTEBOOKS}


@pytest.mark.host_only("compares a notebook's cells with its source")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path):
    committed = nbformat.read(path, as_version=4)
    fresh = build.build_notebook(TUTORIALS / "src" / (path.stem + ".py"))
    assert [(c.cell_type, c.source) for c in committed.cells] == \
           [(c.cell_type, c.source) for c in fresh.cells], \
        f"{path.name} is stale: run `python tutorials/build.py {path.stem[:2]}`"
    recorded = committed.metadata.get("minilora", {})
    assert recorded.get("source_sha256") == build.source_digest(
        TUTORIALS / "src" / (path.stem + ".py")), \
        f"{path.name}'s outputs are not from its current source: run `python tutorials/build.py " \
        f"{path.stem[:2]}`"
    assert recorded.get("full_size") is True, \
        f"{path.name} was built in fast mode (MINILORA_FAST=1): build it at full size"
    images = sum("image/png" in o.get("data", {}) for c in committed.cells
                 for o in c.get("outputs", []))
    assert images > 0, f"{path.name} was committed without its plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("MINILORA_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = copy.deepcopy(nbformat.read(path, as_version=4))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_WORK_CELL))
    build.execute(nb, timeout=600)  # raises CellExecutionError on the first failing cell
    add_kernel_work(nb.cells[-1].outputs)

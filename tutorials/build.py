"""Build the tutorial notebooks from their sources and execute them, keeping the outputs.

Each notebook's source is a plain Python file in ``tutorials/src/`` in the "percent" format:
``# %% [markdown]`` starts a text cell (its lines are comments), ``# %%`` starts a code cell. This
script turns each into ``tutorials/NN_name.ipynb``, runs it top to bottom, and saves it with its
outputs and plots so it reads well on GitHub without running.

    python tutorials/build.py            # all notebooks, full size
    python tutorials/build.py 03         # only those whose name starts with 03
    MINILORA_FAST=1 python tutorials/build.py   # the small sizes the tests use

The tests (tests/test_notebooks.py) execute every committed notebook in fast mode and check that its
cells still match its source.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def parse_percent(text: str) -> list[tuple[str, str]]:
    """Split percent-format source into ``[(cell_type, source)]``; markdown loses its '# '."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
            continue
        if not cells:
            continue  # the module docstring / header before the first cell is not part of it
        kind, lines = cells[-1]
        if kind == "markdown":
            line = line[2:] if line.startswith("# ") else line.lstrip("#")
        lines.append(line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def build_notebook(source: Path) -> nbformat.NotebookNode:
    """A new notebook object holding ``source``'s cells (not yet executed)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    for kind, text in parse_percent(source.read_text()):
        maker = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(maker(text))
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in tutorials/; raises on the first error."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def write_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write the notebook to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    os.replace(tmp, path)


def main(prefixes: list[str]) -> int:
    """Build and execute the notebooks whose names start with one of ``prefixes`` (all if none)."""
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    chosen = [s for s in sources if not prefixes or any(s.name.startswith(p) for p in prefixes)]
    for source in chosen:
        target = HERE / (source.stem + ".ipynb")
        print(f"building {target.name}", flush=True)
        write_atomic(execute(build_notebook(source)), target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

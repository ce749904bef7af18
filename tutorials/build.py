"""Build the tutorial notebooks from their sources and execute them, keeping the outputs.

Each notebook's source is a plain Python file in ``tutorials/src/`` in the "percent" format:
``# %% [markdown]`` starts a text cell (its lines are comments), ``# %%`` starts a code cell. This
script turns each into ``tutorials/NN_name.ipynb``, runs it top to bottom, and saves it with its
outputs and plots so it reads well on GitHub without running.

    python tutorials/build.py            # all notebooks, full size
    python tutorials/build.py 03         # only those whose name starts with 03
    python tutorials/build.py --check    # run every notebook at full size, write nothing

Each built notebook records, in its metadata, the SHA-256 of the source it was built from and
that it ran at full size. The tests (tests/test_notebooks.py) execute every committed notebook in
fast mode (``MINILORA_FAST=1``, the small sizes) and fail when a committed notebook's recorded
digest is not its source's (its outputs would not come from the current source) or when it was
built in fast mode. ``.ci/run`` runs ``--check``: every notebook top to bottom at full size, which
is what catches a library change that makes a notebook's story untrue.
"""

from __future__ import annotations

import hashlib
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


def source_digest(source: Path) -> str:
    """The SHA-256 of a tutorial source's bytes: what a built notebook records of its source."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def build_notebook(source: Path) -> nbformat.NotebookNode:
    """A new notebook object holding ``source``'s cells (not yet executed), its metadata naming
    the source, its digest and whether it is built at full size (``MINILORA_FAST`` unset)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["minilora"] = {"source": f"src/{source.name}",
                               "source_sha256": source_digest(source),
                               "full_size": os.environ.get("MINILORA_FAST") != "1"}
    for i, (kind, text) in enumerate(parse_percent(source.read_text())):
        maker = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        # an id from the cell's place and text, not a random one: a rebuild of an unchanged
        # source then changes no line of the notebook but what its run printed
        cell_id = hashlib.sha256(f"{i}\n{kind}\n{text}".encode()).hexdigest()[:8]
        nb.cells.append(maker(text, id=cell_id))
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel started in tutorials/; raises on the first error. The
    kernel's timestamps are dropped from each cell's metadata (they say when, not what)."""
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def write_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write the notebook to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb.tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give it the mode a plain write would
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    os.replace(tmp, path)


def main(args: list[str]) -> int:
    """Build and execute the notebooks whose names start with one of the prefixes in ``args``
    (all if none); with ``--check`` execute them without writing anything."""
    check = "--check" in args
    prefixes = [a for a in args if a != "--check"]
    sources = sorted(SRC.glob("[0-9][0-9]_*.py"))
    chosen = [s for s in sources if not prefixes or any(s.name.startswith(p) for p in prefixes)]
    if not chosen:
        print(f"build.py: no tutorial source in tutorials/src starts with {prefixes}")
        return 2
    for source in chosen:
        target = HERE / (source.stem + ".ipynb")
        print(f"{'running' if check else 'building'} {target.name}", flush=True)
        nb = execute(build_notebook(source))
        if not check:
            write_atomic(nb, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The import layers of DESIGN.md, read from the source with ``ast`` (nothing is imported): no
import cycle, no import that points up the layers, fast/ built on the backend alone, and no
private name taken from another module. ARCHITECTURE.md draws the same table."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = "minilora"

# Bottom to top; a module may import any module of a lower row. An entry is a flat module
# (minilora/NAME.py), a package (minilora/NAME/, all its modules) or "minilora", the package face
# (minilora/__init__.py). A new module must be placed here before the tests pass.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "startup"),
    ("strict", "backend", "fileio", "filelock", "tensorfile", "flops"),
    ("fast",),
    ("tensor", "functional", "attention"),
    ("nn", "optim"),
    ("data", "bpe", "gpt", "quant", "lora", "family", "interop", "jsonl"),
    ("checkpoint", "step", "train"),
    ("cli_common", "cli_family", "cli_lora", "cli", "demo", "demo_report", "__main__", TOP),
)
PACKAGES = frozenset({"strict", "fast", "quant", "lora", "family", "interop"})

# Within one row, the only imports there may be: entry -> the entries of its own row it may
# import. It must stay acyclic (checked below). Inside a package its modules may import each other
# and its face may import them: that is one entry, held to no cycle only.
SAME_ROW: dict[str, frozenset[str]] = {
    "backend": frozenset({"strict"}),
    "fileio": frozenset({"filelock"}),
    "functional": frozenset({"tensor"}),
    "attention": frozenset({"tensor", "functional"}),
    "data": frozenset({"bpe"}),
    "jsonl": frozenset({"data", "gpt"}),
    "interop": frozenset({"gpt", "lora"}),
    "family": frozenset({"gpt", "lora", "quant", "interop"}),
    "train": frozenset({"checkpoint", "step"}),
    "cli_family": frozenset({"cli_common"}),
    "cli_lora": frozenset({"cli_common", "cli_family"}),
    "demo": frozenset({"demo_report"}),
    "cli": frozenset({"cli_common", "cli_lora", "demo", "demo_report"}),
    "__main__": frozenset({"cli"}),
}

# the fast forms are array kernels: they may use the backend, the errors and each other, nothing
# above (a fast form that reached for Tensor would tie the kernels back into the graph)
FAST_MAY_IMPORT = frozenset({f"{TOP}.backend", f"{TOP}.errors"})


@dataclass(frozen=True)
class Import:
    """One module of minilora reached from another: ``source`` imports ``target``."""

    source: str  # dotted name of the importing module
    target: str  # dotted name of the module reached
    names: tuple[str, ...]  # names taken from target (from-import), () when the module itself
    path: str  # the importing file, relative to the repository
    line: int
    text: str  # the statement as written
    implicit: bool = False  # a package face that Python runs on the way to one of its modules

    def where(self) -> str:
        """``path:line `statement```, for messages."""
        how = " (runs that package's __init__.py)" if self.implicit else ""
        return f"{self.path}:{self.line} `{self.text}`{how}"


@dataclass(frozen=True)
class Module:
    """One file of the package, and the minilora modules it imports."""

    name: str
    path: str
    imports: tuple[Import, ...]
    private_uses: tuple[tuple[str, str, int], ...]  # (module, attribute, line): mod._name


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the package under ``root``."""
    found = {}
    for path in sorted((root / TOP).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def is_private(name: str) -> bool:
    """A leading underscore that is not a dunder (``_helper``, not ``__version__``)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_module(name: str, path: Path, root: Path, known: set[str]) -> Module:
    """Every import of a minilora module in ``path``, at any depth (functions included)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    is_face = path.name == "__init__.py"
    package = name if is_face else name.rpartition(".")[0]
    rel = path.relative_to(root).as_posix()
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> minilora module it is bound to

    def add(target: str, names: tuple[str, ...], node: ast.stmt) -> None:
        text = " ".join((ast.get_source_segment(source, node) or "").split())
        found.append(Import(name, target, names, rel, node.lineno, text))
        # Python runs each package face on the way to a module inside it; the packages this
        # module sits in are already running, so they add no edge
        parts = target.split(".")
        for k in range(2, len(parts)):
            face = ".".join(parts[:k])
            if face != name and not name.startswith(face + "."):
                found.append(Import(name, face, (), rel, node.lineno, text, implicit=True))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == TOP or alias.name.startswith(TOP + "."):
                    add(alias.name, (), node)
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != TOP and not base.startswith(TOP + "."):
                continue
            taken = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from . import x`: the module x
                    add(f"{base}.{alias.name}", (), node)
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                else:
                    taken.append(alias.name)
            if taken:
                add(base, tuple(taken), node)
    uses = tuple((aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id in aliases and is_private(n.attr))
    return Module(name, rel, tuple(found), uses)


def read_package(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the package under ``root``, read."""
    names = module_names(root)
    known = set(names)
    return {name: read_module(name, path, root, known) for name, path in names.items()}


def entry(module: str) -> str:
    """The LAYERS entry a module belongs to: ``minilora.lora.layer`` -> ``lora``."""
    parts = module.split(".")
    return TOP if len(parts) == 1 else parts[1]


def row_of(layers: tuple[tuple[str, ...], ...] = LAYERS) -> dict[str, int]:
    """Entry -> its row, 1 at the bottom."""
    return {e: i + 1 for i, row in enumerate(layers) for e in row}


def placement_problems(modules: dict[str, Module]) -> list[str]:
    """Modules the table does not place, and table entries with no module."""
    rows = row_of()
    problems = [f"{m.path}: module {m.name} has no row in LAYERS (tests/test_architecture.py); "
                f"place it in DESIGN.md's layer order" for m in modules.values()
                if entry(m.name) not in rows]
    present = {entry(m) for m in modules}
    problems += [f"LAYERS lists {e!r}, but there is no minilora/{e}.py or minilora/{e}/"
                 for e in rows if e not in present]
    for e in rows:
        face = modules.get(f"{TOP}.{e}")
        if e != TOP and face is not None and face.path.endswith("/__init__.py") != (e in PACKAGES):
            problems.append(f"{face.path}: {e!r} is {'not ' * (e in PACKAGES)}a package in the "
                            f"tree; PACKAGES must say the same")
    return problems


def layer_problems(modules: dict[str, Module]) -> list[str]:
    """Imports that point up the rows, or sideways where SAME_ROW does not allow it."""
    rows, problems = row_of(), []
    for m in modules.values():
        for imp in m.imports:
            if imp.implicit:
                continue  # a face is in its modules' entry: the explicit import says it all
            s, t = entry(imp.source), entry(imp.target)
            if imp.target not in modules:
                problems.append(f"{imp.where()}: imports {imp.target}, which is no module")
            elif s == t or s not in rows or t not in rows:
                continue  # one package inside (cycles are checked apart); unplaced: see above
            elif rows[t] > rows[s]:
                problems.append(f"{imp.where()}: points up the layers: {s} (row {rows[s]}) "
                                f"imports {t} (row {rows[t]}); imports point down only")
            elif rows[t] == rows[s] and t not in SAME_ROW.get(s, frozenset()):
                problems.append(f"{imp.where()}: {s} imports {t}, both in row {rows[s]}, and "
                                f"SAME_ROW does not let {s} import {t}")
    return problems


def fast_problems(modules: dict[str, Module]) -> list[str]:
    """Imports in minilora/fast/ of anything but the backend, the errors and fast itself."""
    fast = f"{TOP}.fast"
    return [f"{imp.where()}: minilora/fast/ may import only minilora.backend, minilora.errors "
            f"and minilora.fast.*, not {imp.target}"
            for m in modules.values() if m.name == fast or m.name.startswith(fast + ".")
            for imp in m.imports
            if not imp.implicit and imp.target not in FAST_MAY_IMPORT and imp.target != fast
            and not imp.target.startswith(fast + ".")]


def private_problems(modules: dict[str, Module]) -> list[str]:
    """Private names (a leading underscore) taken from another module."""
    problems = [f"{imp.where()}: takes the private name {n} from {imp.target}; a name used "
                f"across files is public where it lives" for m in modules.values()
                for imp in m.imports if imp.target != m.name for n in imp.names if is_private(n)]
    problems += [f"{m.path}:{line}: uses the private name {target}.{attr}; a name used across "
                 f"files is public where it lives" for m in modules.values()
                 for target, attr, line in m.private_uses if target != m.name]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first node repeated at the end) per strongly connected part that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph.get(v, ()):
                parts.append(part)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for part in parts:  # the shortest way back to the start, inside the part
        start, members = min(part), set(part)
        paths, seen, back = [[start]], {start}, None
        while back is None:
            nxt = []
            for path in paths:
                for w in sorted(graph[path[-1]] & members):
                    if w == start:
                        back = path + [start]
                        break
                    if w not in seen:
                        seen.add(w)
                        nxt.append(path + [w])
                if back:
                    break
            paths = nxt
        found.append(back)
    return found


def cycle_problems(modules: dict[str, Module]) -> list[str]:
    """Import cycles among the modules, each with the statements that close it."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for m in modules.values():
        for imp in m.imports:
            if imp.target in modules and imp.target != m.name:
                graph[m.name].add(imp.target)
    problems = []
    for loop in cycles(graph):
        steps = [min((imp for imp in modules[a].imports if imp.target == b),
                     key=lambda imp: (imp.implicit, imp.line)) for a, b in zip(loop, loop[1:])]
        problems.append("import cycle " + " -> ".join(loop) + ":\n"
                        + "\n".join(f"    {imp.where()}" for imp in steps))
    return problems


def fail_on(problems: list[str], rule: str) -> None:
    assert not problems, f"{rule}:\n" + "\n".join(f"  {p}" for p in problems)


# --- the package as it is ---

def test_layer_table_is_well_formed():
    entries = [e for row in LAYERS for e in row]
    assert len(entries) == len(set(entries)), "an entry appears twice in LAYERS"
    rows = row_of()
    for s, targets in SAME_ROW.items():
        for t in targets:
            assert s in rows and t in rows and rows[s] == rows[t], \
                f"SAME_ROW[{s!r}] holds {t!r}: both must be LAYERS entries of one row"
    assert not cycles({s: set(t) for s, t in SAME_ROW.items()}), "SAME_ROW has a cycle"
    assert PACKAGES <= set(entries)


def test_every_module_is_placed():
    fail_on(placement_problems(read_package()), "LAYERS and the package disagree")


def test_no_import_cycle():
    fail_on(cycle_problems(read_package()), "import cycles")


def test_imports_point_down_the_layers():
    fail_on(layer_problems(read_package()), "imports against the layer order of DESIGN.md")


def test_fast_imports_only_the_backend_and_errors():
    fail_on(fast_problems(read_package()), "fast/ imports beyond its floor")


def test_no_private_name_from_another_module():
    fail_on(private_problems(read_package()), "private names used across modules")


def test_the_reader_sees_every_kind_of_import():
    modules = read_package()
    imports = {(i.source, i.target) for m in modules.values() for i in m.imports}
    assert len(modules) > 30 and (f"{TOP}.tensor", f"{TOP}.backend") in imports
    assert (f"{TOP}.lora.layer", f"{TOP}.lora.config") in imports  # from .config import ...
    assert (f"{TOP}.gpt", f"{TOP}.functional") in imports  # from . import functional


# --- the checker on a made-up package: each rule can fail ---

FAKE = {
    "__init__.py": "from . import tensor\n",
    "errors.py": "from .tensor import Tensor\n",  # up, and a cycle with tensor
    "tensor.py": "from . import errors\n",
    "backend.py": "import minilora.errors as E\n\ndef f():\n    return E._hidden\n",
    "fast/__init__.py": "from . import k\n",
    "fast/k.py": "def f():\n    from ..nn import Module\n    return Module\n",
    "nn.py": "from .fast import k\n",
    "bpe.py": "def _split():\n    pass\n",
    "data.py": "from .bpe import _split\n",
    "gpt.py": "from minilora import data\n",  # sideways, not in SAME_ROW
    "quant/__init__.py": "from .model import q\n",
    "quant/bnb_format.py": "",
    "quant/model.py": "from ..checkpoint import c\n",  # up; a cycle only through the face
    "checkpoint.py": "from minilora.quant.bnb_format import x\n",
    "newthing.py": "",
}


def fake_package(tmp_path: Path) -> dict[str, Module]:
    for name, text in FAKE.items():
        path = tmp_path / TOP / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_package(tmp_path)


def test_checker_catches_each_rule(tmp_path):
    modules = fake_package(tmp_path)
    loops = "\n".join(cycle_problems(modules))
    assert "minilora.errors -> minilora.tensor -> minilora.errors" in loops
    assert "minilora.checkpoint -> minilora.quant -> minilora.quant.model -> " \
           "minilora.checkpoint" in loops  # closed only by the face Python runs on the way
    assert "runs that package's __init__.py" in loops
    layers = "\n".join(layer_problems(modules))
    assert "minilora/errors.py:1 `from .tensor import Tensor`: points up the layers: errors " \
           "(row 1) imports tensor (row 4)" in layers
    assert "minilora/quant/model.py:1" in layers
    assert "gpt imports data, both in row 6, and SAME_ROW does not let gpt import data" in layers
    assert "minilora/fast/k.py:2 `from ..nn import Module`" in "\n".join(fast_problems(modules))
    private = "\n".join(private_problems(modules))
    assert "minilora/data.py:1 `from .bpe import _split`: takes the private name _split" in private
    assert "minilora/backend.py:4: uses the private name minilora.errors._hidden" in private
    placed = "\n".join(placement_problems(modules))
    assert "module minilora.newthing has no row" in placed
    assert "LAYERS lists 'lora', but there is no minilora/lora.py" in placed
    assert "minilora/bpe.py" not in placed and "minilora/quant/__init__.py" not in placed


def test_checker_passes_a_clean_package(tmp_path):
    for name, text in {"__init__.py": "from .tensor import Tensor\n", "errors.py": "",
                       "tensor.py": "from . import errors\nfrom .errors import E\n",
                       "fast/__init__.py": "from .. import backend\n", "backend.py": "",
                       "lora/__init__.py": "from .layer import L\n",
                       "lora/layer.py": "from .config import C\nfrom ..tensor import T\n",
                       "lora/config.py": "from .. import errors\n"}.items():
        path = tmp_path / TOP / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = read_package(tmp_path)
    for check in (cycle_problems, layer_problems, fast_problems, private_problems):
        assert check(modules) == [], check.__name__

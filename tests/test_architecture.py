"""The package's structure: imports go one way (no cycle), the run-time side needs no compiler,
every file the generated code depends on is in the cache key, and layers pickle without the
runtime knowing the driver."""

from __future__ import annotations

import ast
import copy
import pickle
import re
from pathlib import Path

import pytest
import torch

import paracompile
from paracompile import _cache, _codegen, _driver, _layer
from paracompile._meta import CellMeta

PACKAGE = Path(paracompile.__file__).parent
MODULES = {p.stem: p for p in PACKAGE.glob("*.py")}
COMPILER_LIBRARIES = {"sympy", "lark", "jinja2"}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, top-level outside packages) that `path` imports anywhere (function-
    level imports included), except in `if TYPE_CHECKING:` blocks."""
    inside: set[str] = set()
    outside: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "paracompile":
                    inside.add(parts[1] if len(parts) > 1 else "__init__")
                else:
                    outside.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "paracompile":
                outside.add(parts[0])
            else:
                sub = parts[1:] if node.level == 0 else [p for p in parts if p]
                if sub:
                    inside.add(sub[0])
                else:  # `from . import x`: module x, or a name of the package's __init__
                    inside.update(a.name if a.name in MODULES else "__init__"
                                  for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return inside - {path.stem}, outside


GRAPH = {name: _imports(path)[0] for name, path in MODULES.items()}


def _closure(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH.get(name, ()))
    return seen


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_follow_the_pipeline():
    """_ir ← _parse ← _analyse ← _codegen ← _driver → _runtime → _layer: nothing imports
    the driver's side from the runtime's, and the layer knows only the argument checks and
    the defaults."""
    assert "_driver" not in _closure({"_runtime"})
    assert _closure({"_layer"}) <= {"_layer", "_checks", "_defaults"}
    assert not {"_codegen", "_driver", "_runtime"} & _closure({"_analyse", "_parse"})
    # the kernel launchers know the shared interface, the defaults, (the CPU one) the
    # Levenberg–Marquardt solve and (the dense CUDA one) the CUDA plumbing of `_cuda`:
    # nothing of the runtime or the compiler
    assert _closure({"_cpu", "_cuda", "_cuda_dense"}) <= {"_cpu", "_cuda", "_cuda_dense",
                                                         "_damping", "_backend", "_defaults"}
    assert _closure({"_damping"}) <= {"_damping", "_defaults"}


def test_the_runtime_side_needs_no_compiler():
    """Modules written by `paracompile build` import `_runtime`: nothing it reaches may import
    SymPy, Lark or Jinja (not even lazily: they may not be installed)."""
    for name in _closure({"_runtime", "_meta", "_checks"}):
        used = _imports(MODULES[name])[1] & COMPILER_LIBRARIES
        assert not used, f"paracompile.{name} imports {used}"


# -- the cache key -------------------------------------------------------------------------------

def _imported_by_generated_code() -> set[str]:
    texts = "".join(p.read_text() for p in _codegen.templates_dir().glob("*.jinja"))
    return set(re.findall(r"\bparacompile\.(\w+)", texts))


def test_the_fingerprint_covers_every_file_the_generated_code_depends_on():
    """What produces a generated module (the analysis and code generator with everything they
    import, the driver that writes the metadata, the grammar) and what generated modules
    import is in the fingerprint: no edit to them can leave a stale module in the cache."""
    producers = {"_parse", "_analyse", "_codegen", *(["_printers"] if "_printers" in MODULES
                                                     else [])}
    generated_imports = _imported_by_generated_code()
    assert "_fastmath" in generated_imports  # the scan sees the templates' imports
    needed = {f"{m}.py" for m in _closure(producers | generated_imports)}
    needed |= {"_driver.py", "_meta.py", "cell.lark"}
    covered = set(_driver.fingerprinted_files())
    assert needed <= covered, f"not in the fingerprint: {sorted(needed - covered)}"
    # every exclusion names a real file (a renamed module cannot slip back in unnoticed)
    names = {p.name for p in PACKAGE.iterdir()}
    assert {f for f in _driver.RUNTIME_ONLY if f not in ("_cpu.py",)} <= names


def test_every_template_is_in_a_target_fingerprint():
    """Each template file (in the package or a checkout's templates/) is part of the text
    hashed into some target's key."""
    hashed = _codegen.template_sources("cpu") + _codegen.template_sources("cuda")
    templates = list(_codegen.templates_dir().glob("*.jinja"))
    assert templates
    for path in templates:
        assert path.read_text() in hashed, f"{path.name} is not in any target fingerprint"


def test_the_fingerprint_hashes_those_files():
    _driver.analysis_fingerprint.cache_clear()
    texts = [(PACKAGE / f).read_text(encoding="utf-8") for f in _driver.fingerprinted_files()]
    assert _driver.analysis_fingerprint() == _cache.fingerprint(*texts)
    assert _driver.analysis_fingerprint() != _cache.fingerprint(*texts[:-1], texts[-1] + "#")


def test_every_key_names_its_parts():
    assert _cache.key("built", "x") != _cache.key("built", "y")
    assert _cache.key("cell-text", "a", "b") != _cache.key("cell-ir", "a", "b")
    with pytest.raises(TypeError, match="takes 4 parts"):
        _cache.key("module", "cell key", "cpu")


# -- metadata and pickling -----------------------------------------------------------------------

CELL = """\
cell Pickled
state h
input x
param a ~ normal(0.5, 0.1)
h' = a * h + x
"""


def test_cell_meta_round_trips(tmp_path):
    cell = paracompile.load(CELL)
    meta = cell.meta
    assert isinstance(meta, CellMeta) and meta.inits == {"a": ("normal", (0.5, 0.1))}
    assert CellMeta.from_json(meta.to_json()) == meta
    assert CellMeta.from_dict(meta.to_dict()) == meta
    with pytest.raises(ValueError, match="without structure"):
        CellMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "structure"})
    source = tmp_path / "pickled.cell"
    source.write_text(CELL)
    built = _driver.build(source, tmp_path / "out")
    namespace: dict = {}
    exec(compile(built.read_text(), str(built), "exec"), namespace)  # noqa: S102
    assert CellMeta.from_dict(namespace["META"]) == meta
    assert namespace["cell"].meta == meta


def _same_layer(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a).__name__ == type(b).__name__ == "PickledLayer"
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb)


def test_a_layer_unpickles_where_its_class_is_not_made_yet(monkeypatch):
    """Another process has no class for the cell: unpickling makes the cell again with the
    loader the driver gave it (from the `.cell` source)."""
    layer = paracompile.load(CELL).Layer(3, 4)
    data = pickle.dumps(layer)
    monkeypatch.setattr(_layer, "_CLASSES", {})
    again = pickle.loads(data)
    _same_layer(again, layer)
    assert again.cell.key == layer.cell.key


def test_a_built_cell_layer_pickles_without_the_compiler(tmp_path, monkeypatch):
    source = tmp_path / "pickled.cell"
    source.write_text(CELL)
    built = _driver.build(source, tmp_path / "out")
    namespace: dict = {}
    exec(compile(built.read_text(), str(built), "exec"), namespace)  # noqa: S102
    layer = namespace["Layer"](3, 4)
    data = pickle.dumps(layer)
    monkeypatch.setattr(_layer, "_CLASSES", {})
    monkeypatch.setattr(_driver, "load", lambda *a: pytest.fail("the compiler was used"))
    _same_layer(pickle.loads(data), layer)
    _same_layer(copy.deepcopy(layer), layer)


def test_the_internal_interfaces_cover_every_module():
    text = (PACKAGE.parent / "docs" / "internal-interfaces.md").read_text(encoding="utf-8")
    missing = [f"{name}.py" for name in MODULES if f"`{name}.py`" not in text]
    assert not missing, f"docs/internal-interfaces.md does not describe {missing}"

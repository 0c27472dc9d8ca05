"""The pipeline, as a table of contents:

    read → parse (Lark) → analyse (SymPy) → lower + render (printer, Jinja)
         → write to the content-addressed cache → import → CompiledCell (torch ops)

A second `load` of the same cell finds its metadata and generated modules in the cache and
neither parses, analyses, renders nor (thanks to numba's cache) compiles anything.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from . import _cache
from ._runtime import CompiledCell
from ._version import __version__

if TYPE_CHECKING:
    from ._ir import CellIR

# What each cache key covers: the analysis (metadata), and per target the code generator,
# its templates and what the generated code imports.
_ANALYSIS_FILES = ("_analyse.py", "_ir.py", "_parse.py", "cell.lark", "functions.py")
_TARGET_FILES = {"cpu": ("_codegen.py", "_fastmath.py"), "cuda": ("_codegen.py",),
                 "cudasim": ("_codegen.py",), "torch": ("_codegen.py",)}

# counters of the expensive stages, for tests
STAGE_COUNTS = {"analyse": 0, "render": 0}


def _sources(names: tuple[str, ...]) -> list[str]:
    package = resources.files("paracompile")
    return [package.joinpath(f).read_text() for f in names]


@cache
def analysis_fingerprint() -> str:
    return _cache.digest(*_sources(_ANALYSIS_FILES))


@cache
def target_fingerprint(target: str) -> str:
    from ._codegen import template_sources

    family = "cuda" if target.startswith("cuda") else target
    return _cache.digest(*_sources(_TARGET_FILES[target]), template_sources(family))


def read_source(path_or_source: str | os.PathLike[str]) -> tuple[str, str]:
    """(text, filename) from a path to a `.cell` file or from `.cell` source text."""
    if isinstance(path_or_source, os.PathLike) or (
        isinstance(path_or_source, str) and "\n" not in path_or_source
        and (path_or_source.endswith(".cell") or os.path.exists(path_or_source))
    ):
        path = Path(path_or_source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such cell file: {path}") from None
    if not isinstance(path_or_source, str):
        raise TypeError("paracompile.load expects a path or .cell source text, got "
                        f"{type(path_or_source).__name__}")
    return path_or_source, "<string>"


def load(path_or_source: str | os.PathLike[str]) -> CompiledCell:
    """Compile a cell (a `.cell` path or source text) once, cached on disk; see SPEC §4."""
    text, filename = read_source(path_or_source)
    return _load(_cache.digest("cell-text", text, analysis_fingerprint()), text, filename, None)


def load_ir(ir: CellIR) -> CompiledCell:
    """Compile a cell from its IR (the Python frontend)."""
    import sympy as sp

    identity = repr((ir.name, ir.states, ir.inputs, ir.params, ir.outputs,
                     [(e.target, e.kind, sp.srepr(e.expr)) for e in ir.equations]))
    return _load(_cache.digest("cell-ir", identity, analysis_fingerprint()), "", ir.filename,
                 ir)


def _compile_meta(key: str, text: str, filename: str, ir: CellIR | None):
    compiler = _Compiler(text, filename, ir)
    meta_path = _cache.module_path(key, "meta").with_suffix(".json")
    if meta_path.exists():
        return compiler, json.loads(meta_path.read_text())
    compiler.ir  # parse first: syntax errors before any other work  # noqa: B018
    meta = metadata(compiler.analysis, key)
    _cache.write_atomic(meta_path, json.dumps(meta, indent=1))
    return compiler, meta


def build(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write `out_dir/<snake_name>.py`: a module exposing the cell's `apply`, `structure`,
    `Layer` and `step`, with every kernel's source inside (no SymPy, Lark or Jinja needed)."""
    text, filename = read_source(path)
    key = _cache.digest("cell-text", text, analysis_fingerprint())
    compiler, meta = _compile_meta(key, text, filename, None)
    targets = [("cpu", "float32"), ("cpu", "float64"), ("torch", "any")]
    if meta["structure"] != "dense":
        targets += [(t, d) for t in ("cuda", "cudasim") for d in ("float32", "float64")]
    sources = {f"{t}/{d}": render_module(compiler.analysis, meta, t, d) for t, d in targets}
    snake = compiler.ir.snake_name
    lines = [
        f'"""The {meta["name"]} cell (structure {meta["structure"]}), built by paracompile '
        f'{__version__} from {Path(filename).name}.',
        "",
        "Do not edit: rebuild with `paracompile build`. Needs torch, numba and the paracompile",
        "runtime (not SymPy, Lark or Jinja). Use it like `paracompile.load(...)`:",
        f"    import {snake}",
        f"    out = {snake}.apply(inputs, params, h0=None, method=\"auto\", backend=\"auto\")",
        '"""',
        "",
        "from paracompile._runtime import cell_from_sources",
        "",
        f"META = {meta!r}",
        "",
        f"SOURCES = {sources!r}",
        "",
        "cell = cell_from_sources(META, SOURCES)",
        "apply = cell.apply",
        "step = cell.step",
        "Layer = cell.Layer",
        "name = cell.name",
        "states = cell.states",
        "inputs = cell.inputs",
        "params = cell.params",
        "outputs = cell.outputs",
        "structure = cell.structure",
        "",
    ]
    target = Path(out_dir) / f"{snake}.py"
    _cache.write_atomic(target, "\n".join(lines))
    return target


class _Compiler:
    """Parses and analyses a cell only when something is missing from the cache."""

    def __init__(self, text: str, filename: str, ir: CellIR | None) -> None:
        self._text, self._filename, self._ir = text, filename, ir
        self._analysis = None

    @property
    def ir(self) -> CellIR:
        if self._ir is None:
            from ._parse import parse_cell

            self._ir = parse_cell(self._text, self._filename)
        return self._ir

    @property
    def analysis(self):
        if self._analysis is None:
            from ._analyse import analyse

            STAGE_COUNTS["analyse"] += 1
            self._analysis = analyse(self.ir)
        return self._analysis


def metadata(analysis, key: str) -> dict:
    ir = analysis.ir
    return {
        "name": ir.name,
        "version": __version__,
        "key": key,
        "states": list(ir.states),
        "inputs": list(ir.inputs),
        "params": {p.name: p.kind for p in ir.params},
        "inits": {p.name: [p.init.distribution, list(p.init.args)] if p.init else None
                  for p in ir.params},
        "outputs": list(ir.outputs),
        "structure": analysis.structure,
        "jac_entries": [list(e) for e in analysis.jac_entries],
        "source": ir.source,
    }


def render_module(analysis, meta: dict, target: str, dtype: str) -> str:
    from ._codegen import render, torch_step_source

    STAGE_COUNTS["render"] += 1
    if target == "torch":
        return ("# Generated by paracompile: the pure-torch step of cell "
                f"{meta['name']} (the reference backend).\nimport torch\n\n\n"
                + torch_step_source(analysis.ir))
    return render(analysis, target, dtype, meta)  # type: ignore[arg-type]


def _load(key: str, text: str, filename: str, ir: CellIR | None) -> CompiledCell:
    compiler, meta = _compile_meta(key, text, filename, ir)
    stem = meta["name"].lower()

    def module(target: str, dtype: str) -> ModuleType:
        module_key = _cache.digest(key, target, dtype, target_fingerprint(target))
        mod, _ = _cache.load_module(
            module_key, f"{stem}_{target}_{dtype}",
            lambda: render_module(compiler.analysis, meta, target, dtype))
        return mod

    torch_step = module("torch", "any").torch_step
    return CompiledCell(meta, cache(module), torch_step)

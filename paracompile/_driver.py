"""The pipeline, as a table of contents:

    read → parse (Lark) → analyse (SymPy) → lower + render (printer, Jinja)
         → write to the content-addressed cache → import → CompiledCell (torch ops)

A second `load` of the same cell finds its metadata and generated modules in the cache and
neither parses, analyses, renders nor (thanks to numba's cache) compiles anything.
"""

from __future__ import annotations

import functools
import importlib.util
import keyword
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import _cache
from ._errors import CellError
from ._meta import CellMeta
from ._runtime import CompiledCell
from ._version import __version__

if TYPE_CHECKING:
    from ._ir import CellIR

# Source files of the package that the generated code does not depend on: the run-time side,
# which loads and runs generated modules without shaping them, and the entry points. Every
# other file (the compiler, code generator, function registry, grammar, and the helpers that
# generated modules import), new ones included, is in both fingerprints;
# tests/test_architecture.py checks that nothing the generated code depends on is listed here.
RUNTIME_ONLY = frozenset({
    "__init__.py", "__main__.py", "_cli.py",  # entry points
    "_runtime.py", "_layer.py", "_checks.py",  # CompiledCell, its ops, layer, argument checks
    "_cpu.py", "_cuda.py", "_cuda_dense.py",  # the host drivers that launch the kernels
    "_damping.py",  # the CPU Newton's Levenberg–Marquardt solve (host side)
    "_reference.py",  # the pure-torch reference backend
    "_ptx.py",  # a resource report of compiled CUDA kernels
    "_cache.py", "_version.py",  # their format and version are parts of every key already
})
_SUFFIXES = (".py", ".lark")

# counters of the expensive stages, for tests
STAGE_COUNTS = {"analyse": 0, "render": 0}


def fingerprinted_files() -> list[str]:
    """The package's source files in the fingerprints: all but `RUNTIME_ONLY`."""
    package = resources.files("paracompile")
    return sorted(f.name for f in package.iterdir()
                  if f.name.endswith(_SUFFIXES) and f.name not in RUNTIME_ONLY)


@cache
def analysis_fingerprint() -> str:
    """Part of a cell's key: the compiler's sources (the analysis and the metadata)."""
    package = resources.files("paracompile")
    return _cache.fingerprint(*(package.joinpath(f).read_text(encoding="utf-8")
                                for f in fingerprinted_files()))


@cache
def target_fingerprint(target: str) -> str:
    """Part of a generated module's key (with the cell's key, hence `analysis_fingerprint`):
    the templates its target family renders from."""
    from ._codegen import template_sources

    family = "cuda" if target.startswith("cuda") else target
    return _cache.fingerprint(template_sources(family))


def read_source(path_or_source: str | os.PathLike[str]) -> tuple[str, str]:
    """(text, filename) from a path to a `.cell` file or from `.cell` source text."""
    if isinstance(path_or_source, os.PathLike) or (
        isinstance(path_or_source, str) and "\n" not in path_or_source
        and (path_or_source.endswith(".cell") or os.path.exists(path_or_source))
    ):
        path = Path(path_or_source)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory, not a .cell file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such cell file: {path}") from None
        return decode_cell(data, str(path)), str(path)
    if not isinstance(path_or_source, str):
        raise TypeError("paracompile.load expects a path or .cell source text, got "
                        f"{type(path_or_source).__name__}")
    return path_or_source, "<string>"


def decode_cell(data: bytes, filename: str) -> str:
    """The text of a `.cell` file; a CellError at the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise CellError(line, column, f"byte 0x{data[err.start]:02x} is not UTF-8 text; "
                        "save the file as UTF-8", filename) from None


def load(path_or_source: str | os.PathLike[str]) -> CompiledCell:
    """Compile a cell (a `.cell` path or source text) once, cached on disk; see docs/api.md."""
    text, filename = read_source(path_or_source)
    return _load(_cache.key("cell-text", text, analysis_fingerprint()), text, filename, None)


def load_ir(ir: CellIR) -> CompiledCell:
    """Compile a cell from its IR (the Python frontend)."""
    import sympy as sp

    identity = repr((ir.name, ir.states, ir.inputs, ir.params, ir.outputs,
                     [(e.target, e.kind, sp.srepr(e.expr)) for e in ir.equations]))
    return _load(_cache.key("cell-ir", identity, analysis_fingerprint()), "", ir.filename, ir)


def cell(
    *,
    states: str | Iterable[str],
    inputs: str | Iterable[str] = (),
    params: str | Iterable[str] | Mapping[str, str] = (),
    outputs: str | Iterable[str] = (),
    name: str | None = None,
) -> Callable[[Callable[..., Any]], CompiledCell]:
    """Decorator (`paracompile.cell`): turn a Python step function into a compiled cell (like
    `load`), traced by `_frontend.trace`."""

    def wrap(fn: Callable[..., Any]) -> CompiledCell:
        from ._frontend import trace

        return load_ir(trace(fn, states=states, inputs=inputs, params=params, outputs=outputs,
                             name=name))

    return wrap


def _compile_meta(key: str, text: str, filename: str,
                  ir: CellIR | None) -> tuple[_Compiler, CellMeta]:
    compiler = _Compiler(text, filename, ir)
    meta_path = _cache.module_path(key, "meta").with_suffix(".json")
    meta = _read_meta(meta_path, key)
    if meta is not None:
        return compiler, meta
    check_name(compiler.ir)  # parses: syntax errors come before any other work
    meta = metadata(compiler.analysis, key)
    _cache.write_atomic(meta_path, meta.to_json())
    return compiler, meta


def _read_meta(path: Path, key: str) -> CellMeta | None:
    """The cached metadata for `key`; None when it is missing, or damaged (then deleted,
    with a CacheWarning)."""
    try:
        meta = CellMeta.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:  # truncated or garbled: not JSON, not UTF-8, or fields missing
        meta = None
    if meta is not None and meta.key == key:
        return meta
    _cache.discard(path, "the damaged cell metadata")
    return None


# A cell's name is part of file names: its built module and its cache entries (with numba's
# files, which add about 75 characters to it); most file systems allow 255 bytes.
MAX_NAME_LENGTH = 100
_NAME_AT = r"(?<![A-Za-z0-9_]){}(?![A-Za-z0-9_])"


def check_name(ir: CellIR) -> None:
    """A CellError, at the cell's name, for a name that cannot name its files and modules."""
    module = ir.snake_name
    if len(ir.name) > MAX_NAME_LENGTH:
        problem = (f"the cell name is {len(ir.name)} characters long; at most "
                   f"{MAX_NAME_LENGTH} fit in file names")
    elif keyword.iskeyword(module):
        problem = (f"cell {ir.name} would be built as the module {module!r}, a Python keyword "
                   "that cannot be imported; choose another name")
    else:
        return
    line, column = _name_position(ir)
    raise CellError(line, column, problem, ir.filename)


def _name_position(ir: CellIR) -> tuple[int, int]:
    """(line, column) of the name in the cell statement (the first statement, so the first
    occurrence of the name outside a comment)."""
    lines = ir.source.splitlines()
    for i, line in enumerate(lines, 1):
        match = re.search(_NAME_AT.format(re.escape(ir.name)), line.split("#", 1)[0])
        if match:
            return i, match.start() + 1
    pos = next(iter(ir.positions.values()), None)  # a traced cell: its function
    return (pos.line, pos.column) if pos else (1, 1)


def build(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
          force: bool = False) -> Path:
    """Write `out_dir/<snake_name>.py`: a module exposing the cell's `apply`, `structure`,
    `Layer` and `step`, with every kernel's source inside (no SymPy, Lark or Jinja needed).

    Without `force`, refuses (FileExistsError) to replace a file that is not an unedited
    module built by paracompile, and (ShadowingError, a ValueError) to write a module whose
    name would shadow a standard library or installed module."""
    text, filename = read_source(path)
    key = _cache.key("cell-text", text, analysis_fingerprint())
    compiler, meta = _compile_meta(key, text, filename, None)
    snake = compiler.ir.snake_name
    target = Path(out_dir) / f"{snake}.py"
    replace = force or _is_unedited_build(target)
    if not force:
        _check_not_shadowing(snake, target)
        if target.exists() and not replace:
            raise _exists(target)
    targets = [("cpu", "float32"), ("cpu", "float64"), ("torch", "any")]
    targets += [(t, d) for t in ("cuda", "cudasim") for d in ("float32", "float64")]
    sources = {f"{t}/{d}": render_module(compiler.analysis, meta, t, d) for t, d in targets}
    # the file name goes into a docstring: escaped so that quotes, backslashes or newlines
    # in it cannot end the string
    source_name = repr(Path(filename).name)[1:-1].replace('"', '\\"')
    lines = [
        f'"""The {meta.name} cell (structure {meta.structure}), built by paracompile '
        f'{__version__} from {source_name}.',
        "",
        "Do not edit: rebuild with `paracompile build`. Needs torch, numba and the paracompile",
        "runtime (not SymPy, Lark or Jinja). Use it like `paracompile.load(...)`:",
        f"    import {snake}",
        f"    out = {snake}.apply(inputs, params, h0=None, method=\"auto\", backend=\"auto\")",
        '"""',
        "",
        "from paracompile._runtime import cell_from_sources",
        "",
        f"META = {meta.to_dict()!r}",
        "",
        f"SOURCES = {sources!r}",
        "",
        f"PACKAGE = {_cache.package_fingerprint()!r}  # the paracompile it was built by",
        "",
        "cell = cell_from_sources(META, SOURCES, PACKAGE)",
        "apply = cell.apply",
        "step = cell.step",
        "Layer = cell.Layer",
        "name = cell.name",
        "states = cell.states",
        "inputs = cell.inputs",
        "params = cell.params",
        "outputs = cell.outputs",
        "structure = cell.structure",
    ]
    # the checksum line marks the file as paracompile's own, unedited: a rebuild may replace it
    try:
        _cache.write_atomic(target, _cache.with_checksum("\n".join(lines)), overwrite=replace)
    except FileExistsError:  # created meanwhile, by someone else
        raise _exists(target) from None
    return target


def _exists(target: Path) -> FileExistsError:
    return FileExistsError(f"{target} exists and is not an unedited module built by "
                           "paracompile; remove it, or pass force=True (paracompile build "
                           "--force) to overwrite it")


def _is_unedited_build(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return _cache.checked_source(text) is not None


class ShadowingError(ValueError):
    """`build` refused a module name that would hide another module."""


def _check_not_shadowing(module: str, target: Path) -> None:
    """ShadowingError when `module` is also the name of a standard library module or of an
    importable one that paracompile did not build: a built module named `json` would break
    `import json` for every script run next to it."""
    if module in sys.stdlib_module_names:
        what = "a standard library module"
    else:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        origin = spec and spec.origin
        if spec is None or (origin and (Path(origin).resolve() == target.resolve()
                                        or _is_unedited_build(Path(origin)))):
            return  # nothing, this very file, or another build (of this cell, likely)
        what = f"an importable module ({origin})" if origin else "an importable module"
    raise ShadowingError(f"the cell's module name {module!r} is also the name of {what}: "
                         f"writing {target} would shadow it. Rename the cell, or pass "
                         "force=True (paracompile build --force)")


class _Compiler:
    """Parses and analyses a cell only when something is missing from the cache.

    `loaded`: set once `load` has returned. A parse after that (the metadata came from the
    cache, a kernel module did not) is for rendering only: the cell's warnings belong to the
    load, so they are not raised again in the middle of an `apply`."""

    def __init__(self, text: str, filename: str, ir: CellIR | None) -> None:
        self._text, self._filename, self._ir = text, filename, ir
        self._analysis = None
        self.loaded = False

    @property
    def ir(self) -> CellIR:
        if self._ir is None:
            from ._parse import parse_cell

            self._ir = parse_cell(self._text, self._filename, warn=not self.loaded)
        return self._ir

    @property
    def analysis(self):
        if self._analysis is None:
            from ._analyse import analyse

            STAGE_COUNTS["analyse"] += 1
            self._analysis = analyse(self.ir)
        return self._analysis


def metadata(analysis, key: str) -> CellMeta:
    ir = analysis.ir
    return CellMeta(
        name=ir.name,
        version=__version__,
        key=key,
        states=tuple(ir.states),
        inputs=tuple(ir.inputs),
        params={p.name: p.kind for p in ir.params},
        inits={p.name: (p.init.distribution, tuple(p.init.args)) if p.init else None
               for p in ir.params},
        outputs=tuple(ir.outputs),
        structure=analysis.structure,
        jac_entries=tuple((int(i), int(j)) for i, j in analysis.jac_entries),
        source=ir.source,
    )


def render_module(analysis, meta: CellMeta, target: str, dtype: str) -> str:
    from ._codegen import render
    from ._printers import torch_step_source

    STAGE_COUNTS["render"] += 1
    if target == "torch":
        return ("# Generated by paracompile: the pure-torch step of cell "
                f"{meta.name} (the reference backend).\nimport torch\n\n\n"
                + torch_step_source(analysis.ir))
    return render(analysis, target, dtype, meta)  # type: ignore[arg-type]


def _load(key: str, text: str, filename: str, ir: CellIR | None) -> CompiledCell:
    compiler, meta = _compile_meta(key, text, filename, ir)
    stem = meta.name.lower()

    def module(target: str, dtype: str) -> ModuleType:
        module_key = _cache.key("module", key, target, dtype, target_fingerprint(target))
        mod, _ = _cache.load_module(
            module_key, f"{stem}_{target}_{dtype}",
            lambda: render_module(compiler.analysis, meta, target, dtype))
        return mod

    torch_step = module("torch", "any").torch_step
    compiler.loaded = True
    # a cell from `.cell` text is made again from it (e.g. to unpickle one of its layers)
    loader = functools.partial(load, text) if text else None
    return CompiledCell(meta, cache(module), torch_step, loader)

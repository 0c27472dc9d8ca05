"""Lower an `Analysis` to the source of a numba module: print SymPy expressions as scalar
functions (`_printers.KernelPrinter`, from the function registry), then render the kernel
skeletons (Jinja, StrictUndefined) around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import jinja2
import sympy as sp

from ._analyse import Analysis
from ._meta import CellMeta
from ._printers import KernelPrinter, fast_imports, known_functions, libm_helpers
from .functions import where

CHANNEL_BLOCK = 64  # channels per CPU task: long enough to vectorise, short enough to balance

Target = Literal["cpu", "cuda", "cudasim"]
DType = Literal["float32", "float64"]


@dataclass(frozen=True)
class ScalarFunction:
    """A straight-line per-channel function: ``def name(*args): body; return results``."""

    name: str
    args: tuple[str, ...]
    body: tuple[tuple[str, str], ...]  # (temporary, code)
    results: tuple[str, ...]


def _names(analysis: Analysis) -> dict[sp.Symbol, str]:
    """The printed names of the user's symbols and the matrix-product symbols.

    Disjoint by construction: user names get a one-letter prefix and "_" (s_, x_, p_); every
    generated name is letters then digits (u0, md0 here; t0, ct0, cy0, gv0 for temporaries and
    cotangents), and the module's own names (F, ONE, ZERO, math, np, sigmoid_, ...) are
    neither. Generated symbols are `sp.Dummy`, never equal to a user's symbol of the same name.
    """
    names: dict[sp.Symbol, str] = {}
    for s in analysis.states:
        names[s] = f"s_{s.name}"
    for x in analysis.inputs:
        names[x] = f"x_{x.name}"
    for p in analysis.params:
        names[p] = f"p_{p.name}"
    for m, t in enumerate(analysis.matvecs):
        names[t.u] = f"u{m}"
        names[t.mdiag] = f"md{m}"
    return names


def _selects(expr: sp.Expr) -> sp.Expr:
    """`expr` with each product ``where(c, 1, 0) * r`` written ``where(c, r, 0)`` (likewise
    ``where(c, 0, 1)``, and powers of these).

    The derivative of ``where(c, a, b)`` is ``where(c, 1, 0) * ∂a + where(c, 0, 1) * ∂b``;
    ∂a may be NaN or inf where c is false (``where(x > 0, log(x), 0)`` at x = 0), and
    0 * NaN is NaN. A select discards the untaken side.
    """
    if not expr.args:
        return expr
    args = [_selects(a) for a in expr.args]
    if isinstance(expr, sp.Pow) and _is_selector(args[0]) and args[1].is_Integer and args[1] > 0:
        return args[0]
    if isinstance(expr, sp.Mul):
        for i, factor in enumerate(args):
            if _is_selector(factor):
                c, a, b = factor.args
                rest = sp.Mul(*args[:i], *args[i + 1:])
                return where(c, _selects(a * rest), _selects(b * rest))
    return expr.func(*args)


def _is_selector(expr: sp.Expr) -> bool:
    return isinstance(expr, where) and {expr.args[1], expr.args[2]} == {sp.Integer(0),
                                                                         sp.Integer(1)}


def _function(
    name: str, args: list[sp.Symbol], exprs: list[sp.Expr], names: dict[sp.Symbol, str],
    printer_functions: dict[str, str],
) -> ScalarFunction:
    """Print `exprs` as one function of `args`, computing each common subexpression once."""
    temporaries = sp.numbered_symbols("t", cls=sp.Dummy, real=True)
    replacements, reduced = sp.cse([_selects(e) for e in exprs], symbols=temporaries,
                                   order="none")
    local = dict(names)
    for sym, _ in replacements:
        local[sym] = sym.name
    printer = KernelPrinter(local, printer_functions)
    body = tuple((sym.name, printer.doprint(value)) for sym, value in replacements)
    results = tuple(printer.doprint(e) for e in reduced)
    return ScalarFunction(name, tuple(local[a] for a in args), body, results)


def _vjp(outs: list[sp.Expr], cotangents: list[sp.Symbol], wrt: list[sp.Symbol]) -> list[sp.Expr]:
    """Σ_i cot_i ∂out_i/∂w for each w in `wrt`."""
    return [sp.Add(*(c * sp.diff(o, w) for o, c in zip(outs, cotangents, strict=True)))
            for w in wrt]


def scalar_functions(analysis: Analysis, target: Target, dtype: DType) -> list[ScalarFunction]:
    """The per-channel functions the kernel skeletons call (docs/internal-interfaces.md)."""
    a = analysis
    names = _names(a)
    fns = known_functions(target, dtype)
    states, inputs, params = list(a.states), list(a.inputs), list(a.params)
    us = [t.u for t in a.matvecs]
    mds = [t.mdiag for t in a.matvecs]
    cot = [sp.Dummy(f"ct{i}", real=True) for i in range(len(states))]
    cot_y = [sp.Dummy(f"cy{j}", real=True) for j in range(len(a.outputs))]
    names.update({c: c.name for c in cot + cot_y})
    new, outs = list(a.new_states), list(a.outputs)
    base = states + inputs + params
    jac = [a.jacobian[i, j] for i, j in a.jac_entries]
    everything = new + outs
    cots = cot + cot_y
    result = [
        _function("step", base + us, everything, names, fns),
        _function("step_jac", base + us + mds, new + jac, names, fns),
        _function("step_vjp", base + us + cots,
                  _vjp(everything, cots, states + inputs + params + us), names, fns),
    ]
    if a.matvecs:
        gv = [sp.Dummy(f"gv{m}", real=True) for m in range(len(us))]
        names.update({g: g.name for g in gv})
        operands = [t.operand for t in a.matvecs]
        result += [
            _function("operands", base, operands, names, fns),
            _function("operands_vjp", base + gv, _vjp(operands, gv, states + inputs + params),
                      names, fns),
        ]
    return result


# -- rendering -------------------------------------------------------------------------------

def templates_dir() -> Path:
    """The kernel templates: inside the installed package, or `templates/` of a checkout."""
    packaged = Path(str(resources.files("paracompile"))) / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_sources(family: str) -> str:
    """The text of the templates a target family ("cpu", "cuda", "torch") renders from."""
    if family == "torch":
        return ""
    root = templates_dir()
    paths = [root / "module.py.jinja", *sorted(root.glob(f"{family}*.jinja")),
             *sorted(root.glob(f"_{family}*.jinja"))]
    return "".join(p.read_text() for p in paths)


def render(analysis: Analysis, target: Target, dtype: DType, meta: CellMeta) -> str:
    """The complete source of the generated module for one (cell, target, dtype)."""
    a = analysis
    staged = bool(a.matvecs)
    if staged and target != "cpu":
        raise NotImplementedError(
            f"cell {a.ir.name}: the CUDA backend does not support matrix parameters yet "
            "(structure dense); use backend='cpu' or 'torch'")
    kernels = {"cpu": "cpu_dense.py.jinja" if staged else "cpu.py.jinja",
               "cuda": "cuda.py.jinja", "cudasim": "cuda.py.jinja"}[target]
    context = {
        "k": a.k,
        "m": len(a.inputs),
        "q": len(a.params),
        "o": len(a.outputs),
        "n_matvecs": len(a.matvecs),
        "n_matrices": len(a.matrices),
        "matvec_matrix": [a.matrices.index(t.matrix) for t in a.matvecs],
        "param_kinds": [p.kind for p in a.ir.params if p.kind != "matrix"],
        "jac_entries": [list(e) for e in a.jac_entries],
        "dtype": dtype,
        "simulator": target == "cudasim",
    }
    return _environment().get_template("module.py.jinja").render(
        target=target,
        meta=meta,
        meta_repr=repr(meta.to_dict()),
        channel_block=CHANNEL_BLOCK,
        functions=scalar_functions(a, target, dtype),
        fast_imports=fast_imports(target, dtype),
        libm_helpers=libm_helpers(target, dtype),
        kernels=kernels,
        **context,
    )

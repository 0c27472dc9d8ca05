"""Lower an `Analysis` to the source of a numba module: print SymPy expressions as scalar
functions (a `PythonCodePrinter` subclass and a table of known functions), then render the
kernel skeletons (Jinja, StrictUndefined) around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import jinja2
import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ._analyse import Analysis
from ._ir import primed
from .functions import where

CHANNEL_BLOCK = 64  # channels per CPU task: long enough to vectorise, short enough to balance

Target = Literal["cpu", "cuda", "cudasim"]
DType = Literal["float32", "float64"]

# name of a cell-language function -> how to print it: "{0}" is the first argument, etc.
_COMMON_FUNCTIONS = {
    "relu": "max({0}, ZERO)",
    "step": "(ONE if {0} > ZERO else ZERO)",
    "sign": "(ONE if {0} > ZERO else (-ONE if {0} < ZERO else ZERO))",
    "abs": "abs({0})",
    "min": "min({0}, {1})",
    "max": "max({0}, {1})",
    "ties": "(ONE if {0} == {1} else ZERO)",
    "greater": "(ONE if {0} > {1} else ZERO)",
    "where": "({1} if {0} != ZERO else {2})",  # a select: the untaken branch's NaN never leaks
    "sqrt": "math.sqrt({0})",
    "sin": "math.sin({0})",
    "cos": "math.cos({0})",
}
# float32 on the CPU: vectorisable approximations (numba on PyPI has no SVML); see _fastmath
_CPU_FLOAT32_FUNCTIONS = {
    "exp": "exp_f32({0})",
    "log": "log_f32({0})",
    "log1p": "log1p_f32({0})",
    "tanh": "tanh_f32({0})",
    "sigmoid": "sigmoid_f32({0})",
    "softplus": "softplus_f32({0})",
    "logsigmoid": "logsigmoid_f32({0})",
}
# float64 on the CPU, and CUDA (libdevice): the math library
_LIBM_FUNCTIONS = {
    "exp": "math.exp({0})",
    "log": "math.log({0})",
    "log1p": "math.log1p({0})",
    "tanh": "math.tanh({0})",
    "sigmoid": "sigmoid_({0})",
    "softplus": "softplus_({0})",
    "logsigmoid": "(-softplus_(-({0})))",
}


def known_functions(target: Target, dtype: DType) -> dict[str, str]:
    special = _CPU_FLOAT32_FUNCTIONS if (target == "cpu" and dtype == "float32") else (
        _LIBM_FUNCTIONS)
    return {**_COMMON_FUNCTIONS, **special}


class KernelPrinter(PythonCodePrinter):
    """Prints per-channel SymPy expressions as numba scalar code.

    Numbers are wrapped in the kernel dtype (`F(0.5)`): a bare Python literal would promote a
    float32 computation to float64 in numba and halve the vector width.
    """

    def __init__(self, names: dict[sp.Symbol, str], functions: dict[str, str]) -> None:
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self._names = names
        self._functions = functions

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return self._names[expr]

    _print_Dummy = _print_Symbol

    def _print_Function(self, expr: sp.Function) -> str:
        name = type(expr).__name__
        if name not in self._functions:
            raise NotImplementedError(f"no kernel code for function {name!r}")
        return self._functions[name].format(*(self._print(a) for a in expr.args))

    # SymPy's own printers for these names would bypass the table
    _print_tanh = _print_exp = _print_log = _print_log1p = _print_sin = _print_cos = (
        _print_sign) = _print_Function

    def _number(self, value: sp.Expr) -> str:
        return f"F({float(value)!r})"

    def _print_Integer(self, expr: sp.Integer) -> str:
        return {0: "ZERO", 1: "ONE"}.get(int(expr), self._number(expr))

    _print_Rational = _print_Float = _print_Half = _number
    _print_NegativeOne = _print_Integer

    def _print_Zero(self, expr: sp.Expr) -> str:
        return "ZERO"

    def _print_One(self, expr: sp.Expr) -> str:
        return "ONE"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exp = expr.args
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
        if exp == 1:
            return self._print(base)
        if exp == -1:
            return f"(ONE / {b})"
        if exp == sp.Rational(1, 2):
            return f"math.sqrt({self._print(base)})"
        if exp == -sp.Rational(1, 2):
            return f"(ONE / math.sqrt({self._print(base)}))"
        if exp.is_Integer and 2 <= abs(int(exp)) <= 4:  # repeated products vectorise; pow may not
            prod = " * ".join([b] * abs(int(exp)))
            return f"({prod})" if exp > 0 else f"(ONE / ({prod}))"
        return f"({b} ** {self._print(exp)})"

    def _print_Heaviside(self, expr: sp.Expr) -> str:  # unused by our derivatives; safety
        return f"(ONE if {self._print(expr.args[0])} > ZERO else ZERO)"


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
    """The kernel templates, `paracompile/templates/` (package data, shipped in the wheel)."""
    return Path(str(resources.files("paracompile"))) / "templates"


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


def render(analysis: Analysis, target: Target, dtype: DType, meta: dict) -> str:
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
        meta_repr=repr(meta),
        channel_block=CHANNEL_BLOCK,
        functions=scalar_functions(a, target, dtype),
        kernels=kernels,
        **context,
    )


# -- the torch reference step ----------------------------------------------------------------

# Names in the generated torch step are disjoint by construction: each of the user's names gets
# a one-letter prefix and "_" (s_ states, x_ inputs, p_ params, i_ intermediates, n_ new
# states, o_ outputs); no other name has "_" as its second character (torch, torch_step,
# states, inputs, params, _like, _c0, ... and the helpers below).
_TORCH_HELPERS = '''
def _min(a, b):  # on ties the first argument, as the kernels' derivative of min
    return torch.where(a <= b, a, b)


def _max(a, b):
    return torch.where(a >= b, a, b)


def _greater(a, b):
    return (a > b).to(a.dtype)


def _ties(a, b):
    return (a == b).to(a.dtype)


def _gate(c, v):
    # v, with its gradient kept only where c: the branch where() does not take may have NaN
    # or inf derivatives there (sqrt, log out of their domain), and 0 * NaN would leak into v
    return torch.where(c, v, v.detach())


def _full(v, like):
    # a result (a number, a () or (D,) tensor, or a (B, D) one) as a tensor shaped like `like`
    if not isinstance(v, torch.Tensor):
        return like.new_full(like.shape, v)
    return v if v.shape == like.shape else v.expand(like.shape)
'''

_TORCH_FUNCTIONS = {
    "sigmoid": "torch.sigmoid({0})",
    "tanh": "torch.tanh({0})",
    "exp": "torch.exp({0})",
    "log": "torch.log({0})",
    "log1p": "torch.log1p({0})",
    "softplus": "torch.nn.functional.softplus({0})",
    "logsigmoid": "torch.nn.functional.logsigmoid({0})",
    "relu": "torch.relu({0})",
    "abs": "torch.abs({0})",
    "sqrt": "torch.sqrt({0})",
    "sin": "torch.sin({0})",
    "cos": "torch.cos({0})",
    "min": "_min({0}, {1})",
    "max": "_max({0}, {1})",
    "greater": "_greater({0}, {1})",
    "ties": "_ties({0}, {1})",
}


def _literal(expr: sp.Expr) -> str | None:
    """A constant expression as a Python float literal; None if SymPy cannot evaluate it
    (``sigmoid(1)``: torch computes it)."""
    try:
        value = float(expr)
    except TypeError:
        return None
    if not math.isfinite(value):
        return f'float("{value}")'
    return repr(value) if value >= 0 else f"({value!r})"


class TorchPrinter(PythonCodePrinter):
    """Prints the cell's equations, as the user wrote them, as torch code (the reference).

    Every function receives tensors (a constant argument becomes a 0-d tensor of the step's
    dtype), so a function of constants is a tensor too. ``where`` is a select whose branches
    are gated (`_gate`): each branch's values pass gradient only where it is taken. The
    conditions are computed by statements (`setup`) printed before the equation.
    """

    def __init__(self, names: dict[str, str]) -> None:
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self._names = names
        self._gates: list[str] = []  # conditions of the where() branches being printed
        self._conditions = 0
        self.setup: list[str] = []

    def _print(self, expr, **kwargs) -> str:  # noqa: ANN001 - SymPy's signature
        if isinstance(expr, sp.Expr) and not expr.is_Number and not expr.free_symbols:
            literal = _literal(expr)  # sqrt(2), exp(1), pi: Python floats, not math.*
            if literal is not None:
                return literal
        return super()._print(expr, **kwargs)

    def _gated(self, text: str) -> str:
        for condition in self._gates:
            text = f"_gate({condition}, {text})"
        return text

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return self._gated(self._names[expr.name])

    def _arg(self, expr: sp.Expr) -> str:
        """A function argument, as a tensor (torch functions reject Python numbers)."""
        literal = None if expr.free_symbols else _literal(expr)
        return self._print(expr) if literal is None else f"_like.new_tensor({literal})"

    def _print_Function(self, expr: sp.Function) -> str:
        name = type(expr).__name__
        if name == "MatVec":  # u[b, i] = sum_j M[i, j] v[b, j]
            matrix, operand = expr.args
            # gate the product, not its operand: the operand's channels are mixed
            gates, self._gates = self._gates, []
            text = f"(({self._print(operand)}) @ {self._print(matrix)}.T)"
            self._gates = gates
            return self._gated(text)
        if name == "where":
            return self._print_where(expr)
        if name not in _TORCH_FUNCTIONS:
            raise NotImplementedError(f"no torch code for function {name!r}")
        return _TORCH_FUNCTIONS[name].format(*(self._arg(a) for a in expr.args))

    def _print_where(self, expr: sp.Function) -> str:
        c, a, b = expr.args
        condition = f"_c{self._conditions}"
        self._conditions += 1
        gates, self._gates = self._gates, []  # the comparison has no gradient to gate
        self.setup.append(f"{condition} = ({self._arg(c)}) != 0")
        self._gates = [*gates, condition]
        taken = self._arg(a)
        self._gates = [*gates, f"~{condition}"]
        other = self._arg(b)
        self._gates = gates
        return f"torch.where({condition}, {taken}, {other})"

    _print_tanh = _print_exp = _print_log = _print_log1p = _print_sin = _print_cos = (
        _print_Function)

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        return self._hprint_Pow(expr, rational=rational, sqrt="torch.sqrt")

    def _print_Rational(self, expr: sp.Rational) -> str:
        return repr(float(expr))

    _print_Float = _print_Half = _print_Rational


def torch_step_source(ir) -> str:
    """`def torch_step(states, inputs, params) -> (new_states, outputs)` for the reference,
    with the helpers it calls. Every result is a tensor shaped like the states."""
    names = {s: f"s_{s}" for s in ir.states}
    names.update({x: f"x_{x}" for x in ir.inputs})
    names.update({p.name: f"p_{p.name}" for p in ir.params})
    names.update({primed(s): f"n_{s}" for s in ir.states})
    names.update({eq.target: ("i_" if eq.kind == "intermediate" else "o_") + eq.target
                  for eq in ir.equations if eq.kind != "update"})
    printer = TorchPrinter(names)
    params = [p.name for p in ir.params]
    lines = [
        "def torch_step(states, inputs, params):",
        f"    ({''.join(names[s] + ', ' for s in ir.states)}) = states",
        f"    ({''.join(names[x] + ', ' for x in ir.inputs)}) = inputs",
        f"    ({''.join(names[p] + ', ' for p in params)}) = params",
        "    _like = states[0]  # the dtype, device and shape of every result",
    ]
    for eq in ir.equations:
        target = names[primed(eq.target)] if eq.kind == "update" else names[eq.target]
        code = printer.doprint(eq.expr)
        lines += [f"    {statement}" for statement in printer.setup]
        printer.setup.clear()
        lines.append(f"    {target} = {code}")
    new = "".join(f"_full({names[primed(s)]}, _like), " for s in ir.states)
    outs = "".join(f"_full({names[y]}, _like), " for y in ir.outputs)
    lines.append(f"    return ({new}), ({outs})")
    return _TORCH_HELPERS.lstrip("\n") + "\n\n" + "\n".join(lines) + "\n"

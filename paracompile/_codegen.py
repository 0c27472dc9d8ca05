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
from ._ir import MatVec, primed, symbol
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

    Disjoint by construction: user names get a one-letter prefix and "_" (s_, x_, p_ here;
    i_ intermediates, n_ new states, o_ outputs in `_function`); every generated name is
    letters then digits (u0, md0 here; t0, ct0, cy0, gv0 for temporaries and cotangents), and
    the module's own names (F, ONE, ZERO, math, np, sigmoid_, affine_apply, ...) are neither.
    Generated symbols are `sp.Dummy`, never equal to a user's symbol of the same name.
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
    printer_functions: dict[str, str], known: dict[sp.Expr, str] | None = None,
    result_names: list[str] | None = None,
) -> ScalarFunction:
    """Print `exprs` as one function of `args`, computing each common subexpression once.

    A common subexpression whose value is in `known` (a user intermediate's value -> its
    printed name) gets that name, so the code reads like the cell; the other temporaries are
    t0, t1, .... With `result_names`, the results are assigned to these names first.
    """
    temporaries = sp.numbered_symbols("t", cls=sp.Dummy, real=True)
    replacements, reduced = sp.cse([_selects(e) for e in exprs], symbols=temporaries,
                                   order="none")
    local = dict(names)
    expanded: dict[sp.Symbol, sp.Expr] = {}  # each temporary's value over the arguments
    taken: set[str] = set()
    for sym, value in replacements:
        expanded[sym] = value.xreplace(expanded)
        readable = (known or {}).get(expanded[sym])
        local[sym] = readable if readable and readable not in taken else sym.name
        taken.add(local[sym])
    printer = KernelPrinter(local, printer_functions)
    body = [(local[sym], printer.doprint(value)) for sym, value in replacements]
    results = [printer.doprint(e) for e in reduced]
    if result_names:
        body += zip(result_names, results, strict=True)
        results = list(result_names)
    return ScalarFunction(name, tuple(local[a] for a in args), tuple(body), tuple(results))


def _intermediate_names(analysis: Analysis) -> dict[sp.Expr, str]:
    """Each user intermediate's value (over states, inputs, params and the u_m symbols, as in
    `Analysis.new_states`) -> ``i_<name>``: disjoint from every other printed name (no other
    name starts with "i_"). Where two intermediates have one value, the first names it."""
    values: dict[sp.Symbol, sp.Expr] = {}
    products = {(t.matrix, t.operand): t.u for t in analysis.matvecs}
    known: dict[sp.Expr, str] = {}
    for eq in analysis.ir.equations:
        value = eq.expr.xreplace(values)
        value = value.xreplace({mv: products[(str(mv.args[0]), mv.args[1])]
                                for mv in value.atoms(MatVec)
                                if (str(mv.args[0]), mv.args[1]) in products})
        if eq.kind == "intermediate":
            values[symbol(eq.target)] = value
            for form in (value, _selects(value)):
                known.setdefault(form, f"i_{eq.target}")
        elif eq.kind == "update":
            values[symbol(primed(eq.target))] = value
    return known


def _vjp(outs: list[sp.Expr], cotangents: list[sp.Symbol], wrt: list[sp.Symbol]) -> list[sp.Expr]:
    """Σ_i cot_i ∂out_i/∂w for each w in `wrt`."""
    return [sp.Add(*(c * sp.diff(o, w) for o, c in zip(outs, cotangents, strict=True)))
            for w in wrt]


def scalar_functions(analysis: Analysis, target: Target, dtype: DType) -> list[ScalarFunction]:
    """The per-channel functions the kernel skeletons call (docs/internal-interfaces.md)."""
    a = analysis
    names = _names(a)
    known = _intermediate_names(a)
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
    # the step's results named like the torch reference's: n_<state>, o_<output>
    new_names = [f"n_{s}" for s in a.ir.states]
    result = [
        _function("step", base + us, everything, names, fns, known,
                  new_names + [f"o_{y}" for y in a.ir.outputs]),
        _function("step_jac", base + us + mds, new + jac, names, fns, known),
        _function("step_vjp", base + us + cots,
                  _vjp(everything, cots, states + inputs + params + us), names, fns, known),
    ]
    if a.matvecs:
        gv = [sp.Dummy(f"gv{m}", real=True) for m in range(len(us))]
        names.update({g: g.name for g in gv})
        operands = [t.operand for t in a.matvecs]
        result += [
            _function("operands", base, operands, names, fns, known),
            _function("operands_vjp", base + gv, _vjp(operands, gv, states + inputs + params),
                      names, fns, known),
        ]
    return result


# -- the sparse affine-map algebra -----------------------------------------------------------

def _matrix(prefix: str, entries: tuple[tuple[int, int], ...]) -> dict[tuple[int, int], str]:
    return {(i, j): f"{prefix}{i}_{j}" for i, j in entries}


def _vector(prefix: str, k: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(k)]


def _sum(terms: list[str], last: str | None = None) -> str:
    return " + ".join([*terms, last] if last else terms)


def affine_functions(k: int, entries: tuple[tuple[int, int], ...]) -> list[ScalarFunction]:
    """Maps x -> A x + v of k-vectors, A with the nonzero pattern `entries` (closed under
    products, diagonal included: a composition keeps the pattern). Arguments are A's entries
    (row-major, as `entries`) then v, then the second map or the point x.

    affine_compose(first, second): second after first = (A2 A1, A2 v1 + v2).
    affine_apply(A, v, x): A x + v.
    The transposed versions are the adjoint maps l -> A^T l + v with A stored untransposed:
    affine_compose_transposed(first, second) = (A1 A2, A2^T v1 + v2) and
    affine_apply_transposed(A, v, x) = A^T x + v.
    Products are summed in index order, so each kernel computes them as it did by hand.
    """
    present = set(entries)
    a1, a2 = _matrix("first_A", entries), _matrix("second_A", entries)
    v1, v2 = _vector("first_v", k), _vector("second_v", k)
    a, v, x = _matrix("A", entries), _vector("v", k), _vector("x", k)
    inner = {e: [l for l in range(k) if (e[0], l) in present and (l, e[1]) in present]
             for e in entries}
    compose_args = (*a1.values(), *v1, *a2.values(), *v2)
    apply_args = (*a.values(), *v, *x)
    return [
        ScalarFunction("affine_compose", compose_args, (), (
            *(_sum([f"{a2[i, l]} * {a1[l, j]}" for l in inner[i, j]]) for i, j in entries),
            *(_sum([f"{a2[i, l]} * {v1[l]}" for l in range(k) if (i, l) in present], v2[i])
              for i in range(k)))),
        ScalarFunction("affine_apply", apply_args, (), tuple(
            _sum([f"{a[i, l]} * {x[l]}" for l in range(k) if (i, l) in present], v[i])
            for i in range(k))),
        ScalarFunction("affine_compose_transposed", compose_args, (), (
            *(_sum([f"{a1[i, l]} * {a2[l, j]}" for l in inner[i, j]]) for i, j in entries),
            *(_sum([f"{a2[l, i]} * {v1[l]}" for l in range(k) if (l, i) in present], v2[i])
              for i in range(k)))),
        ScalarFunction("affine_apply_transposed", apply_args, (), tuple(
            _sum([f"{a[l, i]} * {x[l]}" for l in range(k) if (l, i) in present], v[i])
            for i in range(k))),
    ]


# -- rendering -------------------------------------------------------------------------------

_DEVICE_DECORATORS = {
    "cpu": '@njit(cache=True, forceinline=True, error_model="numpy")',
    "cuda": '@cuda.jit(device=True, inline="always")',
    "cudasim": '@cuda.jit(device=True, inline="always")',
}


@dataclass(frozen=True)
class RenderContext:
    """Everything the templates read (as ``ctx.<field>``); built by `render_context`."""

    target: Target
    """"cpu", "cuda" or "cudasim" (CUDA kernels for numba's simulator)."""
    dtype: DType
    """The kernels' float type, "float32" or "float64"."""
    k: int
    """Number of states (per channel)."""
    m: int
    """Number of inputs."""
    q: int
    """Number of vector and scalar params (matrix params are counted by `n_matrices`)."""
    o: int
    """Number of declared outputs."""
    param_kinds: tuple[str, ...]
    """"vector" or "scalar" for each of the q params, in declaration order."""
    jac_entries: tuple[tuple[int, int], ...]
    """The (i, j) of the per-channel k×k Jacobian ∂s'_i/∂s_j that can be nonzero, closed
    under products, diagonal included, row-major; step_jac returns them in this order."""
    n_matvecs: int
    """Number of matrix products M @ operand (dense cells; 0 otherwise)."""
    n_matrices: int
    """Number of matrix params."""
    matvec_matrix: tuple[int, ...]
    """For each matrix product, the index of its matrix among the matrix params."""
    channel_block: int
    """Channels per CPU task: long enough to vectorise, short enough to balance."""
    simulator: bool
    """CUDA only: warp shuffles emulated through shared memory (the simulator has none)."""
    device_decorator: str
    """The decorator of an inlined scalar device function on this target."""
    functions: tuple[ScalarFunction, ...]
    """The cell's per-channel functions: step, step_jac, step_vjp (+ operands, operands_vjp
    for dense cells); docs/internal-interfaces.md."""
    affine_functions: tuple[ScalarFunction, ...]
    """The sparse affine-map algebra over `jac_entries` (see `affine_functions`)."""
    kernel_args: dict[str, tuple[str, ...]]
    """Kernel name -> its argument names, in calling order (the kernels' interface)."""
    legend: tuple[str, ...]
    """Comment lines at the top of the module: kernel argument name -> the user's name."""
    meta: object
    """The cell metadata: the templates read its `name` and `version` and embed its repr."""
    kernels: str
    """The template of the target's kernels, included after the scalar functions."""

    @property
    def meta_repr(self) -> str:
        """The metadata as a Python literal, embedded in the module as META."""
        return repr(self.meta)

    def numbered(self, prefix: str, n: int, index: str = "") -> list[str]:
        """``prefix0{index}, ..., prefix{n-1}{index}``: one per state, input, ...; `index`
        is a subscript such as ``"[cur + d]"``."""
        return [f"{name}{index}" for name in _vector(prefix, n)]

    def entries(self, prefix: str, index: str = "") -> list[str]:
        """``prefix{i}_{j}{index}`` for each Jacobian entry (i, j), in `jac_entries` order."""
        return [f"{name}{index}" for name in _matrix(prefix, self.jac_entries).values()]

    def params_at(self, channel: str, zero: str) -> list[str]:
        """Each param's value for one channel: ``p{j}[channel]`` (vector) or ``p{j}[zero]``."""
        return [f"p{j}[{channel if kind == 'vector' else zero}]"
                for j, kind in enumerate(self.param_kinds)]


def _kernel_args(k: int, m: int, q: int, o: int, entries: tuple[tuple[int, int], ...],
                 n_matrices: int, target: Target) -> dict[str, tuple[str, ...]]:
    """Argument names of every kernel, in calling order. Each group is one flat array per
    state, input, ...: h0_ initial states, x inputs, p params, M matrices, s states, y
    outputs, g<group> their gradients; Newton's work arrays: fval f(h_{t-1}) at each step, jac
    the Jacobian entries, chunk_A / chunk_v each time chunk's affine map, carry each chunk's
    incoming Newton delta."""
    h0, x, p, s, y = (_vector("h0_", k), _vector("x", m), _vector("p", q), _vector("s", k),
                      _vector("y", o))
    gs, gy, gh0, gx, gp = (_vector("gs", k), _vector("gy", o), _vector("gh0_", k),
                           _vector("gx", m), _vector("gp", q))
    if target != "cpu":
        return {
            "newton_kernel": (*h0, *x, *p, *s, *y, "status", "resid", "B", "T", "D", "chunk",
                              "iterations", "tol"),
            "sequential_kernel": ("idx", *h0, *x, *p, *s, *y, "B", "T", "D"),
            "backward_kernel": (*gs, *gy, *h0, *x, *p, *s, *gh0, *gx, *gp, "B", "T", "D",
                                "chunk"),
            "backward_sequential_kernel": (*gs, *gy, *h0, *x, *p, *s, *gh0, *gx, *gp, "B", "T",
                                           "D"),
        }
    mats, gmats = _vector("M", n_matrices), _vector("gM", n_matrices)
    fval, carry = _vector("fval", k), _vector("carry", k)
    jac = list(_matrix("jac", entries).values())
    chunk = [*_matrix("chunk_A", entries).values(), *_vector("chunk_v", k)]
    inputs = (*h0, *x, *p, *mats)
    return {
        "forward_sequential": (*inputs, *s, *y, "mask", "B", "T", "D"),
        "newton_guess": (*inputs, *s, "B", "T", "D", "LT"),
        "newton_linearise": (*inputs, *s, *fval, *jac, *chunk, "resid", "scale", "B", "T", "D",
                             "LT"),
        "newton_carry": (*chunk, *carry, "B", "nt", "D"),
        "newton_fixup": (*fval, *jac, *carry, *s, "B", "T", "D", "LT"),
        "forward_outputs": (*inputs, *s, *y, "B", "T", "D", "LT"),
        "backward_adjoint": (*gs, *gy, *inputs, *s, *gh0, *gx, *gp, *gmats, "B", "T", "D"),
    }


def _legend(analysis: Analysis) -> tuple[str, ...]:
    """Comment lines naming what each kernel argument group holds, in the user's names."""
    a = analysis
    ir = a.ir
    kinds = {p.name: p.kind for p in ir.params}
    vector_params = [p.name for p in ir.params if p.kind != "matrix"]
    matrices = list(a.matrices)
    items = [f"h0_{i} = initial state {s}" for i, s in enumerate(ir.states)]
    items += [f"s{i} = state {s}" for i, s in enumerate(ir.states)]
    items += [f"x{i} = input {x}" for i, x in enumerate(ir.inputs)]
    items += [f"p{j} = param {n} ({kinds[n]})" for j, n in enumerate(vector_params)]
    items += [f"M{j} = param {n} (matrix)" for j, n in enumerate(matrices)]
    items += [f"y{i} = output {y}" for i, y in enumerate(ir.outputs)]
    items += [f"jac{i}_{j} = d{ir.states[i]}'/d{ir.states[j]}" for i, j in a.jac_entries]
    items.append("g<name> = the gradient of <name>")
    lines = ["# Kernel arguments (flat arrays) in the cell's names:"]
    line = "#  "
    for item in (f"{text};" for text in items):
        if len(line) + 1 + len(item) > 99:
            lines.append(line)
            line = "#  "
        line += " " + item
    lines.append(line.rstrip(";"))
    return tuple(lines)


def kernel_context(
    target: Target, dtype: DType, *, k: int, m: int, o: int, param_kinds: tuple[str, ...],
    jac_entries: tuple[tuple[int, int], ...], functions: tuple[ScalarFunction, ...],
    legend: tuple[str, ...] = (), meta: object = None, n_matrices: int = 0,
    matvec_matrix: tuple[int, ...] = (),
) -> RenderContext:
    """A RenderContext from the kernels' shape (`render_context` for a cell; the CUDA tests
    render hand-written `functions` with it)."""
    q = len(param_kinds)
    return RenderContext(
        target=target,
        dtype=dtype,
        k=k,
        m=m,
        q=q,
        o=o,
        param_kinds=tuple(param_kinds),
        jac_entries=tuple((int(i), int(j)) for i, j in jac_entries),
        n_matvecs=len(matvec_matrix),
        n_matrices=n_matrices,
        matvec_matrix=tuple(matvec_matrix),
        channel_block=CHANNEL_BLOCK,
        simulator=target == "cudasim",
        device_decorator=_DEVICE_DECORATORS[target],
        functions=tuple(functions),
        affine_functions=tuple(affine_functions(k, tuple(jac_entries))),
        kernel_args=_kernel_args(k, m, q, o, tuple(jac_entries), n_matrices, target),
        legend=legend,
        meta=meta,
        kernels={"cpu": "cpu_dense.py.jinja" if matvec_matrix else "cpu.py.jinja",
                 "cuda": "cuda.py.jinja", "cudasim": "cuda.py.jinja"}[target],
    )


def render_context(analysis: Analysis, target: Target, dtype: DType, meta: object
                   ) -> RenderContext:
    """The typed context of `render` for one (cell, target, dtype)."""
    a = analysis
    if a.matvecs and target != "cpu":
        raise NotImplementedError(
            f"cell {a.ir.name}: the CUDA backend does not support matrix parameters yet "
            "(structure dense); use backend='cpu' or 'torch'")
    return kernel_context(
        target, dtype, k=a.k, m=len(a.inputs), o=len(a.outputs),
        param_kinds=tuple(p.kind for p in a.ir.params if p.kind != "matrix"),
        jac_entries=tuple(a.jac_entries), functions=tuple(scalar_functions(a, target, dtype)),
        legend=_legend(a), meta=meta, n_matrices=len(a.matrices),
        matvec_matrix=tuple(a.matrices.index(t.matrix) for t in a.matvecs))


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
             *sorted(root.glob(f"_{family}*.jinja")), *sorted(root.glob("_device*.jinja"))]
    return "".join(p.read_text() for p in paths)


def render_with(ctx: RenderContext) -> str:
    """The complete source of the generated module for a context."""
    return _environment().get_template("module.py.jinja").render(ctx=ctx)


def render(analysis: Analysis, target: Target, dtype: DType, meta: object) -> str:
    """The complete source of the generated module for one (cell, target, dtype)."""
    return render_with(render_context(analysis, target, dtype, meta))


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

"""Lower an `Analysis` to the source of a numba module: print SymPy expressions as scalar
functions (`_printers.KernelPrinter`, from the function registry), then render the kernel
skeletons (Jinja, StrictUndefined) around them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import jinja2
import sympy as sp

from ._analyse import Analysis
from ._ir import MatVec, primed, symbol
from ._meta import CellMeta
from ._printers import KernelPrinter, fast_imports, known_functions, libm_helpers
from .functions import where

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
    local.update(_temporary_names(replacements, known or {}, lambda sym: sym.name))
    printer = KernelPrinter(local, printer_functions)
    body = [(local[sym], printer.doprint(value)) for sym, value in replacements]
    results = [printer.doprint(e) for e in reduced]
    if result_names:
        body += zip(result_names, results, strict=True)
        results = list(result_names)
    return ScalarFunction(name, tuple(local[a] for a in args), tuple(body), tuple(results))


def _temporary_names(
    temporaries: list[tuple[sp.Symbol, sp.Expr]], known: dict[sp.Expr, str],
    fallback: Callable[[sp.Symbol], str],
) -> dict[sp.Symbol, str]:
    """The printed name of each temporary (symbol, value), in order: the user intermediate's
    ``i_<name>`` where its value over the arguments is in `known` (each name once), else
    `fallback(symbol)`."""
    printed: dict[sp.Symbol, str] = {}
    expanded: dict[sp.Symbol, sp.Expr] = {}  # each temporary's value over the arguments
    for sym, value in temporaries:
        expanded[sym] = value.xreplace(expanded)
        readable = known.get(expanded[sym])
        taken = readable in printed.values()
        printed[sym] = readable if readable and not taken else fallback(sym)
    return printed


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


def _vjp_function(
    name: str, args: list[sp.Symbol], outs: list[sp.Expr], cotangents: list[sp.Symbol],
    wrt: list[sp.Symbol], names: dict[sp.Symbol, str], printer_functions: dict[str, str],
    known: dict[sp.Expr, str],
) -> ScalarFunction:
    """Print Σ_i cot_i ∂out_i/∂w for each w in `wrt` as one function of `args`.

    Reverse mode (backpropagation over the CSE'd outputs, as an autograd tape would): each
    common subexpression's adjoint is computed once and shared, so ParaLSTM's vjp needs about
    a quarter fewer vector operations than the symbolic Σ_i cot_i ∂out_i/∂w (forward mode),
    and the backward kernel is bound by exactly these operations (docs/benchmarks.md).
    Steps with a select (`where`, directly or in a derivative) keep forward mode: there
    `_selects` discards the untaken side of each derivative as a whole, where an adjoint
    flowing through a shared subexpression could carry its NaN or inf (0 * inf).
    """
    backpropagated = _backpropagate([_selects(e) for e in outs], cotangents, wrt)
    if backpropagated is None:
        return _function(name, args, _vjp(outs, cotangents, wrt), names, printer_functions,
                         known)
    assignments, results = backpropagated
    # one more CSE over everything (temporaries and adjoints as atoms): the adjoints share
    # factors such as 1 - sigmoid
    extra, reduced_all = sp.cse([v for _, v in assignments] + results,
                                symbols=sp.numbered_symbols("w", cls=sp.Dummy), order="none")
    defined = dict(extra)
    defined.update(zip((s for s, _ in assignments), reduced_all[:len(assignments)], strict=True))
    results = reduced_all[len(assignments):]
    # a temporary that is only another name for a symbol or a number is not printed
    aliases = {sym: value for sym, value in defined.items() if value.is_Atom}
    while aliases:
        defined = {sym: value.xreplace(aliases) for sym, value in defined.items()
                   if sym not in aliases}
        results = [r.xreplace(aliases) for r in results]
        aliases = {sym: value for sym, value in defined.items() if value.is_Atom}
    return _print_assignments(name, args, defined, results, names, printer_functions, known)


def _backpropagate(
    forward: list[sp.Expr], cotangents: list[sp.Symbol], wrt: list[sp.Symbol],
) -> tuple[list[tuple[sp.Symbol, sp.Expr]], list[sp.Expr]] | None:
    """The tape of Σ_i cot_i ∂forward_i/∂w: the forward temporaries then the adjoints, each
    (symbol, value) after those it reads, and the gradient of each w in `wrt` over them.
    None where the step or a derivative has a select (`where`)."""
    if any(e.has(where) for e in forward):
        return None
    temporaries = sp.numbered_symbols("t", cls=sp.Dummy)
    replacements, reduced = _lift_applications(
        *sp.cse(forward, symbols=temporaries, order="none"), temporaries)
    targets = {sym for sym, _ in replacements} | set(wrt)
    # a derivative that repeats a forward value (sigmoid' = sigmoid (1 - sigmoid)) reads it
    forward_values = {value: sym for sym, value in replacements}
    adjoint_terms: dict[sp.Symbol, list[sp.Expr]] = {}

    def push(expr: sp.Expr, adjoint: sp.Expr) -> bool:
        for y in sorted(expr.free_symbols & targets, key=sp.default_sort_key):
            d = sp.diff(expr, y).xreplace(forward_values)
            if d.has(where):
                return False
            if d != 0:
                adjoint_terms.setdefault(y, []).append(adjoint * d)
        return True

    if not all(push(o, c) for o, c in zip(reduced, cotangents, strict=True)):
        return None
    tape: list[tuple[sp.Symbol, sp.Expr]] = []  # (adjoint symbol, its value), last-use order
    for sym, value in reversed(replacements):
        if sym in adjoint_terms:
            adjoint = sp.Dummy(f"adj{len(tape)}")
            tape.append((adjoint, sp.Add(*adjoint_terms.pop(sym))))
            if not push(value, adjoint):
                return None
    return replacements + tape, [sp.Add(*adjoint_terms.get(w, [])) for w in wrt]


def _lift_applications(
    replacements: list[tuple[sp.Symbol, sp.Expr]], reduced: list[sp.Expr],
    temporaries: Iterator[sp.Symbol],
) -> tuple[list[tuple[sp.Symbol, sp.Expr]], list[sp.Expr]]:
    """`sp.cse`'s output with every function application (tanh(...), sigmoid(...), ...) a
    temporary of its own: CSE leaves one that is used once inline, and its derivative
    (1 - tanh^2) would then evaluate it again."""
    lifted: list[tuple[sp.Symbol, sp.Expr]] = []
    named: dict[sp.Expr, sp.Symbol] = {}

    def lift(expr: sp.Expr) -> sp.Expr:
        if expr.is_Atom:
            return expr
        args = [lift(a) for a in expr.args]
        expr = expr.func(*args) if args != list(expr.args) else expr
        if not isinstance(expr, sp.Function):
            return expr
        if expr not in named:
            named[expr] = next(temporaries)
            lifted.append((named[expr], expr))
        return named[expr]

    for sym, value in replacements:
        if isinstance(value, sp.Function):  # already a temporary of its own
            value = value.func(*(lift(a) for a in value.args))
            named.setdefault(value, sym)
        else:
            value = lift(value)
        lifted.append((sym, value))
    return lifted, [lift(r) for r in reduced]


def _print_assignments(
    name: str, args: list[sp.Symbol], defined: dict[sp.Symbol, sp.Expr], results: list[sp.Expr],
    names: dict[sp.Symbol, str], printer_functions: dict[str, str], known: dict[sp.Expr, str],
) -> ScalarFunction:
    """A function computing `results` from `args` through the temporaries `defined`
    (symbol -> value over args and other temporaries), each assigned once, after those it
    reads, in the order the results first need them. Temporaries are printed t0, t1, ...
    (adjoints adj0, ...), or, where the value over the arguments is a user intermediate's
    (`known`), i_<name>."""
    order: list[sp.Symbol] = []
    seen: set[sp.Symbol] = set()

    def visit(expr: sp.Expr) -> None:  # depth-first: a temporary after what it reads
        for y in sorted(expr.free_symbols & defined.keys(), key=sp.default_sort_key):
            if y in seen:
                continue
            seen.add(y)
            visit(defined[y])
            order.append(y)

    for r in results:
        visit(r)
    counters = {"t": 0, "adj": 0}

    def numbered(sym: sp.Symbol) -> str:
        prefix = "adj" if sym.name.startswith("adj") else "t"
        counters[prefix] += 1
        return f"{prefix}{counters[prefix] - 1}"

    local = dict(names)
    local.update(_temporary_names([(sym, defined[sym]) for sym in order], known, numbered))
    printer = KernelPrinter(local, printer_functions)
    body = tuple((local[sym], printer.doprint(defined[sym])) for sym in order)
    return ScalarFunction(name, tuple(local[a] for a in args), body,
                          tuple(printer.doprint(r) for r in results))


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
        _vjp_function("step_vjp", base + us + cots, everything, cots,
                      states + inputs + params + us, names, fns, known),
    ]
    if a.matvecs:
        gv = [sp.Dummy(f"gv{m}", real=True) for m in range(len(us))]
        names.update({g: g.name for g in gv})
        operands = [t.operand for t in a.matvecs]
        result += [
            _function("operands", base, operands, names, fns, known),
            _vjp_function("operands_vjp", base + gv, operands, gv, states + inputs + params,
                          names, fns, known),
        ]
    return result


CPU_LINES_AT_ONCE = 4
"""Cache lines of channels the CPU backward computes per iteration (`interleaved` ways)."""


def interleaved(f: ScalarFunction, ways: int) -> ScalarFunction:
    """`f` for `ways` independent channels at once, statement by statement: ``{name}_x{ways}``
    takes each channel's arguments in turn and returns each channel's results in turn.

    The backward's vectorised loop computes several cache lines of channels per iteration so
    that the core overlaps their long sigmoid/tanh dependency chains. Called once per line,
    `f`'s inlined copies follow one another, and the out-of-order window (about a hundred
    vector operations) holds one chain at a time; interleaved, it holds all of them
    (docs/benchmarks.md). Channel w's names are ``w{w}_<name>``: a digit before the first
    "_" is in no user name (one letter, then "_") and no other generated name.
    """
    local = set(f.args) | {name for name, _ in f.body}

    def rename(code: str, w: int) -> str:
        return re.sub(r"\b[A-Za-z_]\w*\b",
                      lambda m: f"w{w}_{m[0]}" if m[0] in local else m[0], code)

    return ScalarFunction(
        f"{f.name}_x{ways}",
        tuple(f"w{w}_{a}" for w in range(ways) for a in f.args),
        tuple((f"w{w}_{name}", rename(code, w)) for name, code in f.body for w in range(ways)),
        tuple(rename(r, w) for w in range(ways) for r in f.results))


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
    # fastmath "contract" only: a * b + c may become one FMA (one rounding, not two); no
    # reassociation, no NaN/inf assumptions. ParaLSTM's backward kernel ran about 20% faster
    # with it (docs/benchmarks.md).
    "cpu": '@njit(cache=True, forceinline=True, error_model="numpy", fastmath={"contract"})',
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
    simulator: bool
    """CUDA only: rendered for numba's simulator (plain `@cuda.jit`, no cache or reg. cap)."""
    device_decorator: str
    """The decorator of an inlined scalar device function on this target."""
    fast_imports: tuple[str, ...]
    """The float32 fast-math functions (`_fastmath`) the module's code calls (CPU float32)."""
    libm_helpers: tuple[str, ...]
    """Definitions of the helper device functions (``def sigmoid_(x): ...``) the module's
    code calls, from the function registry."""
    functions: tuple[ScalarFunction, ...]
    """The cell's per-channel functions: step, step_jac, step_vjp (+ operands, operands_vjp
    for dense cells; + step_vjp_x<lines_at_once>, `interleaved`, for the CPU backward of the
    others); docs/internal-interfaces.md."""
    lines_at_once: int
    """CPU backward: cache lines of channels per iteration of its vectorised loop."""
    affine_functions: tuple[ScalarFunction, ...]
    """The sparse affine-map algebra over `jac_entries` (see `affine_functions`)."""
    kernel_args: dict[str, tuple[str, ...]]
    """Kernel name -> its argument names, in calling order (the kernels' interface)."""
    legend: tuple[str, ...]
    """Comment lines at the top of the module: kernel argument name -> the user's name."""
    meta: CellMeta | None
    """The cell metadata: the templates read its `name` and `version` and embed it (None
    only for kernels rendered alone, as the CUDA tests do)."""
    kernels: str
    """The template of the target's kernels, included after the scalar functions."""

    @property
    def meta_repr(self) -> str:
        """The metadata as a Python literal, embedded in the module as META."""
        return repr(self.meta.to_dict() if self.meta is not None else None)

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
                 n_matrices: int, target: Target, n_matvecs: int = 0
                 ) -> dict[str, tuple[str, ...]]:
    """Argument names of every kernel, in calling order. Each group is one flat array per
    state, input, ...: h0_ initial states, x inputs, p params, M matrices, s states, y
    outputs, g<group> their gradients; Newton's work arrays: fval f(h_{t-1}) at each step, jac
    the Jacobian entries, chunk_A / chunk_v each time chunk's affine map, carry each chunk's
    incoming Newton delta. The CPU kernels then take the sizes B, T, D (newton_carry: the time
    chunks nt for T), CH the channels per task (`_defaults.cpu_channel_block`) and LT the time
    steps per Newton task."""
    h0, x, p, s, y = (_vector("h0_", k), _vector("x", m), _vector("p", q), _vector("s", k),
                      _vector("y", o))
    gs, gy, gh0, gx, gp = (_vector("gs", k), _vector("gy", o), _vector("gh0_", k),
                           _vector("gx", m), _vector("gp", q))
    if target != "cpu" and n_matrices:
        return _dense_cuda_kernel_args(h0, x, p, s, y, gs, gy, gh0, gx, gp,
                                       n_matrices=n_matrices, n_matvecs=n_matvecs)
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
        "forward_sequential": (*inputs, *s, *y, "mask", "B", "T", "D", "CH"),
        "newton_guess": (*inputs, *s, "B", "T", "D", "CH", "LT"),
        "newton_linearise": (*inputs, *s, *fval, *jac, *chunk, "resid", "scale", "B", "T", "D",
                             "CH", "LT"),
        "newton_carry": (*chunk, *carry, "B", "nt", "D", "CH"),
        "newton_fixup": (*fval, *jac, *carry, *s, "B", "T", "D", "CH", "LT"),
        "forward_outputs": (*inputs, *s, *y, "B", "T", "D", "CH", "LT"),
        "backward_adjoint": (*gs, *gy, *inputs, *s, *gh0, *gx, *gp, *gmats, "B", "T", "D",
                             "CH"),
    }


def _dense_cuda_kernel_args(*groups: list[str], n_matrices: int, n_matvecs: int
                            ) -> dict[str, tuple[str, ...]]:
    """The CUDA kernels of a dense cell (`cuda_dense.py.jinja`): M the matrices, MT their
    transposes, and per matrix product its cotangent gu and operand v at every step.
    `groups`: the names h0, x, p, s, y, gs, gy, gh0, gx, gp of `_kernel_args`."""
    h0, x, p, s, y, gs, gy, gh0, gx, gp = groups
    mats, mats_t = _vector("M", n_matrices), _vector("MT", n_matrices)
    gu, v = _vector("gu", n_matvecs), _vector("v", n_matvecs)
    return {
        "dense_sequential_kernel": (*h0, *x, *p, *mats_t, *s, *y, "B", "T", "D"),
        "dense_backward_kernel": (*gs, *gy, *h0, *x, *p, *mats, *mats_t, *s, *gh0, *gx, *gp,
                                  *gu, *v, "B", "T", "D"),
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
    legend: tuple[str, ...] = (), meta: CellMeta | None = None, n_matrices: int = 0,
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
        simulator=target == "cudasim",
        device_decorator=_DEVICE_DECORATORS[target],
        fast_imports=tuple(fast_imports(target, dtype)),
        libm_helpers=tuple(libm_helpers(target, dtype)),
        functions=tuple(functions) + tuple(
            interleaved(f, CPU_LINES_AT_ONCE) for f in functions
            if f.name == "step_vjp" and target == "cpu" and not matvec_matrix),
        lines_at_once=CPU_LINES_AT_ONCE,
        affine_functions=tuple(affine_functions(k, tuple(jac_entries))),
        kernel_args=_kernel_args(k, m, q, o, tuple(jac_entries), n_matrices, target,
                                 len(matvec_matrix)),
        legend=legend,
        meta=meta,
        kernels=("cpu" if target == "cpu" else "cuda") + ("_dense" if matvec_matrix else "")
        + ".py.jinja",
    )


def render_context(analysis: Analysis, target: Target, dtype: DType, meta: CellMeta
                   ) -> RenderContext:
    """The typed context of `render` for one (cell, target, dtype)."""
    a = analysis
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


def render(analysis: Analysis, target: Target, dtype: DType, meta: CellMeta) -> str:
    """The complete source of the generated module for one (cell, target, dtype)."""
    return render_with(render_context(analysis, target, dtype, meta))


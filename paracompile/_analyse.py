"""Symbolic analysis (SymPy): new states as expressions, the Jacobian, its proven structure,
and the partial derivatives the backward pass needs.

All expressions are per channel. A matrix product ``M @ E`` is replaced by a symbol ``u_m``
(its value at this channel); ``mdiag_m`` stands for ``M[c, c]``, so the channel-diagonal
block of the Jacobian of a dense cell is exact. Both are `sp.Dummy` symbols (printed ``_u0``,
``_mdiag0``), distinct from any user symbol of the same name and equal in equal cells.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import sympy as sp

from ._errors import CellError
from ._ir import CellIR, Equation, MatVec, primed, symbol
from .functions import FUNCTIONS


@dataclass(frozen=True)
class MatVecTerm:
    """``u = M @ operand``: ``u`` and ``mdiag`` (= M[c, c]) are per-channel symbols."""

    matrix: str
    operand: sp.Expr
    u: sp.Symbol
    mdiag: sp.Symbol


@dataclass(frozen=True)
class Analysis:
    ir: CellIR
    states: tuple[sp.Symbol, ...]
    inputs: tuple[sp.Symbol, ...]
    params: tuple[sp.Symbol, ...]  # vector and scalar params, in declaration order
    matrices: tuple[str, ...]
    matvecs: tuple[MatVecTerm, ...]
    new_states: tuple[sp.Expr, ...]  # over states, inputs, params and the u_m symbols
    outputs: tuple[sp.Expr, ...]
    jacobian: sp.Matrix  # k×k channel-diagonal block ∂s'_i/∂s_j (exact unless dense)
    pattern: tuple[tuple[bool, ...], ...]  # not proven zero
    structure: str  # "diagonal", "block(K)" or "dense"

    def readable(self, expr: sp.Expr) -> sp.Expr:
        """`expr` with the user's intermediates (and primed states) folded back in by name."""
        for eq in self.ir.equations:
            if eq.kind == "output":
                continue
            name = eq.target if eq.kind == "intermediate" else primed(eq.target)
            expr = expr.xreplace({eq.expr: symbol(name)})
        for t in self.matvecs:
            expr = expr.xreplace({t.u: sp.Symbol(f"({t.matrix} @ {sp.sstr(t.operand)})")})
        return expr

    @property
    def k(self) -> int:
        return len(self.states)

    @property
    def block_size(self) -> int:
        return _largest_component(self.pattern)

    @property
    def dense(self) -> bool:
        return self.structure == "dense"

    @cached_property
    def jac_entries(self) -> tuple[tuple[int, int], ...]:
        """Nonzero (i, j) of the Jacobian closed under products (diagonal included), row-major:
        where a product of step Jacobians can be nonzero."""
        k = self.k
        reach = [[self.pattern[i][j] or i == j for j in range(k)] for i in range(k)]
        for m in range(k):  # Floyd–Warshall transitive closure
            for i in range(k):
                if reach[i][m]:
                    for j in range(k):
                        reach[i][j] = reach[i][j] or reach[m][j]
        return tuple((i, j) for i in range(k) for j in range(k) if reach[i][j])


def analyse(ir: CellIR) -> Analysis:
    """Substitute intermediates, extract matrix products, differentiate, prove zeros.

    Raises CellError for a matrix product whose operand depends on another matrix product
    (the kernels compute every operand from the states before any product).
    """
    states = tuple(symbol(s) for s in ir.states)
    inputs = tuple(symbol(x) for x in ir.inputs)
    params = tuple(symbol(p.name) for p in ir.params if p.kind != "matrix")
    matrices = tuple(p.name for p in ir.params if p.kind == "matrix")

    values: dict[sp.Symbol, sp.Expr] = {}
    matvecs: dict[sp.Expr, MatVecTerm] = {}

    def resolve(eq: Equation) -> sp.Expr:
        for mv in sorted(eq.expr.atoms(MatVec), key=sp.default_sort_key):
            _check_not_chained(ir, eq, mv, values, tuple(matvecs.values()))
        expr = eq.expr.xreplace(values)
        for mv in sorted(expr.atoms(MatVec), key=sp.default_sort_key):
            if mv not in matvecs:
                m = len(matvecs)
                # Dummy symbols: never equal to a user's symbol of the same name (`_u0`);
                # a fixed index makes them equal across analyses of equal cells
                matvecs[mv] = MatVecTerm(str(mv.args[0]), mv.args[1],
                                         sp.Dummy(f"u{m}", dummy_index=m, real=True),
                                         sp.Dummy(f"mdiag{m}", dummy_index=m, real=True))
            expr = expr.xreplace({mv: matvecs[mv].u})
        return expr

    new_states: dict[str, sp.Expr] = {}
    outputs: list[sp.Expr] = []
    finals: list[tuple[Equation, sp.Expr]] = []  # updates and outputs, with their equations
    for eq in ir.equations:
        value = resolve(eq)
        if eq.kind == "intermediate":
            values[symbol(eq.target)] = value
            continue
        if eq.kind == "update":
            new_states[eq.target] = value
            values[symbol(primed(eq.target))] = value
        else:
            outputs.append(value)
        finals.append((eq, value))
    ns = tuple(new_states[s] for s in ir.states)
    terms = tuple(matvecs.values())

    jac = sp.Matrix(len(states), len(states),
                    lambda i, j: total_derivative(ns[i], states[j], terms))
    _check_float_range(ir, finals, states + inputs + params + tuple(t.u for t in terms))
    pattern = tuple(tuple(not is_zero(jac[i, j]) for j in range(len(states)))
                    for i in range(len(states)))
    acts_on_state = any(
        not is_zero(sp.diff(t.operand, s)) and any(not is_zero(sp.diff(f, t.u)) for f in ns)
        for t in terms for s in states
    )
    if acts_on_state:
        structure = "dense"
    else:
        size = _largest_component(pattern)
        structure = "diagonal" if size == 1 else f"block({size})"
    return Analysis(ir, states, inputs, params, matrices, terms, ns, tuple(outputs), jac,
                    pattern, structure)


def _check_float_range(ir: CellIR, finals: list[tuple[Equation, sp.Expr]],
                       variables: tuple[sp.Symbol, ...]) -> None:
    """CellError if an update or output, or one of its derivatives (what the kernels and the
    backward pass evaluate), holds a number beyond the float64 range: SymPy folds
    ``(h * 1e300) * 1e300`` into an exact 10**600, which no backend can represent (the kernels
    would see inf where float arithmetic in the written order might not overflow)."""
    for eq, value in finals:
        for expr in (value, *(sp.diff(value, v) for v in variables)):
            huge = [n for n in expr.atoms(sp.Number) if abs(n) > FLOAT64_MAX]
            if huge:
                what = f"{eq.target}'" if eq.kind == "update" else f"output {eq.target}"
                raise CellError(eq.pos.line, eq.pos.column,
                                f"{what} (or its derivative) holds the number "
                                f"{sp.Float(huge[0], 3)}, beyond the float64 range (about "
                                "1.8e308) once constants are folded; rescale the cell",
                                ir.filename)


def _check_not_chained(ir: CellIR, eq: Equation, mv: MatVec, values: dict[sp.Symbol, sp.Expr],
                       terms: tuple[MatVecTerm, ...]) -> None:
    """CellError if the operand of `mv` (as written in `eq`) depends on a matrix product,
    directly or through an intermediate or a primed state."""
    matrix, operand = mv.args

    def reject(inner: str, through: str) -> None:
        raise CellError(eq.pos.line, eq.pos.column,
                        f"the operand of {matrix} @ ... depends on the matrix product "
                        f"{inner} @ ...{through}; chained matrix products are not supported yet",
                        ir.filename)

    for inner in sorted(operand.atoms(MatVec), key=sp.default_sort_key):
        reject(str(inner.args[0]), "")
    for name in sorted(operand.free_symbols, key=sp.default_sort_key):
        value = values.get(name)
        for t in terms:
            if value is not None and value.has(t.u):
                via = name.name if name.name.endswith("'") else repr(name.name)
                reject(t.matrix, f" (through {via})")


def total_derivative(expr: sp.Expr, var: sp.Symbol, terms: tuple[MatVecTerm, ...]) -> sp.Expr:
    """∂expr/∂var at one channel, including the path through each u_m = M @ E_m (whose
    same-channel coefficient is mdiag_m)."""
    result = sp.diff(expr, var)
    for t in terms:
        d_operand = sp.diff(t.operand, var)
        if d_operand != 0:
            result += sp.diff(expr, t.u) * t.mdiag * d_operand
    return result


# Larger expressions are not handed to `sp.simplify` (unproven, so treated as nonzero: sound).
MAX_PROOF_OPS = 400
FLOAT64_MAX = sp.Float(1.7976931348623157e308)


def is_zero(expr: sp.Expr) -> bool:
    """True only when SymPy proves `expr` is identically zero (unproven counts as nonzero).

    Evaluating at random points first is only a shortcut: a nonzero value disproves zero
    cheaply; zero everywhere tried still needs SymPy's simplification to count as proven.
    """
    if expr == 0 or expr.is_zero is True:
        return True
    nonzero = _nonzero_somewhere(expr)
    if nonzero is not False:  # nonzero, or no finite value anywhere: unproven either way
        return False
    if sp.count_ops(expr) > MAX_PROOF_OPS:  # simplify can take minutes on deep expressions
        return False
    try:
        if sp.simplify(expr) == 0:
            return True
        # sigmoid(x) + sigmoid(-x) - 1 and the like: prove it in terms of exp
        rewritten = expr.rewrite(sp.exp)
        return rewritten != expr and sp.simplify(rewritten) == 0
    except Exception:  # noqa: BLE001 - a failed proof is simply "not proven zero"
        return False


def _nonzero_somewhere(expr: sp.Expr, trials: int = 4) -> bool | None:
    """True if `expr` is clearly nonzero at a random point, False if it is (near) zero at
    every point where it has a finite value, None if it has a finite value at none (huge
    constants overflow everywhere: SymPy could then spend minutes factoring them)."""
    symbols = sorted(expr.free_symbols, key=sp.default_sort_key)
    fn = sp.lambdify(symbols, expr, modules=[numeric_functions(), "math"])
    rng = random.Random(0)
    finite = False
    for trial in range(trials):
        low = 0.2 if trial % 2 == 0 else -1.3  # positive points keep log/sqrt in domain
        point = [rng.uniform(low, 1.3) for _ in symbols]
        try:
            value = complex(fn(*point))
        except (ValueError, ZeroDivisionError, OverflowError, TypeError):
            continue
        if math.isfinite(abs(value)):
            if abs(value) > 1e-9:
                return True
            finite = True
    return False if finite else None


def numeric_functions() -> dict[str, Callable[..., float]]:
    """The pure-Python value of every registry function (and of ``MatVec``, whose operand
    stands in for the product), for `sp.lambdify`."""
    numeric = {name: f.numeric for name, f in FUNCTIONS.items() if f.numeric is not None}
    return {**numeric, "MatVec": lambda m, v: v}


def _largest_component(pattern: tuple[tuple[bool, ...], ...]) -> int:
    k = len(pattern)
    parent = list(range(k))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k):
        for j in range(k):
            if pattern[i][j]:
                parent[find(i)] = find(j)
    sizes: dict[int, int] = {}
    for i in range(k):
        sizes[find(i)] = sizes.get(find(i), 0) + 1
    return max(sizes.values())

"""The cell IR: what a `.cell` file or a traced Python function means, before any analysis.

Expressions are SymPy expressions over real symbols named after the declarations; a primed
state ``h'`` is the symbol ``h'``; ``M @ expr`` is ``MatVec(M, expr)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

ParamKind = Literal["vector", "scalar", "matrix"]
EquationKind = Literal["intermediate", "update", "output"]


@dataclass(frozen=True)
class Pos:
    line: int
    column: int


@dataclass(frozen=True)
class Init:
    """An initialisation hint for a parameter: ``uniform(lo, hi)``, ``normal(mean, std)``,
    ``constant(value)``."""

    distribution: Literal["uniform", "normal", "constant"]
    args: tuple[float, ...]


@dataclass(frozen=True)
class Param:
    name: str
    kind: ParamKind
    init: Init | None
    pos: Pos


@dataclass(frozen=True)
class Equation:
    target: str  # a name, or a state name for an update (without the prime)
    kind: EquationKind
    expr: sp.Expr
    pos: Pos


@dataclass(frozen=True)
class CellIR:
    name: str
    states: tuple[str, ...]
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    consts: dict[str, float]
    equations: tuple[Equation, ...]
    source: str = ""  # the text the IR came from (cache key); "" for traced functions
    filename: str = "<cell>"
    positions: dict[str, Pos] = field(default_factory=dict)  # declaration positions
    # the exact value of each const (`consts` has it as a float); a const missing here is
    # its float read as the decimal it prints as
    const_values: dict[str, sp.Expr] = field(default_factory=dict)

    def const_value(self, name: str) -> sp.Expr:
        """The exact value of const `name`, as the equations have it folded in."""
        if name in self.const_values:
            return self.const_values[name]
        return sp.Rational(repr(float(self.consts[name])))

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(eq.target for eq in self.equations if eq.kind == "output")

    @property
    def param_kinds(self) -> dict[str, ParamKind]:
        return {p.name: p.kind for p in self.params}

    @property
    def snake_name(self) -> str:
        return snake_case(self.name)

    def to_source(self) -> str:
        """The IR printed back as `.cell` text: parsing it gives an equal IR.

        Declarations come first (one ``param`` line per parameter, with its kind and init
        hint), then the equations in order. Numbers are exact (rationals as ``p/q``).
        Constants are folded into the equations when parsed; here a number (or constant
        expression) equal to a constant's value is printed as the constant's name, so the
        round trip keeps it (a constant whose value no longer appears as such, e.g. ``dt`` in
        ``dt * dt``, is still declared and is then reported unused by the parser).
        """
        lines = [f"cell {self.name}", "", f"state {', '.join(self.states)}"]
        if self.inputs:
            lines.append(f"input {', '.join(self.inputs)}")
        for p in self.params:
            init = ""
            if p.init is not None:
                init = f" ~ {p.init.distribution}({', '.join(map(_number, p.init.args))})"
            lines.append(f"param {p.name} : {p.kind}{init}")
        printer = _CellPrinter()
        values = {name: self.const_value(name) for name in self.consts}
        for name, value in values.items():
            lines.append(f"const {name} = {printer.doprint(value)}")
        lines.append("")
        exprs = _fold_consts([eq.expr for eq in self.equations], values)
        for eq, expr in zip(self.equations, exprs, strict=True):
            target = {"intermediate": eq.target, "update": primed(eq.target),
                      "output": f"output {eq.target}"}[eq.kind]
            lines.append(f"{target} = {printer.doprint(expr)}")
        return "\n".join(lines) + "\n"


def _fold_consts(exprs: list[sp.Expr], consts: dict[str, sp.Expr]) -> list[sp.Expr]:
    """Write numbers (and constant expressions) equal to a constant's exact value (or minus
    it) as the constant's name, so that the printed text uses every constant. Exponents are
    left alone (``sqrt(x)``, not ``x**half``) unless that is the only place a constant's value
    appears."""
    table: dict[sp.Expr, sp.Expr] = {}
    for name, value in consts.items():
        if value not in (0, 1, -1) and value not in table:
            table[value] = symbol(name)
            table[-value] = -symbol(name)

    def fold(expr: sp.Expr, exponents: bool) -> sp.Expr:
        if expr in table:
            return table[expr]
        if not expr.args:
            return expr
        if expr.is_Pow and not exponents:
            return sp.Pow(fold(expr.base, exponents), expr.exp)
        return expr.func(*(fold(a, exponents) for a in expr.args))

    out = [fold(e, exponents=False) for e in exprs]
    used = set().union(*(e.free_symbols for e in out)) if out else set()
    if any(symbol(name) not in used for name in consts):
        out = [fold(e, exponents=True) for e in exprs]
    return out


def _number(value: float) -> str:
    """A float as the shortest decimal that reads back as the same float."""
    if not math.isfinite(value):
        raise ValueError(f"{value!r} cannot be written in a .cell file")
    return repr(float(value))


class _CellPrinter(StrPrinter):
    """Prints IR expressions in the `.cell` language (see `CellIR.to_source`)."""

    def parenthesize(self, item, level, strict=False):  # noqa: ANN001, ANN201
        # '@' binds like '*' from the left: a product or power needs `(W @ (e))`; so does a
        # negated one (-1 * W @ e is printed at Add level, and '-W @ e' would parse as (-W) @ e)
        if isinstance(item, MatVec) and level >= PRECEDENCE["Add"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    def _print_MatVec(self, expr: sp.Expr) -> str:
        return f"{self._print(expr.args[0])} @ ({self._print(expr.args[1])})"

    def _print_Function(self, expr: sp.Expr) -> str:
        from .functions import cell_functions

        name = expr.func.__name__
        known = cell_functions()
        if name not in known or known[name].arity != len(expr.args):
            raise ValueError(f"{name}() cannot be written in the .cell language "
                             f"(known functions: {', '.join(sorted(known))})")
        return f"{name}({self.stringify(expr.args, ', ')})"

    def _print_greater(self, expr: sp.Expr) -> str:
        return f"({self._print(expr.args[0])} > {self._print(expr.args[1])})"

    def _print_ties(self, expr: sp.Expr) -> str:
        return f"({self._print(expr.args[0])} == {self._print(expr.args[1])})"

    def _print_Rational(self, expr: sp.Expr) -> str:
        # a decimal when one reads back exactly (0.1, -2.5), else p/q
        if expr.q != 1 and sp.Rational(repr(float(expr))) == expr:
            return repr(float(expr))
        return super()._print_Rational(expr)

    def _print_Abs(self, expr: sp.Expr) -> str:
        return f"abs({self._print(expr.args[0])})"

    def _print_Min(self, expr: sp.Expr) -> str:
        return self._nested("min", expr.args)

    def _print_Max(self, expr: sp.Expr) -> str:
        return self._nested("max", expr.args)

    def _nested(self, name: str, args: tuple[sp.Expr, ...]) -> str:
        text = self._print(args[-1])
        for arg in reversed(args[:-1]):
            text = f"{name}({self._print(arg)}, {text})"
        return text

    def _print_Exp1(self, expr: sp.Expr) -> str:
        return "exp(1)"

    def _print_NumberSymbol(self, expr: sp.Expr) -> str:  # pi and friends: as a float
        return _number(float(expr))

    _print_Pi = _print_GoldenRatio = _print_EulerGamma = _print_Catalan = _print_NumberSymbol

    def _print_Float(self, expr: sp.Expr) -> str:
        if expr._prec <= 53:  # a Python float: its shortest round-tripping decimal
            return _number(float(expr))
        return super()._print_Float(expr)

    def _print_Infinity(self, expr: sp.Expr) -> str:
        raise ValueError("infinity cannot be written in the .cell language")

    _print_NegativeInfinity = _print_ComplexInfinity = _print_NaN = _print_Infinity

    def _print_ImaginaryUnit(self, expr: sp.Expr) -> str:
        raise ValueError("complex numbers cannot be written in the .cell language")


class MatVec(sp.Function):
    """``M @ v``: the channel-mixing product of a (D, D) matrix parameter with a per-channel
    vector expression. Opaque to SymPy; the analysis treats it explicitly."""

    nargs = 2
    is_real = True


def symbol(name: str) -> sp.Symbol:
    """The SymPy symbol standing for a declared name (all values are real)."""
    return sp.Symbol(name, real=True)


def primed(state: str) -> str:
    return state + "'"


def snake_case(name: str) -> str:
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (name[i - 1].islower() or
                                   (i + 1 < len(name) and name[i + 1].islower()
                                    and name[i - 1].isupper())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)

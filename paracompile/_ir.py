"""The cell IR: what a `.cell` file or a traced Python function means, before any analysis.

Expressions are SymPy expressions over real symbols named after the declarations; a primed
state ``h'`` is the symbol ``h'``; ``M @ expr`` is ``MatVec(M, expr)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import sympy as sp

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

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(eq.target for eq in self.equations if eq.kind == "output")

    @property
    def param_kinds(self) -> dict[str, ParamKind]:
        return {p.name: p.kind for p in self.params}

    @property
    def snake_name(self) -> str:
        return snake_case(self.name)


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

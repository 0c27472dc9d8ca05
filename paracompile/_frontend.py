"""The Python frontend (docs/api.md): trace a function with SymPy symbols into the same `CellIR`.

    @paracompile.cell(states="h", inputs=("x_z", "x_h"), params=("a",))
    def MinGRU(h, x_z, x_h, a):
        z = sigmoid(x_z)
        return (1 - z) * h + z * x_h
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sympy as sp
from sympy.core.relational import Relational

from ._errors import CellError
from ._ir import CellIR, Equation, MatVec, Param, Pos, symbol
from ._parse import KEYWORDS, PARAM_KINDS
from .functions import cell_functions, indicator


class MatrixParam(sp.Symbol):
    """A (D, D) matrix parameter while tracing: usable only as ``M @ expr``."""

    def __matmul__(self, other: Any) -> sp.Expr:
        return MatVec(symbol(self.name), sp.sympify(other))

    def __new__(cls, name: str) -> MatrixParam:
        return super().__new__(cls, name, real=True)


def _names(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    for n in names:
        if not isinstance(n, str) or not n.isidentifier():
            raise TypeError(f"{what}: expected names (str), got {n!r}")
        if n in cell_functions() or n in KEYWORDS:
            raise ValueError(f"{what}: {n!r} is a built-in function or keyword of the cell "
                             "language; choose another name")
    return names


def trace(
    fn: Callable[..., Any],
    *,
    states: str | Iterable[str],
    inputs: str | Iterable[str] = (),
    params: str | Iterable[str] | Mapping[str, str] = (),
    outputs: str | Iterable[str] = (),
    name: str | None = None,
) -> CellIR:
    """Call `fn` on SymPy symbols and build the cell IR from what it returns.

    `fn` takes the states, inputs and params as keyword-compatible positional arguments in that
    order and returns the new states (a tuple in declared order when there are several),
    followed by the declared outputs.
    """
    state_names = _names(states, "states")
    if not state_names:
        raise ValueError("states: a cell needs at least one state")
    input_names = _names(inputs, "inputs")
    kinds = dict(params) if isinstance(params, Mapping) else dict.fromkeys(
        _names(params, "params"), "vector")
    _names(tuple(kinds), "params")
    output_names = _names(outputs, "outputs")
    for pname, kind in kinds.items():
        if kind not in PARAM_KINDS:
            raise ValueError(f"params[{pname!r}]: kind must be one of {PARAM_KINDS}, got {kind!r}")
    try:
        _, line = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<function>"
    except (OSError, TypeError):
        line, filename = 1, "<function>"
    pos = Pos(line, 1)
    all_names = state_names + input_names + tuple(kinds) + output_names
    duplicates = {n for n in all_names if all_names.count(n) > 1}
    if duplicates:
        raise CellError(line, 1, f"names declared twice: {sorted(duplicates)}", filename)

    args = [symbol(s) for s in state_names] + [symbol(x) for x in input_names] + [
        MatrixParam(p) if kind == "matrix" else symbol(p) for p, kind in kinds.items()
    ]
    arg_names = state_names + input_names + tuple(kinds)
    allowed = {symbol(n) for n in arg_names}  # matrices appear as plain symbols inside MatVec
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        raise CellError(line, 1, f"{fn.__name__}{inspect.signature(fn)} must take the states, "
                        f"inputs and params in this order: ({', '.join(arg_names)})",
                        filename) from None
    except ValueError:  # no signature (a builtin): just call it
        pass
    try:
        result = fn(*args)
    except TypeError as err:  # e.g. math.tanh on a symbol, or a matrix used wrongly
        raise CellError(line, 1, f"{fn.__name__} cannot be traced with symbols: {err}; use "
                        "the functions of paracompile.functions and write matrix products "
                        "as 'W @ expr'", filename) from None
    values = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    expected = len(state_names) + len(output_names)
    if len(values) != expected:
        raise CellError(
            line, 1,
            f"{fn.__name__} returned {len(values)} value(s); expected {expected}: the new "
            f"{', '.join(state_names)}" + (f" then the outputs {', '.join(output_names)}"
                                           if output_names else ""),
            filename,
        )
    equations = []
    for target, value, kind in zip(
        state_names + output_names,
        values,
        ["update"] * len(state_names) + ["output"] * len(output_names),
        strict=True,
    ):
        try:
            if isinstance(value, str):
                raise TypeError(value)
            expr = sp.sympify(value, strict=True)
            if isinstance(expr, Relational):  # `return x > 0`: the 0/1 value, as in .cell
                expr = indicator(expr)
        except (sp.SympifyError, TypeError):
            raise CellError(line, 1, f"the value returned for {target!r} is not an expression: "
                            f"{value!r}", filename) from None
        for bad in expr.free_symbols:
            if isinstance(bad, MatrixParam) or (
                kinds.get(str(bad)) == "matrix" and not _only_in_matvec(expr, str(bad))):
                raise CellError(line, 1, f"matrix {bad} cannot be used elementwise; only as "
                                f"'{bad} @ expr'", filename)
        for mv in expr.atoms(MatVec):
            if mv.args[1].has(MatVec):
                raise CellError(line, 1, f"nested matrix products ({mv.args[0]} @ (... @ ...)) "
                                "are not supported yet", filename)
        unknown = sorted(str(n) for n in expr.free_symbols - allowed)
        if unknown:
            raise CellError(line, 1, f"the value returned for {target!r} uses {', '.join(unknown)}"
                            ", which is not one of the traced arguments; declare it as a state, "
                            "input or param and use the argument", filename)
        equations.append(Equation(target, kind, expr, pos))  # type: ignore[arg-type]
    return CellIR(
        name=name or fn.__name__,
        states=state_names,
        inputs=input_names,
        params=tuple(Param(p, k, None, pos) for p, k in kinds.items()),  # type: ignore[arg-type]
        consts={},
        equations=tuple(equations),
        source="",
        filename=filename,
        positions=dict.fromkeys(all_names, pos),
    )


def _only_in_matvec(expr: sp.Expr, matrix: str) -> bool:
    stripped = expr.replace(lambda e: isinstance(e, MatVec), lambda *a: sp.Integer(0))
    return symbol(matrix) not in stripped.free_symbols

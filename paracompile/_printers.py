"""Printers of SymPy expressions, generated from the function registry
(`paracompile.functions.FUNCTIONS`): numba scalar code for the kernels (`KernelPrinter`, with
`known_functions`, `fast_imports` and `libm_helpers` for the module around it), and torch code
for the reference step (`TorchPrinter`, `torch_step_source`).
"""

from __future__ import annotations

import math
import re

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ._ir import CellIR, primed
from .functions import FUNCTIONS, CellFunction

# -- numba kernels ---------------------------------------------------------------------------


def _kernel_code(f: CellFunction, target: str, dtype: str) -> str:
    if f.fast and target == "cpu" and dtype == "float32":
        # vectorisable approximations: numba on PyPI has no SVML (see _fastmath)
        return f"{f.fast}({', '.join(f'{{{i}}}' for i in range(f.arity))})"
    if f.cuda and target != "cpu":
        return f.cuda
    return f.libm  # type: ignore[return-value] - every function with code has libm code


def known_functions(target: str, dtype: str) -> dict[str, str]:
    """Function name -> its numba code for a target ("cpu", "cuda", "cudasim") and dtype:
    "{0}" is the first argument, etc."""
    return {name: _kernel_code(f, target, dtype) for name, f in FUNCTIONS.items()
            if not f.expands}


def fast_imports(target: str, dtype: str) -> list[str]:
    """The `paracompile._fastmath` functions a generated module imports."""
    if (target, dtype) != ("cpu", "float32"):
        return []
    return sorted({f.fast for f in FUNCTIONS.values() if f.fast and not f.expands})


def libm_helpers(target: str, dtype: str) -> list[str]:
    """The helper definitions (``def sigmoid_(x): ...``) the module's function code calls,
    directly or through another helper, in registry order; each becomes a device function."""
    helpers = {f"{f.name}_": f.libm_helper for f in FUNCTIONS.values() if f.libm_helper}
    calling = list(known_functions(target, dtype).values())
    used: set[str] = set()
    while True:
        called = {name for name in helpers if name not in used
                  and any(re.search(rf"\b{re.escape(name)}\(", code) for code in calling)}
        if not called:
            return [text for name, text in helpers.items() if name in used]
        used |= called
        calling = [helpers[name] for name in called]


class KernelPrinter(PythonCodePrinter):
    """Prints per-channel SymPy expressions as numba scalar code.

    Numbers are wrapped in the kernel dtype (`F(0.5)`): a bare Python literal would promote a
    float32 computation to float64 in numba and halve the vector width.
    """

    def __init__(self, names: dict[sp.Symbol, str], functions: dict[str, str]) -> None:
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self._names = names
        self._functions = functions

    def _print(self, expr, **kwargs) -> str:  # noqa: ANN001 - SymPy's signature
        # the table's functions print from the table: SymPy's own printers for some of their
        # names (tanh, sign, ...) would bypass it
        if isinstance(expr, sp.Function) and type(expr).__name__ in self._functions:
            return self._print_Function(expr)
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        return self._names[expr]

    _print_Dummy = _print_Symbol

    def _print_Function(self, expr: sp.Function) -> str:
        name = type(expr).__name__
        if name not in self._functions:
            raise NotImplementedError(f"no kernel code for function {name!r}")
        return self._functions[name].format(*(self._print(a) for a in expr.args))

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


# -- the torch reference step ----------------------------------------------------------------

# Names in the generated torch step are disjoint by construction: each of the user's names gets
# a one-letter prefix and "_" (s_ states, x_ inputs, p_ params, i_ intermediates, n_ new
# states, o_ outputs); no other name has "_" as its second character (torch, torch_step,
# states, inputs, params, _like, _c0, ..., the helpers below and the registry's torch helpers).
_TORCH_HELPERS = '''
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


def torch_helpers() -> str:
    """The definitions the torch step calls: the registry's torch helpers, then the printer's."""
    registry = "".join(f"\n{f.torch_helper}\n\n" for f in FUNCTIONS.values() if f.torch_helper)
    return (registry + _TORCH_HELPERS).lstrip("\n")


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
        if isinstance(expr, sp.Function) and type(expr).__name__ in FUNCTIONS:
            return self._print_Function(expr)  # not SymPy's printer of the same name
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
        if name not in FUNCTIONS or FUNCTIONS[name].expands:
            raise NotImplementedError(f"no torch code for function {name!r}")
        if name == "where":
            return self._print_where(expr)
        code: str = FUNCTIONS[name].torch  # type: ignore[assignment] - set: it does not expand
        return code.format(*(self._arg(a) for a in expr.args))

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
        code: str = FUNCTIONS["where"].torch  # type: ignore[assignment] - set: a SymPy class
        return code.format(condition, taken, other)

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        return self._hprint_Pow(expr, rational=rational, sqrt="torch.sqrt")

    def _print_Rational(self, expr: sp.Rational) -> str:
        return repr(float(expr))

    _print_Float = _print_Half = _print_Rational


def torch_step_source(ir: CellIR) -> str:
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
    return torch_helpers() + "\n\n" + "\n".join(lines) + "\n"

"""The functions a cell may call, as SymPy functions with their (almost-everywhere) derivatives.

Use them in cells written as Python functions (``@paracompile.cell``)::

    from paracompile.functions import sigmoid, tanh
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import log1p
from sympy.core.relational import Relational


class _Evaluable(sp.Function):
    """A cell function whose value at numbers SymPy can compute (``evalf``, e.g. for a
    ``const`` or the parser's finiteness checks) through `_builtin`, its value written with
    SymPy's own functions."""

    def _builtin(self, *args: sp.Expr) -> sp.Expr:
        raise NotImplementedError

    def _eval_evalf(self, prec: int) -> sp.Expr | None:
        if not all(a.is_number for a in self.args):
            return None
        return self._builtin(*(a.evalf(prec) for a in self.args)).evalf(prec)


class sigmoid(_Evaluable):  # noqa: N801 - named as users write it
    """1 / (1 + exp(-x))."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return 1 / (1 + sp.exp(-x))

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        s = sigmoid(self.args[0])
        return s * (1 - s)

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        if x.is_zero:
            return sp.Rational(1, 2)
        return None

    def _eval_rewrite_as_exp(self, x: sp.Expr, **kwargs) -> sp.Expr:
        return 1 / (1 + sp.exp(-x))


class softplus(_Evaluable):  # noqa: N801
    """log(1 + exp(x)), computed stably."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return sp.log(1 + sp.exp(x))

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])


class step(_Evaluable):  # noqa: N801
    """Heaviside step, 1 for x > 0 else 0: the almost-everywhere derivative of relu."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return sp.Integer(1) if x > 0 else sp.Integer(0)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


class relu(_Evaluable):  # noqa: N801
    """max(x, 0); derivative step(x)."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return sp.Max(x, 0)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return step(self.args[0])


class sign(_Evaluable):  # noqa: N801
    """-1, 0 or 1: the almost-everywhere derivative of abs."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return sp.sign(x)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


class abs(_Evaluable):  # noqa: N801,A001 - the cell language's abs
    """|x|; derivative sign(x)."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return sp.Abs(x)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sign(self.args[0])


class _Extremum(_Evaluable):
    """min or max of two arguments; derivative 1 for the argument that is the value (the
    first on ties)."""

    nargs = 2
    is_real = True
    _lattice: type[sp.Expr]  # sp.Min or sp.Max

    def _builtin(self, a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return self._lattice(a, b)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args
        lead = b - a if self._lattice is sp.Min else a - b  # > 0 where the first is the value
        return step(lead) + ties(a, b) if argindex == 1 else step(-lead)


class min(_Extremum):  # noqa: N801,A001
    """min(a, b); derivative 1 for the smaller argument (the first on ties)."""

    _lattice = sp.Min


class max(_Extremum):  # noqa: N801,A001
    """max(a, b); derivative 1 for the larger argument (the first on ties)."""

    _lattice = sp.Max


class ties(_Evaluable):  # noqa: N801
    """1 where a == b else 0 (so min/max derivatives sum to 1 on ties)."""

    nargs = 2
    is_real = True

    def _builtin(self, a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Integer(1) if a == b else sp.Integer(0)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


class logsigmoid(_Evaluable):  # noqa: N801
    """log(sigmoid(x)) = -softplus(-x), computed stably; derivative sigmoid(-x)."""

    nargs = 1
    is_real = True

    def _builtin(self, x: sp.Expr) -> sp.Expr:
        return -sp.log(1 + sp.exp(-x))

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(-self.args[0])

    @classmethod
    def eval(cls, x: sp.Expr) -> sp.Expr | None:
        if x.is_zero:
            return -sp.log(2)
        return None


class greater(_Evaluable):  # noqa: N801
    """1 where a > b else 0: what the comparisons of the cell language build (derivative 0)."""

    nargs = 2
    is_real = True

    def _builtin(self, a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Integer(1) if a > b else sp.Integer(0)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)

    @classmethod
    def eval(cls, a: sp.Expr, b: sp.Expr) -> sp.Expr | None:
        difference = a - b
        if difference.is_positive:
            return sp.Integer(1)
        if difference.is_nonpositive:
            return sp.Integer(0)
        return None


class where(_Evaluable):  # noqa: N801
    """a where c != 0 else b; the derivative is that of the branch taken (0 for c).

    ``c`` may also be a SymPy comparison (``where(x > 0, a, b)`` in a Python cell): it becomes
    the matching 0/1 `indicator`.
    """

    nargs = 3
    is_real = True

    def _builtin(self, c: sp.Expr, a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return a if c != 0 else b

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        c = self.args[0]
        return {1: sp.Integer(0), 2: where(c, 1, 0), 3: where(c, 0, 1)}[argindex]

    @classmethod
    def eval(cls, c: sp.Expr, a: sp.Expr, b: sp.Expr) -> sp.Expr | None:
        if isinstance(c, Relational):
            return cls(indicator(c), a, b)
        if c.is_zero:
            return b
        if c.is_zero is False:
            return a
        return None


def indicator(comparison: Relational) -> sp.Expr:
    """A SymPy comparison (``a > b``, ``sp.Eq(a, b)``, ...) as the 0/1 expression the cell
    language builds for it."""
    a, b = comparison.lhs, comparison.rhs
    forms = {
        ">": lambda: greater(a, b), "<": lambda: greater(b, a),
        ">=": lambda: 1 - greater(b, a), "<=": lambda: 1 - greater(a, b),
        "==": lambda: ties(a, b), "!=": lambda: 1 - ties(a, b),
    }
    if comparison.rel_op not in forms:  # pragma: no cover - SymPy has no other comparison
        raise TypeError(f"unsupported comparison {comparison}")
    return forms[comparison.rel_op]()


def clamp(x: sp.Expr, lo: sp.Expr, hi: sp.Expr) -> sp.Expr:
    """min(max(x, lo), hi)."""
    return min(max(x, lo), hi)


def silu(x: sp.Expr) -> sp.Expr:
    """x * sigmoid(x)."""
    return x * sigmoid(x)


exp = sp.exp
log = sp.log
tanh = sp.tanh
sqrt = sp.sqrt
sin = sp.sin
cos = sp.cos


# -- the registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CellFunction:
    """One function, spelled for every stage of the compiler (docs/internal-interfaces.md,
    "Adding a function").

    The code fields are `str.format` templates over the printed arguments ("{0}", "{1}", ...).
    A function whose `build` is not a SymPy class expands into others (silu, clamp; sqrt is a
    power) and has no code of its own.
    """

    name: str  # in the cell language; the SymPy class's ``__name__``
    arity: int
    build: Callable[..., sp.Expr]  # the SymPy class, or a builder of an expression of others
    numeric: Callable[..., float] | None = None  # pure Python (math): `_analyse.is_zero`'s test
    torch: str | None = None  # tensor code: the torch reference and backend "torch"
    torch_helper: str = ""  # a Python function `torch` calls, defined in the torch module
    libm: str | None = None  # numba scalar code: CPU float64, CPU float32 without `fast`, CUDA
    libm_helper: str = ""  # ``def <name>_(...)``, a device function `libm`/`cuda` calls
    fast: str | None = None  # CPU float32: a vectorisable `paracompile._fastmath` function
    cuda: str | None = None  # CUDA (libdevice) code where it differs from `libm`
    in_language: bool = True  # a .cell may call it; else only derivatives/comparisons build it

    @property
    def expands(self) -> bool:
        return not isinstance(self.build, type)

    def __post_init__(self) -> None:
        code = (self.numeric, self.torch, self.libm)
        if self.expands:
            if any(c is not None for c in (*code, self.fast, self.cuda)):
                raise ValueError(f"{self.name}: a builder has no code of its own")
        elif any(c is None for c in code) or self.build.__name__ != self.name:
            raise ValueError(f"{self.name}: a SymPy function needs numeric, torch and libm "
                             "code and the class named like the function")


FUNCTIONS: dict[str, CellFunction] = {f.name: f for f in (
    CellFunction("sigmoid", 1, sigmoid, numeric=lambda x: 1.0 / (1.0 + math.exp(-x)),
                 torch="torch.sigmoid({0})", libm="sigmoid_({0})",
                 libm_helper="def sigmoid_(x):\n    return ONE / (ONE + math.exp(-x))",
                 fast="sigmoid_f32"),
    CellFunction("tanh", 1, sp.tanh, numeric=math.tanh, torch="torch.tanh({0})",
                 libm="math.tanh({0})", fast="tanh_f32"),
    CellFunction("exp", 1, sp.exp, numeric=math.exp, torch="torch.exp({0})",
                 libm="math.exp({0})", fast="exp_f32"),
    CellFunction("log", 1, sp.log, numeric=math.log, torch="torch.log({0})",
                 libm="math.log({0})", fast="log_f32"),
    CellFunction("log1p", 1, log1p, numeric=math.log1p, torch="torch.log1p({0})",
                 libm="math.log1p({0})", fast="log1p_f32"),
    CellFunction("softplus", 1, softplus, numeric=lambda x: math.log1p(math.exp(x)),
                 torch="torch.nn.functional.softplus({0})", libm="softplus_({0})",
                 libm_helper="def softplus_(x):\n"
                             "    return max(x, ZERO) + math.log1p(math.exp(-abs(x)))",
                 fast="softplus_f32"),
    CellFunction("relu", 1, relu, numeric=lambda x: builtins.max(x, 0.0),
                 torch="torch.relu({0})", libm="max({0}, ZERO)"),
    CellFunction("abs", 1, abs, numeric=lambda x: x if x >= 0 else -x, torch="torch.abs({0})",
                 libm="abs({0})"),
    CellFunction("sqrt", 1, sp.sqrt),
    CellFunction("sin", 1, sp.sin, numeric=math.sin, torch="torch.sin({0})",
                 libm="math.sin({0})"),
    CellFunction("cos", 1, sp.cos, numeric=math.cos, torch="torch.cos({0})",
                 libm="math.cos({0})"),
    # min/max: on ties the first argument, as their derivatives
    # NaN-propagating, as torch.minimum/maximum; on ties the first argument (its derivative)
    CellFunction("min", 2, min, numeric=lambda a, b: a if a <= b else b, torch="_min({0}, {1})",
                 torch_helper="def _min(a, b):\n    return torch.where((a <= b) | (a != a), a, b)",
                 libm="min_({0}, {1})",
                 libm_helper="def min_(a, b):\n    return a if (a <= b or a != a) else b"),
    CellFunction("max", 2, max, numeric=lambda a, b: a if a >= b else b, torch="_max({0}, {1})",
                 torch_helper="def _max(a, b):\n    return torch.where((a >= b) | (a != a), a, b)",
                 libm="max_({0}, {1})",
                 libm_helper="def max_(a, b):\n    return a if (a >= b or a != a) else b"),
    CellFunction("silu", 1, silu),
    CellFunction("logsigmoid", 1, logsigmoid,
                 numeric=lambda x: -(builtins.max(-x, 0.0)
                                     + math.log1p(math.exp(-builtins.abs(x)))),
                 torch="torch.nn.functional.logsigmoid({0})", libm="(-softplus_(-({0})))",
                 fast="logsigmoid_f32"),
    CellFunction("clamp", 3, clamp),
    # a select: the untaken branch's NaN never leaks (the torch printer gates its gradients)
    CellFunction("where", 3, where, numeric=lambda c, a, b: a if c != 0 else b,
                 torch="torch.where({0}, {1}, {2})", libm="({1} if {0} != ZERO else {2})"),
    # built by derivatives and comparisons only
    CellFunction("step", 1, step, numeric=lambda x: 1.0 if x > 0 else 0.0,
                 torch="_greater({0}, 0)", libm="(ONE if {0} > ZERO else ZERO)",
                 in_language=False),
    CellFunction("sign", 1, sign, numeric=lambda x: (x > 0) - (x < 0), torch="torch.sign({0})",
                 libm="(ONE if {0} > ZERO else (-ONE if {0} < ZERO else ZERO))",
                 in_language=False),
    CellFunction("ties", 2, ties, numeric=lambda a, b: 1.0 if a == b else 0.0,
                 torch="_ties({0}, {1})",
                 torch_helper="def _ties(a, b):\n    return (a == b).to(a.dtype)",
                 libm="(ONE if {0} == {1} else ZERO)", in_language=False),
    CellFunction("greater", 2, greater, numeric=lambda a, b: 1.0 if a > b else 0.0,
                 torch="_greater({0}, {1})",
                 torch_helper="def _greater(a, b):\n    return (a > b).to(a.dtype)",
                 libm="(ONE if {0} > {1} else ZERO)", in_language=False),
)}


def cell_functions() -> dict[str, CellFunction]:
    """The registry's functions a .cell may call, by name (read at each call, not cached)."""
    return {name: f for name, f in FUNCTIONS.items() if f.in_language}


__all__ = [
    "abs", "clamp", "cos", "exp", "greater", "indicator", "log", "log1p", "logsigmoid", "max",
    "min", "relu", "sigmoid", "silu", "sin", "softplus", "sqrt", "tanh", "where",
]

"""The functions a cell may call, as SymPy functions with their (almost-everywhere) derivatives.

Use them in cells written as Python functions (``@paracompile.cell``)::

    from paracompile.functions import sigmoid, tanh
"""

from __future__ import annotations

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


class min(_Evaluable):  # noqa: N801,A001
    """min(a, b); derivative 1 for the smaller argument (the first on ties)."""

    nargs = 2
    is_real = True

    def _builtin(self, a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Min(a, b)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args
        return step(b - a) + ties(a, b) if argindex == 1 else step(a - b)


class max(_Evaluable):  # noqa: N801,A001
    """max(a, b); derivative 1 for the larger argument (the first on ties)."""

    nargs = 2
    is_real = True

    def _builtin(self, a: sp.Expr, b: sp.Expr) -> sp.Expr:
        return sp.Max(a, b)

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args
        return step(a - b) + ties(a, b) if argindex == 1 else step(b - a)


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

# name in the cell language -> (callable building the SymPy expression, number of arguments)
KNOWN_FUNCTIONS: dict[str, tuple[object, int]] = {
    "sigmoid": (sigmoid, 1),
    "tanh": (sp.tanh, 1),
    "exp": (sp.exp, 1),
    "log": (sp.log, 1),
    "log1p": (log1p, 1),
    "softplus": (softplus, 1),
    "relu": (relu, 1),
    "abs": (abs, 1),
    "sqrt": (sp.sqrt, 1),
    "sin": (sp.sin, 1),
    "cos": (sp.cos, 1),
    "min": (min, 2),
    "max": (max, 2),
    "silu": (silu, 1),
    "logsigmoid": (logsigmoid, 1),
    "clamp": (clamp, 3),
    "where": (where, 3),
}

__all__ = [
    "abs", "clamp", "cos", "exp", "greater", "indicator", "log", "log1p", "logsigmoid", "max",
    "min", "relu", "sigmoid", "silu", "sin", "softplus", "sqrt", "tanh", "where",
]

"""The functions a cell may call, as SymPy functions with their (almost-everywhere) derivatives.

Use them in cells written as Python functions (``@paracompile.cell``)::

    from paracompile.functions import sigmoid, tanh
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import log1p


class sigmoid(sp.Function):  # noqa: N801 - named as users write it
    """1 / (1 + exp(-x))."""

    nargs = 1
    is_real = True

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


class softplus(sp.Function):  # noqa: N801
    """log(1 + exp(x)), computed stably."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])


class step(sp.Function):  # noqa: N801
    """Heaviside step, 1 for x > 0 else 0: the almost-everywhere derivative of relu."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


class relu(sp.Function):  # noqa: N801
    """max(x, 0); derivative step(x)."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return step(self.args[0])


class sign(sp.Function):  # noqa: N801
    """-1, 0 or 1: the almost-everywhere derivative of abs."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


class abs(sp.Function):  # noqa: N801,A001 - the cell language's abs
    """|x|; derivative sign(x)."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sign(self.args[0])


class min(sp.Function):  # noqa: N801,A001
    """min(a, b); derivative 1 for the smaller argument (the first on ties)."""

    nargs = 2
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args
        return step(b - a) + ties(a, b) if argindex == 1 else step(a - b)


class max(sp.Function):  # noqa: N801,A001
    """max(a, b); derivative 1 for the larger argument (the first on ties)."""

    nargs = 2
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        a, b = self.args
        return step(a - b) + ties(a, b) if argindex == 1 else step(b - a)


class ties(sp.Function):  # noqa: N801
    """1 where a == b else 0 (so min/max derivatives sum to 1 on ties)."""

    nargs = 2
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


class logsigmoid(sp.Function):  # noqa: N801
    """log(sigmoid(x)) = -softplus(-x), computed stably; derivative sigmoid(-x)."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(-self.args[0])


class where(sp.Function):  # noqa: N801
    """a where c != 0, else b; the derivative is that of the taken branch."""

    nargs = 3
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        c = self.args[0]
        if argindex == 1:
            return sp.Integer(0)
        return where(c, 1, 0) if argindex == 2 else where(c, 0, 1)


class greater(sp.Function):  # noqa: N801
    """1 where a > b else 0 (the comparisons of the cell language)."""

    nargs = 2
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.Integer(0)


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
}

__all__ = [
    "abs", "cos", "exp", "log", "log1p", "max", "min", "relu", "sigmoid", "silu", "sin",
    "softplus", "sqrt", "tanh",
]

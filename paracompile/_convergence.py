"""A symbolic convergence hint for `paracompile check`: an upper bound on |∂f/∂h|.

Newton's iterations on the whole sequence converge fast when each step's Jacobian is
contracting or small, so a bound on its norm over every input tells how well a cell suits the
parallel solve. The bound is found by interval arithmetic applied recursively to the SymPy
Jacobian: every subexpression gets a range [lo, hi] whose ends are numbers, ±oo, or
expressions in the magnitudes |p| of the parameters (nonnegative symbols printed ``|p|``).
Inputs range over all reals and parameters over [-|p|, |p|]. A state is bounded only inside
a box that every step provably maps into itself (an update whose range is bounded whatever
the states, or a convex combination of the state and bounded terms, like a gated update).

Only sound rules are used: the printed bound is a true upper bound, or the hint says
"unknown". It may be loose (each occurrence of a variable is bounded independently).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import sympy as sp
from sympy.codegen.cfunctions import log1p

from . import functions as fn
from ._analyse import Analysis

_OO = sp.oo


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi; ends are numbers, ±oo or finite expressions in the |p| symbols."""

    lo: sp.Expr
    hi: sp.Expr


_REAL = Range(-_OO, _OO)
_UNIT = Range(sp.Integer(0), sp.Integer(1))
_SYM_UNIT = Range(sp.Integer(-1), sp.Integer(1))


def _le(a: sp.Expr, b: sp.Expr) -> bool:
    """True only when a <= b is proven."""
    if a == b or a == -_OO or b == _OO:
        return True
    if a == _OO or b == -_OO:
        return False
    return (b - a).is_nonnegative is True


def _max(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """An upper bound of max(a, b): exact when SymPy orders them, else one without Max
    (max(a, b) <= max(|a|, |b|) <= |a| + |b|), so that bounds stay readable."""
    if _le(a, b):
        return b
    if _le(b, a):
        return a
    ma, mb = _abs_bound(a), _abs_bound(b)
    if _le(ma, mb):
        return mb
    if _le(mb, ma):
        return ma
    return ma + mb


def _min(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """A lower bound of min(a, b), like `_max`."""
    return -_max(-a, -b)


def _min_upper(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """An upper bound of min(a, b): either one."""
    return b if _le(b, a) else a


def _max_lower(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """A lower bound of max(a, b): either one."""
    return -_min_upper(-a, -b)


def _abs_bound(e: sp.Expr) -> sp.Expr:
    """An upper bound of |e| for a finite e over the |p| symbols (>= 0): the sum of the
    magnitudes of its expanded terms."""
    if e.is_nonnegative:
        return e
    if e.is_nonpositive:
        return -e
    total = sp.Integer(0)
    for t in sp.Add.make_args(sp.expand(e)):
        if t.is_nonnegative:
            total += t
        elif t.is_nonpositive:
            total -= t
        else:
            return sp.Abs(e)
    return total


def _emul(a: sp.Expr, b: sp.Expr) -> sp.Expr | None:
    """a*b for interval ends, with 0·oo = 0; None when an infinite product has no known sign.

    |p|·oo is oo although |p| may be 0: an end that is only further out, which keeps the
    product's range a true enclosure (a nonnegative product is never its lower end unless
    all of them are nonnegative, and then 0 <= |p|·oo anyway)."""
    if a == 0 or b == 0:
        return sp.Integer(0)
    if a.is_infinite or b.is_infinite:
        sa, sb = _sign(a), _sign(b)
        if sa is None or sb is None:
            return None
        return _OO if sa == sb else -_OO
    return a * b


def _sign(e: sp.Expr) -> int | None:
    return 1 if e.is_nonnegative else -1 if e.is_nonpositive else None


def _finite(r: Range) -> bool:
    return not (r.lo.is_infinite or r.hi.is_infinite)


def _numeric(r: Range) -> bool:
    return r.lo.is_number and r.hi.is_number


def add(a: Range, b: Range) -> Range:
    return Range(a.lo + b.lo, a.hi + b.hi)


def neg(a: Range) -> Range:
    return Range(-a.hi, -a.lo)


def _kind(r: Range) -> str | None:
    if _le(0, r.lo):
        return "+"
    if _le(r.hi, 0):
        return "-"
    if _le(r.lo, 0) and _le(0, r.hi):
        return "0"  # contains zero
    return None


def mul(a: Range, b: Range) -> Range:
    ka, kb = _kind(a), _kind(b)
    if ka == "-":
        return neg(mul(neg(a), b))
    if kb == "-":
        return neg(mul(a, neg(b)))
    # the interval-product table by sign, which needs no comparison of the products
    table = {("+", "+"): (a.lo, b.lo, a.hi, b.hi), ("+", "0"): (a.hi, b.lo, a.hi, b.hi),
             ("0", "+"): (a.lo, b.hi, a.hi, b.hi)}
    if (ka, kb) in table:
        x0, y0, x1, y1 = table[ka, kb]
        lo, hi = _emul(x0, y0), _emul(x1, y1)
        return _REAL if lo is None or hi is None else Range(lo, hi)
    ends = [_emul(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    if any(e is None for e in ends):
        return _REAL
    lo = _extreme(ends, lambda e, o: _le(e, o))
    hi = _extreme(ends, lambda e, o: _le(o, e))
    if lo is not None and hi is not None:
        return Range(lo, hi)
    m = _emul(magnitude(a), magnitude(b))  # |a*b| <= |a|*|b| when the ends are not ordered
    return _REAL if m is None else Range(-m, m)


def _extreme(ends: list[sp.Expr], beats: object) -> sp.Expr | None:
    """The end that provably `beats` (<= or >=) all others, or None."""
    for e in ends:
        if all(beats(e, o) for o in ends):
            return e
    return None


def magnitude(r: Range) -> sp.Expr:
    """The bound on |value|."""
    return _max(-r.lo, r.hi)


def hull(a: Range, b: Range) -> Range:
    return Range(_min(a.lo, b.lo), _max(a.hi, b.hi))


def _monotone(f: object, a: Range, lower: sp.Expr, upper: sp.Expr) -> Range:
    """An increasing function `f` on a range; `lower`/`upper` are its limits at -oo/oo."""
    lo = lower if a.lo == -_OO else f(a.lo)
    hi = upper if a.hi == _OO else f(a.hi)
    return Range(lo, hi)


def _power(base: Range, e: sp.Expr) -> Range:
    if e.is_Integer and e > 0:
        if e % 2 == 1:  # odd: increasing
            return _monotone(lambda x: x**e, base, -_OO, _OO)
        if _le(0, base.lo):
            return Range(base.lo**e, base.hi**e)
        if _le(base.hi, 0):
            return Range(base.hi**e, base.lo**e)
        m = magnitude(base)
        return Range(sp.Integer(0), m**e)
    if e.is_Integer and e < 0:  # 1/x**n: bounded when x stays away from zero
        if _le(0, base.lo) and base.lo.is_positive:
            return _power(Range(1 / base.hi, 1 / base.lo), -e)
        if _le(base.hi, 0) and base.hi.is_negative:
            return _power(Range(1 / base.hi, 1 / base.lo), -e)
        return _REAL
    if e.is_Rational and e > 0 and _le(0, base.lo):  # sqrt and the like on x >= 0
        return Range(base.lo**e, base.hi**e)
    if e.is_Rational and e < 0 and base.lo.is_positive:
        return Range(base.hi**e, base.lo**e)
    return _REAL


@dataclass
class Evaluator:
    """Ranges of expressions over the cell's variables, memoised."""

    ranges: dict[sp.Symbol, Range]  # every variable without a range is any real
    memo: dict[sp.Expr, Range] = field(default_factory=dict)

    def __call__(self, e: sp.Expr) -> Range:
        r = self.memo.get(e)
        if r is None:
            r = self.memo[e] = self._eval(e)
        return r

    def _eval(self, e: sp.Expr) -> Range:
        if e.is_Number or e.is_NumberSymbol:  # (sqrt(2) and the like are Pow)
            return Range(e, e) if e.is_finite and e.is_real else _REAL
        if e.is_Symbol:
            return self.ranges.get(e, _REAL)
        if e.is_Add:
            return self._add(e)
        if e.is_Mul:
            return self._mul(e)
        if e.is_Pow:
            return _power(self(e.base), e.exp)
        return self._function(e)

    def _add(self, e: sp.Expr) -> Range:
        total = Range(sp.Integer(0), sp.Integer(0))
        for t in e.args:
            total = add(total, self(t))
        convex = self.convex(e)
        if convex is not None and _numeric(convex) and _numeric(total):
            # both bounds hold: keep the tighter ends
            return Range(sp.Max(total.lo, convex.lo), sp.Min(total.hi, convex.hi))
        return convex if convex is not None and not _finite(total) else total

    def convex(self, e: sp.Expr, skip: sp.Symbol | None = None) -> Range | None:
        """Σ w_k X_k with weights w_k in [0, 1] that sum to 1 lies in the hull of the X_k
        (what keeps a gated update bounded: (1 - z)*h + z*hc). A term X_k == `skip` is left
        out of the hull (None if it is the only one)."""
        terms = e.args
        if len(terms) > 4:
            return None
        choices = []
        for t in terms:
            # a weight: |coefficient| (when at most 1), times one factor in [0, 1] or not
            coeff, rest = t.as_coeff_Mul()
            c = sp.Abs(coeff)
            if not 0 < c <= 1:
                return None
            units = [f for f in sp.Mul.make_args(rest)
                     if _le(0, self(f).lo) and _le(self(f).hi, 1)]
            choices.append([c, *(c * f for f in units)])
        for ws in itertools.product(*choices):
            if sp.Add(*ws) != 1:  # (1 - z) + z: SymPy collects it without expand
                continue
            result = None
            for t, w in zip(terms, ws, strict=True):
                x = t / w
                if x != skip:
                    result = self(x) if result is None else hull(result, self(x))
            return result
        return None

    def _mul(self, e: sp.Expr) -> Range:
        powers = e.as_powers_dict()
        result = Range(sp.Integer(1), sp.Integer(1))
        # x*(1 - x) = 1/4 - (x - 1/2)**2 <= 1/4: the derivative of a sigmoid, s*(1 - s)
        for base in list(powers):
            other = 1 - base
            if base.is_Add and other in powers:
                n = sp.Min(powers[base], powers[other])
                if not (n.is_Integer and n > 0):
                    continue
                x = self(base)
                half, quarter = sp.Rational(1, 2), sp.Rational(1, 4)
                shifted = add(x, Range(-half, -half))
                quad = add(Range(quarter, quarter), neg(_power(shifted, sp.Integer(2))))
                result = mul(result, _power(quad, n))
                powers[base] -= n
                powers[other] -= n
        for base, exp in powers.items():
            if exp != 0:
                result = mul(result, self(base) if exp == 1 else _power(self(base), exp))
        return result

    def _function(self, e: sp.Expr) -> Range:
        f, args = e.func, e.args
        if f in (fn.sigmoid, fn.step, fn.greater, fn.ties):
            return _UNIT
        if f in (sp.tanh, fn.sign, sp.sin, sp.cos):
            return _SYM_UNIT
        a = self(args[0]) if args else _REAL
        if f is sp.exp:
            return _monotone(sp.exp, a, sp.Integer(0), _OO)
        if f is fn.softplus:
            return _monotone(lambda x: sp.log(1 + sp.exp(x)), a, sp.Integer(0), _OO)
        if f is fn.relu:
            return Range(_max_lower(a.lo, sp.Integer(0)), _max(a.hi, sp.Integer(0)))
        if f is fn.abs:
            if _le(0, a.lo):
                return a
            return Range(sp.Integer(0), magnitude(a))
        if f is fn.logsigmoid:
            return _monotone(lambda x: -sp.log(1 + sp.exp(-x)), a, -_OO, sp.Integer(0))
        if f is sp.log and a.lo.is_positive:
            return _monotone(sp.log, a, -_OO, _OO)
        if f is log1p and (a.lo + 1).is_positive:
            return _monotone(lambda x: sp.log(1 + x), a, -_OO, _OO)
        if f in (fn.min, fn.max):
            b = self(args[1])
            if f is fn.min:  # increasing in both arguments
                return Range(_min(a.lo, b.lo), _min_upper(a.hi, b.hi))
            return Range(_max_lower(a.lo, b.lo), _max(a.hi, b.hi))
        if f is fn.where:
            return hull(self(args[1]), self(args[2]))
        return _REAL  # log near 0 and anything unknown: no bound


@dataclass(frozen=True)
class Hint:
    """The convergence hint of a cell.

    `bound` bounds |∂s'/∂s| (one state) or the infinity norm of the k×k block (the max row
    sum of |entries|), over every input and parameter, while the states stay in `box`; None
    when no bound was found (`reason` says why). For a dense cell `diagonal` bounds the
    channel-diagonal entry alone (k = 1). `magnitudes` maps each parameter name to the
    nonnegative symbol that stands for its absolute value (for a matrix M: |M[c, c]|).
    """

    states: tuple[str, ...]
    bound: sp.Expr | None
    reason: str = ""
    box: dict[str, tuple[sp.Expr, sp.Expr]] = field(default_factory=dict)
    magnitudes: dict[str, sp.Symbol] = field(default_factory=dict)
    diagonal: sp.Expr | None = None

    def evaluate(self, params: dict[str, float], expr: sp.Expr | None = None) -> float:
        """`expr` (default: the bound) at parameter values `params` (name -> value; for a
        matrix M its diagonal entry M[c, c])."""
        expr = self.bound if expr is None else expr
        if expr is None:
            raise ValueError("the hint has no bound")
        subs = {sym: abs(params[name]) for name, sym in self.magnitudes.items()
                if name in params}
        return float(expr.subs(subs))

    def line(self) -> str:
        """The `convergence:` line of `paracompile check`."""
        s = self.states[0]
        if self.bound is None:
            text = f"convergence: unknown ({self.reason})"
            if self.diagonal is not None:
                text += (f"; its channel-diagonal entry (what quasi-Newton uses): "
                         f"|d{s}'/d{s}| <= {sp.sstr(self.diagonal)}")
            return text
        if len(self.states) == 1:
            what = f"|d{s}'/d{s}|"
        else:
            k = len(self.states)
            what = f"||J||_inf (max row sum of |entries| of the {k}x{k} block)"
        kind = "a number" if self.bound.is_number else "in terms of |params|"
        text = f"convergence: {what} <= {sp.sstr(self.bound)} ({kind}"
        if self.box:
            where = ", ".join(f"{name} in [{sp.sstr(lo)}, {sp.sstr(hi)}]"
                              for name, (lo, hi) in self.box.items())
            text += f", for {where}: a box every step maps into itself"
        return text + ")"


def convergence_hint(analysis: Analysis) -> Hint:
    """Bound the per-channel Jacobian of `analysis` (see `Hint`)."""
    states = tuple(analysis.ir.states)
    magnitudes = {p.name: sp.Symbol(f"|{p.name}|", nonnegative=True) for p in analysis.ir.params}
    ranges: dict[sp.Symbol, Range] = {}
    for sym in analysis.params:
        m = magnitudes[sym.name]
        ranges[sym] = Range(-m, m)
    for t in analysis.matvecs:
        m = magnitudes[t.matrix] = sp.Symbol(f"|{t.matrix}[c,c]|", nonnegative=True)
        ranges[t.mdiag] = Range(-m, m)
    box = _invariant_box(analysis, ranges)
    bound = _bound(analysis, {**ranges, **box})
    if bound is None:
        free = [str(s) for s in analysis.states if s not in box]
        reason = "no bound found: the inputs range over all reals"
        if free:
            reason += f" and the states {', '.join(free)} are not proven bounded"
        return Hint(states, None, reason)
    if box and _bound(analysis, ranges) == bound:
        box = {}  # the same bound for any states: the box is not a condition
    k = analysis.k
    needed = {str(s): (r.lo, r.hi) for s, r in box.items()
              if any(analysis.jacobian[i, j].has(s) for i in range(k) for j in range(k))}
    used = {n: m for n, m in magnitudes.items() if bound.has(m)}
    if analysis.dense:
        return Hint(states, None, "dense: the matrix mixes channels, so the Jacobian is not "
                    "bounded per channel", needed, used, bound if k == 1 else None)
    return Hint(states, bound, "", needed, used)


def _bound(analysis: Analysis, ranges: dict[sp.Symbol, Range]) -> sp.Expr | None:
    """The max row sum of the entries' magnitudes; None if a row is unbounded."""
    ev = Evaluator(ranges)
    k = analysis.k
    rows = [sp.expand(sp.Add(*(magnitude(ev(analysis.jacobian[i, j]))
                               for j in range(k) if analysis.pattern[i][j])))
            for i in range(k)]
    return None if any(r.has(_OO) for r in rows) else _row_max(rows)


def _row_max(rows: list[sp.Expr]) -> sp.Expr:
    """max over the rows, leaving out the rows proven to be at most another one."""
    kept: list[sp.Expr] = []
    for i, r in enumerate(rows):
        dominated = any(_le(r, o) and not (_le(o, r) and j > i)
                        for j, o in enumerate(rows) if j != i)
        if not dominated:
            kept.append(r)
    return kept[0] if len(kept) == 1 else sp.Max(*kept)


def _invariant_box(analysis: Analysis, ranges: dict[sp.Symbol, Range]
                   ) -> dict[sp.Symbol, Range]:
    """Numeric ranges of states that every step maps into themselves (else no entry).

    A candidate box comes from the updates' ranges (an update bounded whatever the states,
    or a convex combination with the state itself); it counts only once one step from every
    point of it is proven to land inside it again.
    """
    box: dict[sp.Symbol, Range] = {}
    for _ in range(analysis.k + 1):
        grown = False
        ev = Evaluator({**ranges, **box})
        for s, f in zip(analysis.states, analysis.new_states, strict=True):
            if s in box:
                continue
            # if s stays in the hull of the other terms of a convex combination, so does s'
            r = (ev.convex(f, skip=s) if f.is_Add else None) or ev(f)
            if _numeric(r) and _finite(r):
                box[s] = r
                grown = True
        if not grown:
            break
    # verify: f(box) ⊆ box for every boxed state; drop failures until the rest holds
    while box:
        ev = Evaluator({**ranges, **box})
        bad = [s for s, f in zip(analysis.states, analysis.new_states, strict=True)
               if s in box and not _inside(ev(f), box[s])]
        if not bad:
            break
        for s in bad:
            del box[s]
    return box


def _inside(r: Range, b: Range) -> bool:
    return _le(b.lo, r.lo) and _le(r.hi, b.hi)

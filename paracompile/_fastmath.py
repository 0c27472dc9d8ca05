"""Fast float32 elementary functions for generated numba CPU kernels.

numba from PyPI has no SVML, so ``math.exp``/``math.tanh``/``math.log`` on float32 lower to
scalar libm calls, and a loop containing a call does not vectorise. The functions here are
branch-free straight-line float32 code (range reduction + polynomial, with special cases
handled by selects), so LLVM inlines them into the caller's loop and vectorises it
(``<16 x float>`` on AVX-512, ``<8 x float>`` on AVX2). float64 kernels use libm (``math.*``).

Method: exp uses Cody-Waite reduction x = n ln2 + r (ln2 split in two), a degree-6 polynomial
for e^r on |r| <= ln2/2, and scales by 2^n built from exponent bits in two halves (so that
results in the subnormal range underflow gradually and overflow yields inf without integer
overflow). log splits x = 2^e m with m in [sqrt(1/2), sqrt(2)) via the bits and evaluates
log(1+f) = f - f^2/2 + f^3 P(f). Polynomial coefficients are the float32 minimax fits of
Cephes (S. Moshier). Everything else is built from these two.

Maximum errors (``MAX_ERROR``/``ERROR_KIND``) were measured over all 2^32 float32 inputs;
``tests/test_fastmath.py`` re-checks them, ``docs/fastmath.md`` has the tables and timings.

Rules for callers:

* Call them from ``@numba.njit`` code (any ``fastmath``/``error_model``). They are compiled
  with ``forceinline=True`` (LLVM ``alwaysinline``), so every call is inlined into the
  caller's loop and keeps *these* flags: no ``nnan``/``reassoc`` (which would fold away the
  NaN selects and the ``(y + 1.5*2^23) - 1.5*2^23`` rounding trick), only ``contract``
  (FMA where the CPU has it). Do not re-wrap them with numba's IR-level ``inline="always"``:
  that would lower the bodies with the caller's flags.
* Pass float32 and keep results float32: a Python float literal (``x + 1.0``) promotes to
  float64 in numba and the loop then runs at half width (use ``np.float32(1.0)``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "ERROR_KIND",
    "MAX_ERROR",
    "exp_f32",
    "log_f32",
    "log1p_f32",
    "tanh_f32",
    "sigmoid_f32",
    "softplus_f32",
    "logsigmoid_f32",
]

_f = np.float32

# forceinline: LLVM `alwaysinline`, so the bodies are inlined into the caller's loop however
# many calls it makes (LLVM's own inliner gives up on softplus-sized callees, and a call left
# in a loop stops vectorisation). Unlike numba's IR-level inline="always", the body keeps
# the flags below rather than taking the caller's.
# error_model="numpy": float division without a zero check (the python model adds a branch
# raising ZeroDivisionError, which blocks vectorisation).
# fastmath={"contract"} explicitly: numba otherwise inherits the *caller's* fastmath when it
# compiles a callee, and nnan/reassoc would break the NaN selects and the rounding trick.
# contract alone only fuses a*b+c into an FMA (one rounding instead of two): 30-55% faster
# (the polynomials are latency-bound); MAX_ERROR covers both the FMA and no-FMA builds.
_jit = numba.njit(
    cache=True, error_model="numpy", fastmath={"contract"}, forceinline=True, nogil=True
)

# -- constants (all float32: a float64 literal would promote the whole expression) -------
_ONE = _f(1.0)
_TWO = _f(2.0)
_HALF = _f(0.5)
_ZERO = _f(0.0)
_INF = _f(np.inf)
_NAN = _f(np.nan)

# exp: clamp keeps 2^n's exponent field in range; e^89 = inf, e^-110 = 0 in float32.
_EXP_HI = _f(89.0)
_EXP_LO = _f(-110.0)
_LOG2E = _f(1.44269504088896341)
_ROUND = _f(12582912.0)  # 1.5 * 2^23: y + _ROUND rounds y to an integer in the low bits
_ROUND_BITS = 0x4B400000  # bits of _ROUND
_LN2_HI = _f(0.693359375)  # exact in 9 bits, so n * _LN2_HI is exact for |n| < 2^15
_LN2_LO = _f(-2.12194440e-4)
_EP0 = _f(1.9875691500e-4)
_EP1 = _f(1.3981999507e-3)
_EP2 = _f(8.3334519073e-3)
_EP3 = _f(4.1665795894e-2)
_EP4 = _f(1.6666665459e-1)
_EP5 = _f(5.0000001201e-1)

# log
_MIN_NORMAL = _f(1.17549435e-38)
_TWO23 = _f(8388608.0)
_SQRT2_M1 = _f(0.41421356)  # sqrt(2) - 1
_SQRTH_BITS = 0x3F3504F3  # bits of sqrt(1/2): mantissa is rebased into [sqrt(1/2), sqrt(2))
_LP0 = _f(7.0376836292e-2)
_LP1 = _f(-1.1514610310e-1)
_LP2 = _f(1.1676998740e-1)
_LP3 = _f(-1.2420140846e-1)
_LP4 = _f(1.4249322787e-1)
_LP5 = _f(-1.6668057665e-1)
_LP6 = _f(2.0000714765e-1)
_LP7 = _f(-2.4999993993e-1)
_LP8 = _f(3.3333331174e-1)

# tanh: e^2|x| - 1 from exp's reduction; tanh(10) == 1 in float32, so |x| is clamped there.
_TANH_SMALL = _f(0.75)  # below: em / (em + 2), above: 1 - 2 / (em + 2)
_TANH_CLAMP = _f(10.0)


# -- bit reinterpretation ---------------------------------------------------------------
# numba supports ``.view`` on NumPy *scalars* (it lowers to an LLVM bitcast, which vectorises);
# its validation pass wants the receiver written as an explicit ``np.<dtype>(...)`` call.
# numba widens int32 arithmetic to int64, so ``np.int32(i)`` truncates back before the view;
# LLVM then narrows the whole integer chain to i32 lanes.


@_jit
def _bits(x: np.float32) -> np.int32:
    """The IEEE bits of a float32, as int32."""
    return np.float32(x).view(np.int32)


@_jit
def _from_bits(i: int) -> np.float32:
    """The float32 whose bits are the low 32 bits of ``i``."""
    return np.int32(i).view(np.float32)


@_jit
def _exp_reduced(x: np.float32) -> tuple[np.float32, np.float32]:
    """(q, t) with e^x = 2^n (1 + q): q = e^r - 1 for r = x - n ln2, |r| <= ln2/2, and the
    integer n held in t's low mantissa bits (read it with `_exp_n`). For finite x with
    |x| <= 110 (callers clamp); NaN gives NaN."""
    t = x * _LOG2E + _ROUND
    n = t - _ROUND  # round(x / ln2) without float->int conversion (poison on NaN)
    r = x - n * _LN2_HI - n * _LN2_LO
    z = r * r
    p = _EP0
    p = p * r + _EP1
    p = p * r + _EP2
    p = p * r + _EP3
    p = p * r + _EP4
    p = p * r + _EP5
    return p * z + r, t


@_jit
def _exp_n(t: np.float32) -> np.int32:
    """The integer n that `_exp_reduced` left in t's mantissa (int32 lanes)."""
    return np.int32(_bits(t) - _ROUND_BITS)


@_jit
def exp_f32(x: np.float32) -> np.float32:
    """e^x. Overflow (x > 88.72) gives inf, underflow gives subnormals then 0, NaN -> NaN."""
    # selects (not min/max) so NaN passes through: NaN compares false
    x = _EXP_HI if x > _EXP_HI else x
    x = _EXP_LO if x < _EXP_LO else x
    q, t = _exp_reduced(x)
    k = _exp_n(t)
    # 2^n as two normal factors: n in [-159, 128] would not fit one exponent field
    k1 = k >> 1
    k2 = k - k1
    s1 = _from_bits((k1 + 127) << 23)
    s2 = _from_bits((k2 + 127) << 23)
    return ((q + _ONE) * s1) * s2


@_jit
def _log_reduced(x: np.float32) -> tuple[np.float32, np.float32]:
    """(e, f) with x = 2^e (1 + f), 1 + f in [sqrt(1/2), sqrt(2)), for finite x > 0."""
    sub = x < _MIN_NORMAL
    xs = x * _TWO23 if sub else x  # normalise subnormals
    bits = np.int32(_bits(xs) + (0x3F800000 - _SQRTH_BITS))
    e = np.int32((bits >> 23) - (150 if sub else 127))  # int32: cheaper int->float
    m = _from_bits((bits & 0x007FFFFF) + _SQRTH_BITS)
    return _f(e), m - _ONE  # m - 1 is exact (Sterbenz)


@_jit
def _log1p_poly(f: np.float32) -> np.float32:
    """log(1 + f) - f for f in [sqrt(1/2) - 1, sqrt(2) - 1] (the f itself is added last)."""
    z = f * f
    y = _LP0
    y = y * f + _LP1
    y = y * f + _LP2
    y = y * f + _LP3
    y = y * f + _LP4
    y = y * f + _LP5
    y = y * f + _LP6
    y = y * f + _LP7
    y = y * f + _LP8
    return y * f * z - _HALF * z


@_jit
def log_f32(x: np.float32) -> np.float32:
    """Natural log. log(0) = -inf, log(x<0) = NaN, log(inf) = inf, NaN -> NaN."""
    e, f = _log_reduced(x)
    r = (f + (_log1p_poly(f) + e * _LN2_LO)) + e * _LN2_HI
    r = _INF if x == _INF else r
    r = -_INF if x == _ZERO else r
    r = _NAN if x < _ZERO else r
    return x if x != x else r


@_jit
def log1p_f32(x: np.float32) -> np.float32:
    """log(1 + x), accurate for tiny x. log1p(-1) = -inf, x < -1 -> NaN, NaN -> NaN."""
    u = x + _ONE
    e, f = _log_reduced(u)
    # 1 + x = u + c exactly; log(u + c) ~= log(u) + c/u recovers the bits lost in u
    c = (x - (u - _ONE)) / u
    r = (f + (_log1p_poly(f) + (e * _LN2_LO + c))) + e * _LN2_HI
    r = x if u == _ONE else r  # |x| < 2^-24: log1p(x) = x to within x/2 relative
    r = _INF if x == _INF else r
    r = -_INF if x == -_ONE else r
    r = _NAN if x < -_ONE else r
    return x if x != x else r


@_jit
def tanh_f32(x: np.float32) -> np.float32:
    """tanh(x); exactly +-1 for |x| >= 9.011, odd (tanh(-0.0) = -0.0), NaN -> NaN."""
    a = abs(x)
    y = _TANH_CLAMP if a > _TANH_CLAMP else a  # NaN stays NaN
    y = y + y  # tanh|x| = em / (em + 2) with em = e^2|x| - 1 in [0, e^20): no overflow
    q, t = _exp_reduced(y)
    s = _from_bits((_exp_n(t) + 127) << 23)  # 2^n, n in [0, 29]: one normal factor
    em = s * q + (s - _ONE)  # 2^n (1 + q) - 1, exact s - 1; relatively accurate near 0
    # one division either way: em / (em + 2) keeps relative accuracy for small |x|, where
    # 1 - 2 / (em + 2) would cancel; above the switch the latter is the accurate one
    small = a < _TANH_SMALL
    v = (em if small else _TWO) / (em + _TWO)
    r = v if small else _ONE - v
    # copysign(r, x) on the bits: odd symmetry, and tanh(-0.0) = -0.0
    return _from_bits((_bits(r) & 0x7FFFFFFF) | (_bits(x) & -0x80000000))


@_jit
def sigmoid_f32(x: np.float32) -> np.float32:
    """1 / (1 + e^-x), never NaN for numbers: exactly 1 for x >= 16.64, 0 for x <= -103.98."""
    e = exp_f32(-abs(x))  # in (0, 1]: never overflows
    # e / (1 + e) for x < 0 keeps relative accuracy where sigmoid(x) ~ e^x is tiny
    return (_ONE if x >= _ZERO else e) / (_ONE + e)


@_jit
def _log1p_unit(e: np.float32) -> np.float32:
    """log(1 + e) for e in [0, 1] (or NaN): no division, no exponent extraction.

    1 + e = 2^k (1 + f) with k in {0, 1}: f = e exactly for k = 0, and f = e/2 - 1/2 with a
    single rounding for k = 1, so the general log1p's correction term c/u is not needed.
    """
    big = e >= _SQRT2_M1
    f = (_HALF * e - _HALF) if big else e
    k = _ONE if big else _ZERO
    return (f + (_log1p_poly(f) + k * _LN2_LO)) + k * _LN2_HI


@_jit
def softplus_f32(x: np.float32) -> np.float32:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|); exactly x for x >= 14.56, NaN -> NaN."""
    m = x if x > _ZERO else _ZERO
    return m + _log1p_unit(exp_f32(-abs(x)))


@_jit
def logsigmoid_f32(x: np.float32) -> np.float32:
    """log(sigmoid(x)) = -softplus(-x); exactly x for x <= -14.56."""
    return -softplus_f32(-x)


# Documented maximum errors, measured exhaustively over all 2^32 float32 inputs against
# float64 numpy (with and without FMA contraction), then rounded up slightly; tested on a
# 2M-point sweep by tests/test_fastmath.py. Measured maxima in docs/fastmath.md.
# "rel": |f - ref| / |ref| wherever ref is a normal float32 (|ref| in [2^-126, FLT_MAX]).
# "abs": |f - ref| wherever |ref| <= FLT_MAX (tanh, sigmoid: bounded outputs).
# Half an ulp of 1.0 is 2^-24 ~ 5.96e-8.
MAX_ERROR: dict[str, float] = {
    "exp_f32": 9.0e-8,  # measured 8.46e-8
    "log_f32": 9.0e-8,  # 8.26e-8
    "log1p_f32": 9.0e-8,  # 8.35e-8
    "tanh_f32": 9.0e-8,  # 7.93e-8 (relative: 1.42e-7)
    "sigmoid_f32": 9.5e-8,  # 8.93e-8 (relative: 1.78e-7)
    "softplus_f32": 1.5e-7,  # 1.40e-7
    "logsigmoid_f32": 1.5e-7,  # 1.40e-7
}
ERROR_KIND: dict[str, str] = {
    "exp_f32": "rel",
    "log_f32": "rel",
    "log1p_f32": "rel",
    "tanh_f32": "abs",
    "sigmoid_f32": "abs",
    "softplus_f32": "rel",
    "logsigmoid_f32": "rel",
}

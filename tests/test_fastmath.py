"""Accuracy, special cases and vectorisation of the float32 fast math (paracompile._fastmath)."""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Callable

import numba
import numpy as np
import pytest

from paracompile import _fastmath as fm

FLT_MIN = float(np.finfo(np.float32).tiny)  # smallest normal
FLT_MAX = float(np.finfo(np.float32).max)
SUB_ULP = 2.0**-149  # spacing of float32 subnormals

NAMES = [
    "exp_f32",
    "log_f32",
    "log1p_f32",
    "tanh_f32",
    "sigmoid_f32",
    "softplus_f32",
    "logsigmoid_f32",
]


def _ref(name: str, x: np.ndarray) -> np.ndarray:
    """float64 reference (numpy libm); stable forms for sigmoid/softplus."""
    with np.errstate(all="ignore"):  # the sweep holds signalling NaNs, inf, 0
        x = x.astype(np.float64)
        if name == "exp_f32":
            return np.exp(x)
        if name == "log_f32":
            return np.log(x)
        if name == "log1p_f32":
            return np.log1p(x)
        if name == "tanh_f32":
            return np.tanh(x)
        e = np.exp(-np.abs(x))
        if name == "sigmoid_f32":
            return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        if name == "softplus_f32":
            return np.maximum(x, 0.0) + np.log1p(e)
        if name == "logsigmoid_f32":
            return np.minimum(x, 0.0) - np.log1p(e)
    raise KeyError(name)


# The useful range of each function: a uniform dense sweep there, on top of the sweep of
# every binade below.
RANGES = {
    "exp_f32": (-104.0, 89.0),
    "log_f32": (0.0, 100.0),
    "log1p_f32": (-1.0, 100.0),
    "tanh_f32": (-10.0, 10.0),
    "sigmoid_f32": (-110.0, 30.0),
    "softplus_f32": (-110.0, 30.0),
    "logsigmoid_f32": (-30.0, 110.0),
}

# magnitudes around every special point (thresholds, tiny, subnormal, huge, inf), both signs
_MAGNITUDES = [0.0, 1e-45, 1e-40, FLT_MIN, 1e-30, 1e-8, 0.5, 1.0, 2.0, 8.0, 9.1, 17.0,
               87.33, 88.72, 88.73, 103.9, 104.0, 1e4, 1e30, FLT_MAX, np.inf]  # fmt: skip
EDGE = np.array([s * m for m in _MAGNITUDES for s in (1.0, -1.0)] + [np.nan], dtype=np.float32)


def _sweep(name: str) -> np.ndarray:
    # every 4093rd float32 bit pattern: ~1.05M points covering all binades of both signs
    # (including subnormals, huge values, inf and NaN patterns), with varied mantissas
    bits = np.arange(0, 2**32, 4093, dtype=np.uint64).astype(np.uint32)
    lo, hi = RANGES[name]
    dense = np.linspace(lo, hi, 1_000_001, dtype=np.float32)
    return np.concatenate([bits.view(np.float32), dense, EDGE])


_LOOPS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {}


def _loop(name: str) -> Callable[[np.ndarray, np.ndarray], None]:
    """`out[i] = f(x[i])` over a contiguous float32 array: the shape of a kernel's inner loop."""
    if name not in _LOOPS:
        f = getattr(fm, name)

        @numba.njit
        def loop(x, out):  # type: ignore[no-untyped-def]
            for i in range(x.shape[0]):
                out[i] = f(x[i])

        _LOOPS[name] = loop
    return _LOOPS[name]


def _apply(name: str, x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _loop(name)(x, out)
    return out


def test_max_error_table_complete() -> None:
    assert set(fm.MAX_ERROR) == set(NAMES) == set(fm.ERROR_KIND)
    assert set(fm.ERROR_KIND.values()) <= {"rel", "abs"}
    for name in NAMES:
        assert name in fm.__all__
        assert 0 < fm.MAX_ERROR[name] < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_accuracy(name: str) -> None:
    x = _sweep(name)
    out = _apply(name, x)
    assert out.dtype == np.float32
    ref = _ref(name, x)
    with np.errstate(all="ignore"):
        o = out.astype(np.float64)
        err = np.abs(o - ref)
        in_range = np.abs(ref) <= FLT_MAX  # finite and representable
        normal = in_range & (np.abs(ref) >= FLT_MIN)

        # non-finite reference (inf, NaN): reproduced exactly
        special = ~np.isfinite(ref)
        same = (o == ref) | (np.isnan(o) & np.isnan(ref))
        assert same[special].all(), (x[special & ~same][:8], out[special & ~same][:8])
        # a representable reference never gives inf/NaN
        bad = in_range & ~np.isfinite(o)
        assert not bad.any(), (x[bad][:8], out[bad][:8])

        bound = fm.MAX_ERROR[name]
        if fm.ERROR_KIND[name] == "rel":
            rel = err[normal] / np.abs(ref[normal])
            worst = int(np.argmax(rel))
            assert rel[worst] <= bound, (x[normal][worst], out[normal][worst], rel[worst])
            # results in the subnormal range: within one subnormal spacing (measured: 0.75)
            sub = in_range & ~normal
            assert (err[sub] <= SUB_ULP).all(), x[sub][err[sub] > SUB_ULP][:8]
        else:
            worst = int(np.argmax(np.where(in_range, err, 0.0)))
            assert err[worst] <= bound, (x[worst], out[worst], err[worst])


def _exact(name: str, x: float) -> float:
    return float(_apply(name, np.array([x], dtype=np.float32))[0])


INF, NAN = float("inf"), float("nan")
SPECIAL = [
    ("exp_f32", 0.0, 1.0),
    ("exp_f32", -0.0, 1.0),
    ("exp_f32", INF, INF),
    ("exp_f32", -INF, 0.0),
    ("exp_f32", 89.0, INF),
    ("exp_f32", 1e30, INF),
    ("exp_f32", -110.0, 0.0),
    ("exp_f32", -1e30, 0.0),
    ("log_f32", 1.0, 0.0),
    ("log_f32", 0.0, -INF),
    ("log_f32", -0.0, -INF),
    ("log_f32", -1.0, NAN),
    ("log_f32", -1e-45, NAN),
    ("log_f32", -INF, NAN),
    ("log_f32", INF, INF),
    ("log1p_f32", 0.0, 0.0),
    ("log1p_f32", -1.0, -INF),
    ("log1p_f32", -2.0, NAN),
    ("log1p_f32", -INF, NAN),
    ("log1p_f32", INF, INF),
    ("log1p_f32", 1e-30, 1e-30),
    ("log1p_f32", -1e-45, -1e-45),
    ("tanh_f32", 0.0, 0.0),
    ("tanh_f32", 10.0, 1.0),
    ("tanh_f32", -10.0, -1.0),
    ("tanh_f32", 1e30, 1.0),
    ("tanh_f32", -FLT_MAX, -1.0),
    ("tanh_f32", INF, 1.0),
    ("tanh_f32", -INF, -1.0),
    ("tanh_f32", 1e-30, 1e-30),
    ("sigmoid_f32", 0.0, 0.5),
    ("sigmoid_f32", INF, 1.0),
    ("sigmoid_f32", -INF, 0.0),
    ("sigmoid_f32", 20.0, 1.0),
    ("sigmoid_f32", 1e30, 1.0),
    ("sigmoid_f32", -200.0, 0.0),
    ("sigmoid_f32", -FLT_MAX, 0.0),
    ("softplus_f32", INF, INF),
    ("softplus_f32", -INF, 0.0),
    ("softplus_f32", 20.0, 20.0),
    ("softplus_f32", 1e30, 1e30),
    ("softplus_f32", FLT_MAX, FLT_MAX),
    ("softplus_f32", -200.0, 0.0),
    ("tanh_f32", 9.02, 1.0),  # the documented saturation points
    ("sigmoid_f32", 16.64, 1.0),
    ("sigmoid_f32", -103.98, 0.0),
    ("softplus_f32", 14.57, 14.57),
    ("logsigmoid_f32", -14.57, -14.57),
    ("logsigmoid_f32", -INF, -INF),
    ("logsigmoid_f32", INF, 0.0),
    ("logsigmoid_f32", -20.0, -20.0),
    ("logsigmoid_f32", -1e30, -1e30),
] + [(name, NAN, NAN) for name in NAMES]


@pytest.mark.parametrize(("name", "x", "expected"), SPECIAL)
def test_special_values(name: str, x: float, expected: float) -> None:
    got = _exact(name, x)
    if np.isnan(expected):
        assert np.isnan(got)
    else:
        assert got == np.float32(expected), got


@pytest.mark.parametrize("name", ["log1p_f32", "tanh_f32"])
def test_odd_at_negative_zero(name: str) -> None:
    assert np.signbit(_exact(name, -0.0))


def test_sigmoid_softplus_never_nan_for_numbers() -> None:
    x = np.array([-FLT_MAX, -1e30, -1e4, -100.0, 100.0, 1e4, 1e30, FLT_MAX], np.float32)
    for name in ("sigmoid_f32", "softplus_f32", "logsigmoid_f32", "tanh_f32"):
        assert not np.isnan(_apply(name, x)).any(), name


# LLVM "vectorises" a libm loop too, into `call @llvm.exp.v16f32` that is later split into
# 16 scalar `expf` calls; so demand packed *arithmetic* and no libm call, not just vector types.
_PACKED_IR = re.compile(r"= (fmul|fadd|fsub|fdiv)\b[^\n]*<(8|16) x float>")
_LIBM_IR = re.compile(r"@(expf|logf|log1pf|tanhf|llvm\.(exp|exp2|log|log2|log10|tanh)\.)")
_PACKED_ASM = re.compile(r"\bv(mul|add|sub|div|fn?m(add|sub)\w*)ps\s[^\n]*%[yz]mm")


def _vectorisation_problems(dispatcher: numba.core.dispatcher.Dispatcher) -> list[str]:
    sig = dispatcher.signatures[0]
    llvm_ir = dispatcher.inspect_llvm(sig)
    asm = dispatcher.inspect_asm(sig)
    problems = []
    if not _PACKED_IR.search(llvm_ir):
        problems.append("no packed <8|16 x float> arithmetic in the LLVM IR")
    if _LIBM_IR.search(llvm_ir):
        problems.append("a libm call is left in the LLVM IR")
    if "fpext" in llvm_ir or "x double>" in llvm_ir:
        problems.append("float64 promotion in the LLVM IR")
    if platform.machine().lower() in ("x86_64", "amd64") and not _PACKED_ASM.search(asm):
        problems.append("no packed ymm/zmm float arithmetic in the assembly")
    return problems


@pytest.mark.parametrize("name", NAMES)
def test_vectorises(name: str) -> None:
    """The loop `out[i] = f(x[i])` must compile to packed float SIMD, no libm call left."""
    loop = _loop(name)
    x = np.linspace(-3, 3, 64, dtype=np.float32)
    loop(x, np.empty_like(x))
    assert _vectorisation_problems(loop) == []


def test_vectorisation_check_rejects_libm() -> None:
    """The check above is not vacuous: the same loop over math.exp fails it."""

    @numba.njit
    def loop(x, out):  # type: ignore[no-untyped-def]
        for i in range(x.shape[0]):
            out[i] = math.exp(x[i])

    x = np.linspace(-3, 3, 64, dtype=np.float32)
    loop(x, np.empty_like(x))
    assert "a libm call is left in the LLVM IR" in _vectorisation_problems(loop)
    assert "no packed <8|16 x float> arithmetic in the LLVM IR" in _vectorisation_problems(loop)


def test_vectorises_in_fastmath_caller() -> None:
    """A fastmath kernel must neither break vectorisation nor the IEEE tricks inside."""
    f = fm.softplus_f32

    @numba.njit(fastmath=True)
    def loop(x, out):  # type: ignore[no-untyped-def]
        for i in range(x.shape[0]):
            out[i] = f(x[i])

    x = np.array([np.nan, -np.inf, np.inf, -200.0, 0.0, 1e30], dtype=np.float32)
    out = np.empty_like(x)
    loop(x, out)
    assert np.isnan(out[0])
    assert out[1:].tolist() == [0.0, np.inf, 0.0, np.float32(np.log(2.0)), np.float32(1e30)]
    assert _vectorisation_problems(loop) == []


def test_several_calls_vectorise() -> None:
    """A GRU-like step with many calls is still one vectorised loop (forced inlining)."""
    sig, th, sp = fm.sigmoid_f32, fm.tanh_f32, fm.softplus_f32

    @numba.njit
    def step(h, xz, xh, out):  # type: ignore[no-untyped-def]
        for i in range(h.shape[0]):
            z = sig(xz[i])
            c = th(xh[i] + sp(h[i]))
            out[i] = (np.float32(1.0) - z) * h[i] + z * c

    a = np.linspace(-3, 3, 64, dtype=np.float32)
    step(a, a, a, np.empty_like(a))
    assert _vectorisation_problems(step) == []

"""The per-channel CPU kernels' channel loops vectorise with no runtime overlap checks.

numba marks a parallel kernel's array arguments noalias only when no variable in it may alias
another; with `h_prev = h0_ if t == 0 else s` it does not, and LLVM then guards the vectorised
channel loop with an overlap check per pair of arrays. ParaLSTM's backward and Newton
linearise kernels had more pairs than LLVM allows and ran scalar: 5-15x slower (see
docs/benchmarks.md). Compiled here without numba's cache, which disables inspection.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from paracompile._analyse import analyse
from paracompile._codegen import render, render_context
from paracompile._driver import metadata
from paracompile._parse import parse_cell

CELLS = Path(__file__).resolve().parent.parent / "cells"
_PACKED = re.compile(r"= (fmul|fadd|fsub)\b[^\n]*<(2|4|8|16) x (float|double)>")


def _load(name: str, dtype: str, tmp_path_factory):
    analysis = analyse(parse_cell((CELLS / f"{name}.cell").read_text(), f"{name}.cell"))
    meta = metadata(analysis, "test")
    source = render(analysis, "cpu", dtype, meta)
    path = tmp_path_factory.mktemp("vectorise") / f"vec_{name}_{dtype}.py"
    path.write_text(source.replace("cache=True", "cache=False"))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return render_context(analysis, "cpu", dtype, meta), mod


@pytest.fixture(scope="module", params=["paragru", "paralstm"])
def module(request, tmp_path_factory):
    return _load(request.param, "float32", tmp_path_factory)


@pytest.fixture(scope="module", params=["paragru", "paralstm"])
def module64(request, tmp_path_factory):
    return _load(request.param, "float64", tmp_path_factory)


def _call(ctx, mod, kernel: str, B: int, T: int, D: int, LT: int = 1, CH: int = 64) -> str:
    """Run `kernel` once on small arrays sized from its argument names; its LLVM IR (CH, the
    channels per task, is a run-time argument: one compiled loop serves every block)."""
    nt = (T + LT - 1) // LT
    sizes = {"h0_": B * D, "gh0_": B * D, "gp": B * D, "p": D, "chunk_A": B * nt * D,
             "chunk_v": B * nt * D, "resid": ctx.k * B * nt * D, "scale": ctx.k * B * nt * D,
             "B": B, "T": T, "D": D, "CH": CH, "LT": LT}
    args: list = []
    for arg in ctx.kernel_args[kernel]:
        group = re.fullmatch(r"(h0_|gh0_|[A-Za-z_]+?)[\d_]*", arg).group(1)
        size = sizes.get(group, B * T * D)  # x, s, fval, jac, gs, gy, gx: (B, T, D)
        if arg in ("B", "T", "D", "CH", "LT"):
            args.append(size)
        elif arg == "mask":  # forward_sequential: every (sequence, channel block) task runs
            args.append(np.ones(B * -(-D // CH), np.uint8))
        else:
            args.append(np.full(size, 0.5, np.dtype(ctx.dtype)))
    fn = getattr(mod, kernel)
    fn(*args)
    return "\n".join(fn.inspect_llvm().values())


def _check(llvm_ir: str) -> None:
    assert _PACKED.search(llvm_ir), "no packed float arithmetic: the channel loop is scalar"
    # a few checks between the slots of one output array (ParaLSTM's two residual rows) are
    # fine; one per pair of arrays is what made ParaLSTM's kernels run scalar
    assert llvm_ir.count("found.conflict") <= 8, "runtime overlap checks between arrays"


def test_backward_adjoint_vectorises(module) -> None:
    ctx, mod = module
    _check(_call(ctx, mod, "backward_adjoint", B=1, T=3, D=32))


def test_newton_linearise_vectorises(module) -> None:
    ctx, mod = module
    _check(_call(ctx, mod, "newton_linearise", B=1, T=4, D=32, LT=2))


def test_forward_sequential_vectorises(module) -> None:
    ctx, mod = module
    # two channel blocks, the second one short: the block is a run-time argument
    _check(_call(ctx, mod, "forward_sequential", B=2, T=3, D=40, CH=32))


def _check_prefetching_backward(ctx, mod) -> None:
    """backward_adjoint walks time backwards, which the hardware prefetchers follow poorly:
    every (B, T, D) array it streams is prefetched (paracompile/_prefetch.py), LINES_AT_ONCE
    cache lines of channels per iteration of its main channel loop, and that loop is
    vectorised.

    T=12 > PREFETCH_ROWS + 1, so both the prefetching and the near-the-start rows run; D=70
    in blocks of 64: one block runs the main loop (64 channels = LINES_AT_ONCE lines of 16
    float32, or twice 4 lines of 8 float64), the other only the loop over the rest."""
    llvm_ir = _call(ctx, mod, "backward_adjoint", B=1, T=12, D=70)
    _check(llvm_ir)
    streams = 2 * ctx.k + ctx.o + 2 * ctx.m  # s (the row before), gs, gy, x, gx
    per_iteration = int(mod.LINES_AT_ONCE) * streams
    # LLVM unrolls the main loop's fixed LINE-channel inner loop and vectorises across it
    # (SLP): the block that issues an iteration's prefetches also does its arithmetic
    blocks = re.split(r"\n(?=[\w.]+:)", llvm_ir)
    main = [b for b in blocks if b.count("call void @llvm.prefetch") >= per_iteration]
    assert main, "no block prefetches LINES_AT_ONCE lines of every stream"
    assert any(_PACKED.search(b) for b in main), "the main channel loop is scalar"


def test_backward_adjoint_prefetches_and_vectorises(module) -> None:
    _check_prefetching_backward(*module)


def test_backward_adjoint_prefetches_and_vectorises_float64(module64) -> None:
    _check_prefetching_backward(*module64)


def test_prefetch_leaves_values_alone() -> None:
    from numba import njit

    from paracompile._prefetch import prefetch

    @njit
    def total(a):
        s = a[0] * 0
        for i in range(a.size):
            prefetch(a, i + 8)  # past the end near the last elements: a hint, never a fault
            s += a[i]
        return s

    values = np.arange(10, dtype=np.float32)
    assert total(values) == values.sum()


def test_prefetch_is_a_no_op_in_python() -> None:
    """With NUMBA_DISABLE_JIT=1 (the fuzz tests) generated kernels run as Python: the hint
    must be callable there too."""
    from paracompile._prefetch import prefetch

    assert prefetch(np.zeros(4, np.float32), 2) is None

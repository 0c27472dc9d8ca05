"""The CUDA kernels on a real GPU, through the public API, against the torch reference.

Runs only where torch sees a CUDA device (the project's CI has none; see docs/cuda.md for
how they were run on a lent H100). Without a GPU the same kernels are tested in numba's
simulator (test_cuda_sim.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import paracompile

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CELLS = Path(__file__).resolve().parent.parent / "cells"
PER_CHANNEL = ["paragru", "paralstm", "mingru", "indrnn", "coupled3"]


def _case(cell, B, T, D, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = {"dtype": dtype, "device": "cuda", "generator": gen}
    xs = {n: torch.randn(B, T, D, **kw).requires_grad_() for n in cell.inputs}
    # positive params in [0, 0.5): stable recurrences for every shipped cell (Coupled3's
    # damping must be positive, or the oscillator grows without bound over long T)
    ps = {n: (0.5 * torch.rand(() if k == "scalar" else (D,), **kw)).requires_grad_()
          for n, k in cell.params.items()}
    h0 = {s: (0.5 * torch.randn(B, D, **kw)).requires_grad_() for s in cell.states}
    return xs, ps, h0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["sequential", "newton"])
@pytest.mark.parametrize("name", PER_CHANNEL)
@pytest.mark.parametrize("T", [1, 77, 1000, 5003])
def test_cuda_matches_reference(name, method, dtype, T):
    cell = paracompile.load(CELLS / f"{name}.cell")
    B, D = 3, 37
    xs, ps, h0 = _case(cell, B, T, D, dtype)
    leaves = [*xs.values(), *ps.values(), *h0.values()]
    ref = cell.apply(xs, ps, h0, backend="torch")
    out = cell.apply(xs, ps, h0, method=method, backend="cuda")
    assert all(v.is_cuda for v in out.values())
    gen = torch.Generator(device="cuda").manual_seed(1)
    cot = {n: torch.randn(v.shape, dtype=dtype, device="cuda", generator=gen)
           for n, v in ref.items()}
    g_ref = torch.autograd.grad(sum((ref[n] * cot[n]).sum() for n in ref), leaves)
    g_out = torch.autograd.grad(sum((out[n] * cot[n]).sum() for n in out), leaves)
    eps = torch.finfo(dtype).eps
    # float64: tight; float32: rounding grows like sqrt(T) along the recurrence
    rtol = 1e-10 if dtype == torch.float64 else 50 * eps * (T ** 0.5)
    for n in ref:
        torch.testing.assert_close(out[n], ref[n], rtol=rtol, atol=rtol)
    for a, b in zip(g_out, g_ref, strict=True):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_cuda_newton_long_sequence(name):
    cell = paracompile.load(CELLS / f"{name}.cell")
    xs, ps, h0 = _case(cell, 2, 65536, 64, torch.float32)
    with torch.no_grad():
        seq = cell.apply(xs, ps, h0, method="sequential", backend="cuda")
        new = cell.apply(xs, ps, h0, method="newton", backend="cuda")
    for n in seq:
        torch.testing.assert_close(new[n], seq[n], rtol=1e-5, atol=1e-5)

"""Tests of the pure-torch reference backend (`paracompile._reference`).

The cells are written by hand here (as in cells/*.cell), so these tests depend on
nothing but torch: `newton` (parallel-in-time solve + adjoint backward) must agree with the
plain `sequential` loop differentiated by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from paracompile import _reference as R
from paracompile._defaults import default_tol

F64, F32 = torch.float64, torch.float32


# --------------------------------------------------------------------------------------------
# cells, by hand


def paragru(s, x, p):
    (h,), (x_z, x_r, x_h), (a_z, a_r, a_h) = s, x, p
    z = torch.sigmoid(a_z * h + x_z)
    r = torch.sigmoid(a_r * h + x_r)
    hc = torch.tanh(a_h * (h * r) + x_h)
    return ((1 - z) * h + z * hc,), ()


def paralstm(s, x, p):
    (c, h), (x_f, x_c, x_o), (a_f, c_f, a_c, a_o, c_o) = s, x, p
    f = torch.sigmoid(a_f * h + c_f * c + x_f)
    cn = torch.tanh(a_c * h + x_c)
    c2 = f * c + (1 - f) * cn
    o = torch.sigmoid(a_o * h + c_o * c2 + x_o)
    return (c2, o * torch.tanh(c2)), ()


def elman(s, x, p):
    """Dense: h' = tanh(W @ h + x + b), with an output."""
    (h,), (x,), (W, b) = s, x, p
    h2 = torch.tanh(h @ W.T + x + b)
    return (h2,), (2 * h2 + h,)


def coupled3(s, x, p):
    """Three coupled states per channel (block(3)), a scalar param, and an output that reads
    primed states."""
    (a, b, c), (x_a, x_b, x_c), (p_a, p_b, q) = s, x, p
    a2 = torch.tanh(p_a * a + q * c + x_a)
    g = torch.sigmoid(p_b * b + a)
    b2 = g * b + (1 - g) * torch.tanh(x_b + c)
    c2 = 0.9 * c * torch.tanh(b) + 0.5 * x_c * a
    return (a2, b2, c2), (a2 * c2 + b2,)


def bistable(s, x, p):
    """h' = tanh(w h + x) with w = 3: two wells; the initial guess f(0, x) ignores memory and
    Newton needs about T iterations (it only advances by the prefix property)."""
    (h,), (x,), (w,) = s, x, p
    return (torch.tanh(w * h + x),), ()


def logistic(s, x, p):
    """The logistic map h' = r h (1 - h) + x, chaotic at r = 3.9: Newton diverges (overflow,
    NaN) and `newton` must fall back to the loop."""
    (h,), (x,), (r,) = s, x, p
    return (r * h * (1 - h) + x,), ()


@dataclass(frozen=True)
class Cell:
    step: object
    k: int
    m: int
    params: object  # (D, generator) -> list of float64 tensors
    dense: bool


def _u(D, g, lo=-1.0, hi=1.0):
    return torch.rand(D, generator=g, dtype=F64) * (hi - lo) + lo


CELLS = {
    "paragru": Cell(paragru, 1, 3, lambda D, g: [_u(D, g) for _ in range(3)], False),
    "paralstm": Cell(paralstm, 2, 3, lambda D, g: [_u(D, g) for _ in range(5)], False),
    "elman": Cell(elman, 1, 1, lambda D, g: [
        torch.randn(D, D, generator=g, dtype=F64) * 0.9 / math.sqrt(D), _u(D, g, -0.1, 0.1)],
        True),
    "coupled3": Cell(coupled3, 3, 3, lambda D, g: [
        _u(D, g), _u(D, g), torch.tensor(0.7, dtype=F64)], False),
}


def make(cell: Cell, B: int, T: int, D: int, dtype=F64, seed: int = 0, h0_zero: bool = False,
         grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    xs = tuple(torch.randn(B, T, D, generator=g, dtype=F64).to(dtype) for _ in range(cell.m))
    ps = tuple(p.to(dtype) for p in cell.params(D, g))
    if h0_zero:
        h0 = R.zeros_h0(cell.k, xs[0])
    else:
        h0 = tuple((0.5 * torch.randn(B, D, generator=g, dtype=F64)).to(dtype)
                   for _ in range(cell.k))
    if grad:
        for t in (*xs, *ps, *h0):
            t.requires_grad_(True)
    return h0, xs, ps


def cotangents(tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype) for t in tensors)


def grads(outs, cots, wrt):
    loss = sum((o * c).sum() for o, c in zip(outs, cots, strict=True))
    return torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)


def maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def maxabs(a):
    return max(x.abs().max().item() for x in a)


# --------------------------------------------------------------------------------------------
# building blocks


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("shape", [(2, 3, 2), (2, 5)])  # block (D=3, k=2) / dense (n=5)
def test_affine_scan_matches_loop(T, shape):
    g = torch.Generator().manual_seed(T)
    B, *batch, n = shape
    A = 0.8 * torch.randn(B, T, *batch, n, n, generator=g, dtype=F64)
    b = torch.randn(B, T, *batch, n, generator=g, dtype=F64)

    def loop(order):
        x, out = torch.zeros(B, *batch, n, dtype=F64), {}
        for t in order:
            x = (A[:, t] @ x.unsqueeze(-1)).squeeze(-1) + b[:, t]
            out[t] = x
        return torch.stack([out[t] for t in range(T)], dim=1)

    torch.testing.assert_close(R.affine_scan(A, b), loop(range(T)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.affine_scan(A, b, reverse=True), loop(reversed(range(T))),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CELLS))
def test_jacobians_match_autograd(name):
    cell = CELLS[name]
    B, T, D, k = 2, 3, 4, cell.k
    h0, xs, ps = make(cell, B, T, D, grad=False)
    states, _ = R.sequential(cell.step, h0, xs, ps)
    J_dense = R.jacobians(cell.step, h0, xs, ps, states, dense=True)
    assert J_dense.shape == (B, T, k * D, k * D)
    prev = [torch.cat([a[:, None], s[:, :-1]], dim=1) for a, s in zip(h0, states, strict=True)]
    for b in range(B):
        for t in range(T):
            def f(v, b=b, t=t):
                s = tuple(v.reshape(k, 1, D))
                ns, _ = cell.step(s, tuple(x[b:b + 1, t] for x in xs), ps)
                return torch.cat(ns, dim=-1)[0]

            J = torch.autograd.functional.jacobian(f, torch.cat([p[b, t] for p in prev]))
            torch.testing.assert_close(J_dense[b, t], J, rtol=1e-12, atol=1e-12)
    if not cell.dense:
        J_block = R.jacobians(cell.step, h0, xs, ps, states, dense=False)
        assert J_block.shape == (B, T, D, k, k)
        # the dense Jacobian is the block one, channel-strided: [i*D+d, j*D+d] = [d, i, j]
        J4 = J_dense.reshape(B, T, k, D, k, D)
        for d in range(D):
            torch.testing.assert_close(J4[:, :, :, d, :, d], J_block[:, :, d], rtol=0, atol=0)
        off = J4.clone()
        for d in range(D):
            off[:, :, :, d, :, d] = 0
        assert off.abs().max() == 0


def test_zeros_h0_and_residual():
    x = torch.randn(3, 5, 4, dtype=F64)
    h0 = R.zeros_h0(2, x)
    assert len(h0) == 2 and all(h.shape == (3, 4) and h.dtype == F64 and not h.any()
                                for h in h0)
    assert R.zeros_h0(1, x[:, 0])[0].shape == (3, 4)
    cell = CELLS["paralstm"]
    h0, xs, ps = make(cell, 2, 9, 4, grad=False)
    states, _ = R.sequential(cell.step, h0, xs, ps)
    assert R.residual(cell.step, h0, xs, ps, states) < 1e-15
    bad = (states[0], states[1].clone())
    bad[1][1, 4, 2] += 0.25
    assert R.residual(cell.step, h0, xs, ps, bad) > 0.1
    assert default_tol(F32) == default_tol("float32") == 16 * torch.finfo(F32).eps


# --------------------------------------------------------------------------------------------
# newton == sequential


CASES = [("paragru", False), ("paralstm", False), ("elman", True), ("coupled3", False),
         ("coupled3", True)]


@pytest.mark.parametrize(("name", "dense"), CASES)
def test_newton_matches_sequential_float64(name, dense):
    cell = CELLS[name]
    B, T, D = 3, 37, 4  # T not a power of two
    h0, xs, ps = make(cell, B, T, D)
    s_seq, y_seq = R.sequential(cell.step, h0, xs, ps)
    s_new, y_new, info = R.newton(cell.step, h0, xs, ps, dense=dense)
    assert len(s_new) == cell.k and len(y_new) == len(y_seq)
    assert all(s.shape == (B, T, D) for s in (*s_new, *y_new))
    assert info.converged and not info.fell_back and info.residual <= info.tol
    assert info.residuals[0] > 1e-3 and info.iterations >= 1
    assert maxdiff(s_new + y_new, s_seq + y_seq) < 1e-12

    cots = cotangents(s_seq + y_seq)
    wrt = (*xs, *ps, *h0)
    g_seq = grads(s_seq + y_seq, cots, wrt)
    g_new = grads(s_new + y_new, cots, wrt)
    for gs, gn in zip(g_seq, g_new, strict=True):
        assert gs.shape == gn.shape
        assert (gs - gn).abs().max().item() < 1e-10 * (1 + gs.abs().max().item())


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 100])
def test_newton_lengths(T):
    cell = CELLS["paralstm"]
    h0, xs, ps = make(cell, 2, T, 3, seed=T)
    s_seq, _ = R.sequential(cell.step, h0, xs, ps)
    s_new, _, info = R.newton(cell.step, h0, xs, ps, dense=False)
    assert maxdiff(s_new, s_seq) < 1e-12
    assert info.iterations <= max(T, 6)
    cots = cotangents(s_seq)
    wrt = (*xs, *ps, *h0)
    for gs, gn in zip(grads(s_seq, cots, wrt), grads(s_new, cots, wrt), strict=True):
        torch.testing.assert_close(gn, gs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [64, 300])
@pytest.mark.parametrize(("name", "dense"), CASES[:4])
def test_newton_matches_sequential_float32(name, dense, T):
    cell = CELLS[name]
    B, D = 4, 6
    h0, xs, ps = make(cell, B, T, D, dtype=F32, seed=2)
    s_seq, y_seq = R.sequential(cell.step, h0, xs, ps)
    s_new, y_new, info = R.newton(cell.step, h0, xs, ps, dense=dense)
    assert info.converged and not info.fell_back
    eps = torch.finfo(F32).eps
    tol = 8 * eps * math.sqrt(T)
    assert maxdiff(s_new + y_new, s_seq + y_seq) < tol * (1 + maxabs(s_seq + y_seq))
    cots = cotangents(s_seq + y_seq)
    wrt = (*xs, *ps, *h0)
    g_seq, g_new = grads(s_seq + y_seq, cots, wrt), grads(s_new + y_new, cots, wrt)
    for gs, gn in zip(g_seq, g_new, strict=True):
        # param gradients sum B*T terms: scale the tolerance with the number of terms
        assert (gs - gn).abs().max().item() < 8 * tol * math.sqrt(B) * (1 + gs.abs().max())


def test_three_iterations_reach_float32_precision():
    """The paper's observation for ParaGRU, at the reference's default tolerance."""
    cell = CELLS["paragru"]
    h0, xs, ps = make(cell, 4, 512, 32, dtype=F32, h0_zero=True, grad=False)
    ps = tuple(0.5 * p for p in ps)
    _, _, info = R.newton(cell.step, h0, xs, ps, dense=False)
    assert info.iterations == 3 and not info.needed_extra
    assert info.residuals == sorted(info.residuals, reverse=True)
    assert info.residual < 1e-6


# --------------------------------------------------------------------------------------------
# the guarantee: never silently different from the sequential answer


def test_hard_cell_needs_extra_iterations_and_still_matches():
    g = torch.Generator().manual_seed(3)
    B, T, D = 2, 48, 4
    xs = (0.5 * torch.randn(B, T, D, generator=g, dtype=F64),)
    ps = (torch.full((D,), 3.0, dtype=F64),)
    h0 = (torch.randn(B, D, generator=g, dtype=F64),)
    for t in (*xs, *ps, *h0):
        t.requires_grad_(True)
    s_seq, _ = R.sequential(bistable, h0, xs, ps)
    s_new, _, info = R.newton(bistable, h0, xs, ps, dense=False, iterations=3)
    assert info.residuals[3] > 1e-2  # three iterations are far from converged ...
    assert info.needed_extra and info.extra_iterations > 0 and info.iterations <= T
    assert info.converged and not info.fell_back  # ... so it kept iterating, to convergence
    assert maxdiff(s_new, s_seq) < 1e-12
    cots = cotangents(s_seq)
    wrt = (*xs, *ps, *h0)
    for gs, gn in zip(grads(s_seq, cots, wrt), grads(s_new, cots, wrt), strict=True):
        torch.testing.assert_close(gn, gs, rtol=1e-10, atol=1e-10)

    # capped below what it needs: falls back to the loop, and says so
    s_cap, _, info = R.newton(bistable, h0, xs, ps, dense=False, iterations=3,
                              max_iterations=5)
    assert info.fell_back and info.converged and info.iterations == 5 and info.needed_extra
    assert maxdiff(s_cap, s_seq) == 0


@pytest.mark.parametrize("dtype", [F32, F64])
def test_chaotic_cell_falls_back(dtype):
    g = torch.Generator().manual_seed(4)
    B, T, D = 2, 24, 3
    xs = (torch.zeros(B, T, D, dtype=dtype, requires_grad=True),)
    ps = (torch.tensor(3.9, dtype=dtype, requires_grad=True),)
    h0 = ((0.1 + 0.8 * torch.rand(B, D, generator=g, dtype=F64)).to(dtype).requires_grad_(),)
    s_seq, _ = R.sequential(logistic, h0, xs, ps)
    s_new, _, info = R.newton(logistic, h0, xs, ps, dense=False)
    assert math.isnan(info.residuals[-2])  # Newton blew up (overflow -> NaN) ...
    assert info.fell_back and info.needed_extra and info.converged  # ... so the loop ran
    assert maxdiff(s_new, s_seq) == 0
    cots = cotangents(s_seq)
    wrt = (*xs, *ps, *h0)
    for gs, gn in zip(grads(s_seq, cots, wrt), grads(s_new, cots, wrt), strict=True):
        # gradients of a chaotic map are huge (~3.9^T): compare relatively
        assert (gs - gn).abs().max() <= 1e3 * torch.finfo(dtype).eps * gs.abs().max()


def test_iterations_zero_and_quasi_newton_still_exact():
    cell = CELLS["coupled3"]
    h0, xs, ps = make(cell, 2, 20, 3, grad=False)
    s_seq, y_seq = R.sequential(cell.step, h0, xs, ps)
    s_new, y_new, info = R.newton(cell.step, h0, xs, ps, dense=False, iterations=0)
    assert maxdiff(s_new + y_new, s_seq + y_seq) < 1e-12 and info.requested == 0
    # a channel-mixing cell with dense=False: quasi-Newton (wrong J) — slow but still exact
    cell = CELLS["elman"]
    h0, xs, ps = make(cell, 2, 12, 4)
    s_seq, y_seq = R.sequential(cell.step, h0, xs, ps)
    s_new, y_new, info = R.newton(cell.step, h0, xs, ps, dense=False)
    assert maxdiff(s_new + y_new, s_seq + y_seq) < 1e-12 and info.converged


def test_partial_grads_and_no_grad():
    cell = CELLS["coupled3"]
    h0, xs, ps = make(cell, 2, 10, 3, h0_zero=True)
    s_new, y_new, _ = R.newton(cell.step, h0, xs, ps, dense=False)
    s_seq, y_seq = R.sequential(cell.step, h0, xs, ps)
    # a loss on the output alone, gradients w.r.t. a subset; h0 does not require grad
    (g_new,) = torch.autograd.grad((y_new[0] ** 2).sum(), [ps[2]])
    (g_seq,) = torch.autograd.grad((y_seq[0] ** 2).sum(), [ps[2]])
    assert g_new.shape == () and torch.allclose(g_new, g_seq, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        s_ng, _, _ = R.newton(cell.step, h0, xs, ps, dense=False)
    assert not s_ng[0].requires_grad and maxdiff(s_ng, s_new) == 0


def test_adjoint_function_matches_autograd():
    cell = CELLS["paralstm"]
    h0, xs, ps = make(cell, 2, 11, 3)
    s_seq, y_seq = R.sequential(cell.step, h0, xs, ps)
    cots = cotangents(s_seq)
    expect = grads(s_seq, cots, (*h0, *xs, *ps))
    g_h0, g_x, g_p = R.adjoint(cell.step, h0, xs, ps, [s.detach() for s in s_seq], cots, [],
                               dense=False)
    got = (*g_h0, *g_x, *g_p)
    for e, g in zip(expect, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    # a None cotangent means zeros
    g2 = R.adjoint(cell.step, h0, xs, ps, s_seq, [None, cots[1]], [], dense=False)
    s_seq, _ = R.sequential(cell.step, h0, xs, ps)
    expect2 = grads(s_seq[1:], cots[1:], (*h0, *xs, *ps))
    for e, g in zip(expect2, (*g2[0], *g2[1], *g2[2]), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "dense", "fast"), [
    ("paragru", False, False), ("paralstm", False, True), ("elman", True, False),
    ("coupled3", False, True), ("coupled3", True, True)])
def test_gradcheck(name, dense, fast):
    cell = CELLS[name]
    h0, xs, ps = make(cell, 2, 5, 2) if fast else make(cell, 1, 4, 2)
    k, m = cell.k, cell.m

    def f(*t):
        s, y, _ = R.newton(cell.step, t[:k], t[k:k + m], t[k + m:], dense=dense)
        return (*s, *y)

    assert torch.autograd.gradcheck(f, (*h0, *xs, *ps), eps=1e-6, atol=1e-7, rtol=1e-6,
                                    fast_mode=fast)


# --------------------------------------------------------------------------------------------
# edges and argument errors


def test_empty_sequence():
    cell = CELLS["coupled3"]
    h0, xs, ps = make(cell, 2, 0, 3, grad=False)
    s, y = R.sequential(cell.step, h0, xs, ps)
    assert [t.shape for t in s + y] == [(2, 0, 3)] * 4
    s, y, info = R.newton(cell.step, h0, xs, ps, dense=False)
    assert [t.shape for t in s + y] == [(2, 0, 3)] * 4 and info.iterations == 0


def test_bad_arguments():
    cell = CELLS["paragru"]
    h0, xs, ps = make(cell, 2, 4, 3, grad=False)
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        R.sequential(cell.step, h0, (xs[0], xs[1][:, :2], xs[2]), ps)
    with pytest.raises(ValueError, match=r"h0\[0\]"):
        R.newton(cell.step, (h0[0][:1],), xs, ps, dense=False)
    with pytest.raises(ValueError, match=r"params\[2\]"):
        R.newton(cell.step, h0, xs, (ps[0], ps[1], ps[2][:2]), dense=False)
    with pytest.raises(TypeError, match=r"inputs\[0\]"):
        R.sequential(cell.step, h0, (1.0, *xs[1:]), ps)
    with pytest.raises(ValueError, match="iterations"):
        R.newton(cell.step, h0, xs, ps, dense=False, iterations=-1)
    with pytest.raises(ValueError, match=r"states\[0\]"):
        R.residual(cell.step, h0, xs, ps, (xs[0][:, :3],))
    with pytest.raises(ValueError, match="new states"):
        R.sequential(lambda s, x, p: ((s[0], s[0]), ()), h0, xs, ps)

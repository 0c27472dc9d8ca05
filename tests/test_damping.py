"""Newton's damped phase: the Levenberg–Marquardt step (`_damping.lm_step` on the CPU,
`_reference.lm_solve` in torch), its λ control, and `cell.apply(damping=...)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import paracompile
from paracompile import _damping, _defaults, _reference

# plain Newton's residual grows on this cell (tanh(2h + x) flips between its two branches):
# 4 plain updates leave every channel unconverged, the LM updates after them converge
SHARP = "cell Sharp2\nstate h\ninput x\nh' = tanh(2 * h + x)\n"
ITERATIONS = 4


@pytest.fixture(scope="module")
def sharp():
    return paracompile.load(SHARP)


def _data(D: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 16, D, generator=g, dtype=torch.float64)}


def _dense_lm(J: np.ndarray, r: np.ndarray, lam: float) -> np.ndarray:
    """(LᵀL + λI) δ = -Lᵀ r with L assembled densely; J (T, k, k), r (T, k)."""
    T, k = r.shape
    L = np.eye(T * k)
    for t in range(1, T):
        L[t * k:(t + 1) * k, (t - 1) * k:t * k] = -J[t]
    A = L.T @ L + lam * np.eye(T * k)
    return np.linalg.solve(A, -L.T @ r.reshape(-1)).reshape(T, k)


@pytest.mark.parametrize("entries", [((0, 0),), ((0, 0), (0, 1), (1, 0), (1, 1)),
                                     ((0, 0), (1, 0), (1, 1))])
def test_lm_step_solves_the_block_tridiagonal_system(entries):
    rng = np.random.default_rng(0)
    k = 1 + max(max(e) for e in entries)
    B, T, D = 2, 9, 3
    jac = 1.5 * rng.normal(size=(len(entries), B * T * D))
    r = rng.normal(size=(k, B * T * D))
    lam = rng.uniform(1e-3, 2.0, size=B * D)
    move = np.ones(B * D, bool)
    move[4] = False
    delta = np.full_like(r, np.nan)
    _damping.lm_step(jac, np.array(entries, np.int64), r, lam, move, delta, T, D)
    for b in range(B):
        for d in range(D):
            J = np.zeros((T, k, k))
            for e, (i, j) in enumerate(entries):
                J[:, i, j] = jac[e].reshape(B, T, D)[b, :, d]
            rr = r.reshape(k, B, T, D)[:, b, :, d].T
            got = delta.reshape(k, B, T, D)[:, b, :, d].T
            if move[b * D + d]:
                np.testing.assert_allclose(got, _dense_lm(J, rr, lam[b * D + d]),
                                           rtol=0, atol=1e-12)
                # the torch reference's independent solve agrees
                ref = _reference.lm_solve(torch.from_numpy(J)[None],
                                          torch.from_numpy(rr)[None],
                                          torch.tensor([lam[b * D + d]]))[0]
                np.testing.assert_allclose(ref.numpy(), got, rtol=0, atol=1e-12)
            else:
                assert (got == 0).all()


def test_reference_lm_solve_dense_blocks():
    g = torch.Generator().manual_seed(1)
    B, T, n = 2, 6, 3
    J = torch.randn(B, T, n, n, generator=g, dtype=torch.float64)
    r = torch.randn(B, T, n, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.5, 1e-6], dtype=torch.float64)
    delta = _reference.lm_solve(J, r, lam)
    for b in range(B):
        want = _dense_lm(J[b].numpy(), r[b].numpy(), float(lam[b]))
        np.testing.assert_allclose(delta[b].numpy(), want, rtol=0, atol=1e-12)


def test_lm_with_tiny_lambda_is_the_newton_step():
    # λ → 0: (LᵀL) δ = -Lᵀ r, i.e. L δ = -r, the recurrence δ_t = J_t δ_{t-1} - r_t
    g = torch.Generator().manual_seed(2)
    J = 0.5 * torch.randn(1, 12, 2, 2, generator=g, dtype=torch.float64)
    r = torch.randn(1, 12, 2, generator=g, dtype=torch.float64)
    newton = _reference.affine_scan(J, -r)
    lm = _reference.lm_solve(J, r, torch.tensor([1e-14], dtype=torch.float64))
    torch.testing.assert_close(lm, newton, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_lm_rescues_what_plain_newton_cannot(sharp, backend):
    inputs = _data()
    ref = sharp.apply(inputs, {}, method="sequential", backend="cpu")["h"]
    plain = sharp.apply(inputs, {}, method="newton", backend=backend, iterations=ITERATIONS,
                        damping="none")["h"]
    none = dict(sharp.stats.last)
    lm = sharp.apply(inputs, {}, method="newton", backend=backend, iterations=ITERATIONS)["h"]
    last = sharp.stats.last
    n = 4 if backend == "cpu" else 2  # (b, channel) pairs on the CPU, sequences in torch
    assert none == {"iterations": ITERATIONS, "fallback_sequences": n, "histogram": []}
    # the fallback is the sequential answer (bit for bit on the CPU)
    torch.testing.assert_close(plain, ref, rtol=0, atol=0 if backend == "cpu" else 1e-14)
    assert last["fallback_sequences"] == 0
    assert ITERATIONS < last["iterations"] <= ITERATIONS + _defaults.DAMPED_STEPS
    # every one converged during the damped updates, the last of them at the last update
    assert sum(last["histogram"]) == n
    assert sum(last["histogram"][:ITERATIONS + 1]) == 0
    assert len(last["histogram"]) - 1 == last["iterations"]
    torch.testing.assert_close(lm, ref, rtol=0, atol=1e-12)


def test_plain_newton_diverges_on_the_test_cell(sharp):
    # the premise of the rescue test: plain Newton's residual grows, it is not just slow
    step = sharp._torch_step
    args = ((torch.zeros(2, 2, dtype=torch.float64),), (_data()["x"],), ())
    _, _, info = _reference.newton(step, *args, dense=False, iterations=ITERATIONS,
                                   max_iterations=ITERATIONS, damped=8, damping="none")
    res = info.residuals[:-1]  # the last one is after the fallback
    assert any(b > a for a, b in zip(res, res[1:], strict=False))
    assert res[-1] > 1.0


def test_reference_lm_follows_the_cpu_one(sharp):
    """D = 1: a sequence is a (sequence, channel) pair, so the counts are comparable; the two
    LM implementations take the same accept/reject decisions."""
    inputs = _data(D=1)
    out = {}
    for backend in ("cpu", "torch"):
        out[backend] = sharp.apply(inputs, {}, method="newton", backend=backend,
                                   iterations=ITERATIONS)["h"]
        out[backend + " stats"] = dict(sharp.stats.last)
    assert out["cpu stats"] == out["torch stats"]
    assert out["cpu stats"]["iterations"] > ITERATIONS
    torch.testing.assert_close(out["cpu"], out["torch"], rtol=0, atol=1e-12)


def test_dense_cell_lm_matches_sequential():
    cell = paracompile.load("cell DenseSharp\nstate h\ninput x\nparam W: matrix\n"
                            "h' = tanh(W @ h + x)\n")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, generator=g, dtype=torch.float64)
    W = 2.0 * torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g,
                                                                    dtype=torch.float64)
    ref = cell.apply({"x": x}, {"W": W}, method="sequential", backend="cpu")["h"]
    fallback = {}
    for backend in ("cpu", "torch"):
        out = cell.apply({"x": x}, {"W": W}, method="newton", backend=backend,
                         iterations=2)["h"]
        assert cell.stats.last["iterations"] == 2 + _defaults.DAMPED_STEPS
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        fallback[backend] = cell.stats.last["fallback_sequences"]
    # the torch reference's full Jacobian blocks rescue a sequence the CPU's channel-diagonal
    # (quasi-Newton) blocks do not
    assert fallback == {"cpu": 2, "torch": 1}


@pytest.mark.parametrize("value", ["LM", "step", None, 1])
def test_damping_is_checked(sharp, value):
    with pytest.raises(ValueError, match="damping must be one of"):
        sharp.apply(_data(), {}, method="newton", backend="cpu", damping=value)


def test_reference_checks_damping(sharp):
    args = ((torch.zeros(2, 2, dtype=torch.float64),), (_data()["x"],), ())
    with pytest.raises(ValueError, match="damping"):
        _reference.newton(sharp._torch_step, *args, dense=False, damping="halve")


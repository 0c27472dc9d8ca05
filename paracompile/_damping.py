"""The Levenberg–Marquardt step of Newton's damped phase on the CPU (ELK, Gonzalez et al.
2024): a block tridiagonal solve, sequential in time, parallel over (sequence, channel).

With the residual r_t = s_t - f(s_{t-1}, x_t) and L the block lower-bidiagonal operator
(L δ)_t = δ_t - J_t δ_{t-1} (δ_{-1} = 0), Newton solves L δ = -r; LM minimises
||L δ + r||² + λ ||δ||², i.e. solves the symmetric positive definite block tridiagonal system

    (LᵀL + λI) δ = -Lᵀ r,

whose diagonal blocks are (1 + λ) I + J_{t+1}ᵀ J_{t+1} ((1 + λ) I at t = T-1), off-diagonal
blocks -J_{t+1}ᵀ (above) and -J_{t+1} (below), right-hand side -(r_t - J_{t+1}ᵀ r_{t+1}).
λ → 0 gives the Newton step, large λ a short step along the residual's gradient -Lᵀ r / λ.

`lm_step` solves it per (sequence, channel) with k×k blocks (k states) by a block Thomas
recursion (the Schur complements S_t = D_t - J_t S_{t-1}^{-1} J_tᵀ are SPD, so elimination
without pivoting is stable), written out for any k with no np.linalg in the loop. The λ
control is the caller's (`_cpu._Newton`, constants in `_defaults`). Imports only numba and
numpy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, error_model="numpy")
def _solve_small(S: np.ndarray, R: np.ndarray) -> None:
    """S X = R in place (X overwrites R) for a small SPD S (k×k, destroyed) and R (k×m):
    Gaussian elimination without pivoting (stable for SPD), then back substitution."""
    k, m = R.shape
    for p in range(k):
        inv = 1.0 / S[p, p]
        for i in range(p + 1, k):
            f = S[i, p] * inv
            for j in range(p + 1, k):
                S[i, j] -= f * S[p, j]
            for j in range(m):
                R[i, j] -= f * R[p, j]
    for p in range(k - 1, -1, -1):
        inv = 1.0 / S[p, p]
        for j in range(m):
            acc = R[p, j]
            for i in range(p + 1, k):
                acc -= S[p, i] * R[i, j]
            R[p, j] = acc * inv


@njit(cache=True, error_model="numpy")
def _load(J: np.ndarray, jac: np.ndarray, entries: np.ndarray, at: int) -> None:
    """J = the Jacobian block stored at flat index `at` (its nonzero entries, in `entries`
    order; the others are structurally zero)."""
    J[:, :] = 0
    for e in range(entries.shape[0]):
        J[entries[e, 0], entries[e, 1]] = jac[e, at]


@njit(parallel=True, cache=True, error_model="numpy")
def lm_step(jac: np.ndarray, entries: np.ndarray, r: np.ndarray, lam: np.ndarray,
            move: np.ndarray, delta: np.ndarray, T: int, D: int) -> None:
    """The LM step δ of every (sequence b, channel d) with move[b * D + d] (δ = 0 elsewhere).

    jac: (n_jac, B*T*D), the nonzero entries of J_t (J_t[entries[e, 0], entries[e, 1]] at
    [e, (b*T + t)*D + d]); r: (k, B*T*D), the residuals s_t - f(s_{t-1}) in the same layout;
    lam: (B*D,) λ per (b, d); delta (out): (k, B*T*D).
    """
    k = r.shape[0]
    dtype = r.dtype
    for task in prange(lam.shape[0]):
        b = task // D
        d = task % D
        if not move[task]:
            for t in range(T):
                for i in range(k):
                    delta[i, (b * T + t) * D + d] = 0
            continue
        lam1 = 1.0 + lam[task]
        C = np.empty((T, k, k), dtype)  # C_t = S_t^{-1} U_t, U_t = -J_{t+1}ᵀ
        y = np.empty((T, k), dtype)  # y_t = S_t^{-1} (g_t - L_t y_{t-1}), L_t = -J_t
        Jc = np.zeros((k, k), dtype)  # J_t
        Jn = np.zeros((k, k), dtype)  # J_{t+1}
        S = np.empty((k, k), dtype)
        R = np.empty((k, k + 1), dtype)
        _load(Jc, jac, entries, b * T * D + d)
        for t in range(T):
            at = (b * T + t) * D + d
            nxt = at + D
            last = t == T - 1
            if last:
                Jn[:, :] = 0
            else:
                _load(Jn, jac, entries, nxt)
            # S_t = D_t - L_t C_{t-1} = (1 + λ) I + J_{t+1}ᵀ J_{t+1} + J_t C_{t-1}
            for i in range(k):
                for j in range(k):
                    acc = lam1 if i == j else 0.0
                    for m in range(k):
                        acc += Jn[m, i] * Jn[m, j]
                    if t > 0:
                        for m in range(k):
                            acc += Jc[i, m] * C[t - 1, m, j]
                    S[i, j] = acc
                # R = [U_t | g_t + J_t y_{t-1}], g_t = -(r_t - J_{t+1}ᵀ r_{t+1})
                for j in range(k):
                    R[i, j] = -Jn[j, i]
                g = -r[i, at]
                if not last:
                    for m in range(k):
                        g += Jn[m, i] * r[m, nxt]
                if t > 0:
                    for m in range(k):
                        g += Jc[i, m] * y[t - 1, m]
                R[i, k] = g
            _solve_small(S, R)
            for i in range(k):
                for j in range(k):
                    C[t, i, j] = R[i, j]
                y[t, i] = R[i, k]
            Jc[:, :] = Jn
        # back substitution: δ_{T-1} = y_{T-1}, δ_t = y_t - C_t δ_{t+1}
        for i in range(k):
            delta[i, (b * T + T - 1) * D + d] = y[T - 1, i]
        for t in range(T - 2, -1, -1):
            at = (b * T + t) * D + d
            for i in range(k):
                acc = y[t, i]
                for j in range(k):
                    acc -= C[t, i, j] * delta[j, at + D]
                delta[i, at] = acc

"""Launcher of the generated CPU kernels (``templates/cpu.py.jinja`` for per-channel cells,
``templates/cpu_dense.py.jinja`` for cells with matrix parameters): the host side of the
sequential and Newton methods, once for both kinds of module.

Given a loaded generated module and CPU torch tensors of its dtype, allocate the results, run
the kernels on flat numpy views, recompute the sequences Newton did not converge on with the
sequential kernel, and return the results and a `ForwardStats`. The interface is the one
`_cuda` has (see `_backend`).

The module provides, besides its kernels: ``F`` (its numpy dtype), ``N_JAC`` (the number of
structurally nonzero Jacobian entries), ``N_OUTPUTS`` (the cell's outputs) and
``OUTPUTS_KERNEL`` (whether ``forward_outputs`` computes the outputs from known states; the
dense kernels compute them only in ``forward_sequential``). Matrix params are passed to every
kernel that takes them; per-channel modules have none, so the calls are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from . import _defaults
from ._backend import ForwardStats


def forward(module: ModuleType, h0s: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
            ps: Sequence[torch.Tensor], *, method: str = "auto", iterations: int | None = None,
            tol: float | None = None, chunk: int | None = None,
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], ForwardStats]:
    """Run the forward recurrence.

    h0s: k tensors (B, D); xs: m tensors (B, T, D); ps: the params in declaration order.
    method: "sequential", "newton" or "auto" (see `_defaults.auto_method`); iterations and
    tol: Newton's (defaults `_defaults.default_iterations` and `_defaults.default_tol`);
    chunk: time steps per Newton task (default `_defaults.CPU_TIME_CHUNK`).

    Returns (states: k tensors (B, T, D), outputs: o tensors (B, T, D), stats).
    """
    B, T, D = xs[0].shape
    dtype = xs[0].dtype
    p, M = _split_params(ps)
    method = _defaults.resolve_method(method, "cpu", dense=bool(M))
    iterations = _defaults.default_iterations(dtype) if iterations is None else iterations
    tol = _defaults.default_tol(dtype) if tol is None else tol
    chunk = _defaults.CPU_TIME_CHUNK if chunk is None else chunk
    states = [xs[0].new_empty(B, T, D) for _ in h0s]
    outputs = [xs[0].new_empty(B, T, D) for _ in range(module.N_OUTPUTS)]
    stats = ForwardStats(method)
    if B * D == 0 or T == 0:
        return states, outputs, stats
    args = (*[_flat(h) for h in h0s], *[_flat(x) for x in xs], *p, *M)
    s, y = [_out(t) for t in states], [_out(t) for t in outputs]
    mask = np.ones(B, np.uint8)  # the sequences the sequential kernel (re)computes
    if method == "newton":
        done, bad, residual = _newton(module, args, s, (B, T, D), iterations, tol, chunk)
        if module.OUTPUTS_KERNEL:
            module.forward_outputs(*args, *s, *y, B, T, D, chunk)
        if module.OUTPUTS_KERNEL or not module.N_OUTPUTS:
            mask[:] = bad
        # else every sequence reruns: the outputs come from the sequential kernel
        stats = ForwardStats(method, done, int(bad.sum()), residual, chunk)
    if mask.any():
        module.forward_sequential(*args, *s, *y, mask, B, T, D)
    return states, outputs, stats


def _newton(module: ModuleType, args: tuple[np.ndarray, ...], s: list[np.ndarray],
            shape: tuple[int, int, int], iterations: int, tol: float,
            chunk: int) -> tuple[int, np.ndarray, float]:
    """Newton's iterations on the states `s` (written in place) until every sequence has
    converged or `iterations` updates were done. Returns (updates done, the unconverged
    sequences as a bool (B,) array, the largest relative residual of the last iterate)."""
    B, T, D = shape
    k, n_jac, F = len(s), module.N_JAC, module.F
    nt = -(-T // chunk)
    fv = [np.empty_like(s[0]) for _ in range(k)]
    jac = [np.empty_like(s[0]) for _ in range(n_jac)]
    # per (sequence, time chunk, channel): the chunk's composed affine map and incoming delta
    sa = [np.empty(B * nt * D, F) for _ in range(n_jac)]
    sb = [np.empty(B * nt * D, F) for _ in range(k)]
    carry = [np.empty(B * nt * D, F) for _ in range(k)]
    resid = np.empty(k * B * nt * D, F)
    scale = np.empty_like(resid)
    module.newton_guess(*args, *s, B, T, D, chunk)
    done = 0
    while True:
        module.newton_linearise(*args, *s, *fv, *jac, *sa, *sb, resid, scale, B, T, D, chunk)
        bad, residual = _unconverged(resid.reshape(k, B, nt, D), scale.reshape(k, B, nt, D),
                                     tol)
        if not bad.any() or done == iterations:
            return done, bad, residual
        module.newton_carry(*sa, *sb, *carry, B, nt, D)
        module.newton_fixup(*fv, *jac, *carry, *s, B, T, D, chunk)
        done += 1


def _unconverged(resid: np.ndarray, scale: np.ndarray, tol: float) -> tuple[np.ndarray, float]:
    """Per sequence: some state and channel has max_t |h_t - f(h_{t-1})| > tol * max_t |h_t|,
    from the per-(state, sequence, time chunk, channel) maxima the kernels stored. The scale is
    clamped to [tiny / eps, max]: an all-zero channel converges, an overflowed one never does;
    `not <=` flags NaN residuals. Also returns the largest relative residual."""
    finfo = np.finfo(resid.dtype)
    floor = resid.dtype.type(finfo.tiny / finfo.eps)
    relative = resid.max(axis=2) / np.clip(scale.max(axis=2), floor, finfo.max)
    return ~(relative <= tol).all(axis=(0, 2)), float(relative.max())


def backward(module: ModuleType, g_states: Sequence[torch.Tensor | None],
             g_outputs: Sequence[torch.Tensor | None], h0s: Sequence[torch.Tensor],
             xs: Sequence[torch.Tensor], ps: Sequence[torch.Tensor],
             states: Sequence[torch.Tensor],
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of sum(g_states * states) + sum(g_outputs * outputs).

    g_states: k tensors (B, T, D) and g_outputs: o tensors (B, T, D) (None means zeros);
    states: the forward states. Returns (g_h0s: k (B, D), g_xs: m (B, T, D), g_ps shaped like
    ps).
    """
    B, T, D = xs[0].shape
    if B * D == 0 or T == 0:
        return ([h.new_zeros(h.shape) for h in h0s], [x.new_zeros(x.shape) for x in xs],
                [q.new_zeros(q.shape) for q in ps])
    g_states = [_flat(states[0].new_zeros(B, T, D) if g is None else g) for g in g_states]
    g_outputs = [_flat(states[0].new_zeros(B, T, D) if g is None else g) for g in g_outputs]
    # fresh contiguous buffers: the kernels write through flat views of them (an input's
    # layout, e.g. transposed, must not leak into its gradient's buffer)
    g_h0s = [h.new_empty(h.shape) for h in h0s]
    g_xs = [x.new_empty(x.shape) for x in xs]
    p, M = _split_params(ps)
    # per-(b, d) partial gradients of vector and scalar params, per-b ones of matrices
    g_p = [np.empty(B * D, v.dtype) for v in p]
    g_M = [np.zeros((B, D, D), m.dtype) for m in M]
    module.backward_adjoint(*g_states, *g_outputs, *[_flat(h) for h in h0s],
                            *[_flat(x) for x in xs], *p, *M, *[_flat(s) for s in states],
                            *[_out(g) for g in g_h0s], *[_out(g) for g in g_xs], *g_p, *g_M,
                            B, T, D)
    g_ps, partials, matrices = [], iter(g_p), iter(g_M)
    for q in ps:
        if q.dim() == 2:
            g_ps.append(torch.from_numpy(next(matrices).sum(axis=0)))
        else:
            partial = torch.from_numpy(next(partials).reshape(B, D))
            g_ps.append(partial.sum(0) if q.dim() == 1 else partial.sum())
    return g_h0s, g_xs, g_ps


def _flat(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a CPU tensor to read from (a contiguous copy if it is strided,
    expanded or sliced)."""
    return t.detach().contiguous().reshape(-1).numpy()


def _out(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a tensor the kernels write into: it must be contiguous, or the
    writes would go to a copy."""
    if not t.is_contiguous():
        raise AssertionError("paracompile: a kernel output buffer is not contiguous")
    return t.detach().view(-1).numpy()


def _split_params(ps: Sequence[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(flat vector and scalar params, (D, D) matrix params), each in declaration order: the
    kernels take them in two groups. A param's kind is its rank (vector 1, scalar 0, matrix 2:
    the runtime has checked the shapes)."""
    vec, mats = [], []
    for p in ps:
        if p.dim() == 2:
            mats.append(p.detach().contiguous().numpy())
        else:
            vec.append(_flat(p))
    return vec, mats

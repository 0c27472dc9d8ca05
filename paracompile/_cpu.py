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

import numba
import numpy as np
import torch

from . import _damping, _defaults
from ._backend import ForwardStats


def forward(module: ModuleType, h0s: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
            ps: Sequence[torch.Tensor], *, method: str = "auto", iterations: int | None = None,
            tol: float | None = None, chunk: int | None = None, damping: str = "lm",
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], ForwardStats]:
    """Run the forward recurrence.

    h0s: k tensors (B, D); xs: m tensors (B, T, D); ps: the params in declaration order.
    method: "sequential", "newton" or "auto" (see `_defaults.auto_method`); iterations and
    tol: Newton's (defaults `_defaults.default_iterations` and `_defaults.default_tol`);
    chunk: time steps per Newton task (default `_defaults.CPU_TIME_CHUNK`). The channels per
    task are `_defaults.cpu_channel_block`'s choice, the same for every kernel of the call.
    damping: the updates tried on the sequences Newton has not converged on before they fall
    back (one of `_defaults.DAMPINGS`, see `_Newton.solve`).

    Returns (states: k tensors (B, T, D), outputs: o tensors (B, T, D), stats).
    """
    B, T, D = xs[0].shape
    dtype = xs[0].dtype
    p, M = _split_params(ps)
    dense = bool(M)
    method = _defaults.resolve_method(method, "cpu", dense=dense)
    iterations = _defaults.default_iterations(dtype) if iterations is None else iterations
    tol = _defaults.default_tol(dtype) if tol is None else tol
    chunk = _defaults.CPU_TIME_CHUNK if chunk is None else chunk
    states = [xs[0].new_empty(B, T, D) for _ in h0s]
    outputs = [xs[0].new_empty(B, T, D) for _ in range(module.N_OUTPUTS)]
    stats = ForwardStats(method)
    if B * D == 0 or T == 0:
        return states, outputs, stats
    # asking numba for its threads starts its threading layer, as the first kernel would
    ch = _defaults.cpu_channel_block(B, D, numba.get_num_threads())
    h0, x = [_flat(h) for h in h0s], [_flat(x) for x in xs]
    args = (*h0, *x, *p, *M)
    s, y = [_out(t) for t in states], [_out(t) for t in outputs]
    # the sequential kernel's mask: per (sequence, channel block) of a per-channel module, per
    # sequence of a dense one (its channels are coupled)
    nd = 1 if dense else -(-D // ch)
    mask = np.ones(B * nd, np.uint8)
    if method == "newton":
        run = _Newton(module, h0, x, (*p, *M), s, (B, T, D), tol, chunk, ch, dense)
        # damped updates only follow plain ones: iterations=0 asks for no Newton update.
        # A diverging iterate holds inf/NaN: it is flagged unconverged and recomputed, so
        # numpy's warnings about it (damped steps, residual ratios) would only be noise.
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            bad = run.solve(iterations, _defaults.DAMPED_STEPS if iterations else 0,
                            damping)  # (B, D)
        if dense:
            bad = np.repeat(bad.any(axis=1, keepdims=True), D, axis=1)
        if module.OUTPUTS_KERNEL:
            module.forward_outputs(*args, *s, *y, B, T, D, ch, chunk)
        if module.OUTPUTS_KERNEL or not module.N_OUTPUTS:
            blocks = np.zeros((B, nd * (D if dense else ch)), bool)
            blocks[:, :D] = bad
            mask[:] = blocks.reshape(B, nd, -1).any(axis=2).reshape(-1)
        # else every sequence reruns: the outputs come from the sequential kernel
        fallback = int(bad[:, 0].sum()) if dense else int(bad.sum())
        # a dense sequence converged when its last channel did
        iters = run.iters.max(axis=1) if dense else run.iters
        hist = iters[~bad[:, 0]] if dense else iters[~bad]
        stats = ForwardStats(method, run.done, fallback, run.residual, chunk,
                             histogram=tuple(np.bincount(hist, minlength=1).tolist()))
    if mask.any():
        module.forward_sequential(*args, *s, *y, mask, B, T, D, ch)
    return states, outputs, stats


class _Newton:
    """Newton's iterations on the states `s` (written in place). Only the sequences b with a
    channel that has not converged are linearised and updated: the driver gathers them into
    a compact batch when the set shrinks (the kernels take whole batches)."""

    def __init__(self, module: ModuleType, h0: list[np.ndarray], x: list[np.ndarray],
                 rest: tuple[np.ndarray, ...], s: list[np.ndarray],
                 shape: tuple[int, int, int], tol: float, chunk: int, ch: int,
                 dense: bool) -> None:
        B, T, D = shape
        self.module, self.shape, self.tol, self.chunk, self.ch = module, shape, tol, chunk, ch
        self.dense = dense  # channels coupled: damped updates move whole sequences
        self.rest = rest
        self.h0 = [a.reshape(B, D) for a in h0]
        self.x = [a.reshape(B, T * D) for a in x]
        self.s = [a.reshape(B, T * D) for a in s]  # views of the result tensors
        self.active = np.arange(B)
        # per channel: the update at which it first converged (-1: not yet)
        self.iters = np.full((B, D), -1, np.int64)
        self.done = 0
        self.residual = 0.0
        self._sub = None  # (h0, x, s) of the active sequences when they are a strict subset

    def _arrays(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        if self._sub is None:
            return self.h0, self.x, self.s
        return self._sub

    def _linearise(self) -> np.ndarray:
        """Linearise at the current iterate; return the relative residual per (active b, d)
        (the largest over the states; NaN counts as infinite)."""
        m, (_, T, D) = self.module, self.shape
        nb, k = len(self.active), len(self.s)
        h0, x, s = self._arrays()
        nt = -(-T // self.chunk)
        self.fv = [np.empty(nb * T * D, m.F) for _ in range(k)]
        self.jac = [np.empty(nb * T * D, m.F) for _ in range(m.N_JAC)]
        self.sa = [np.empty(nb * nt * D, m.F) for _ in range(m.N_JAC)]
        self.sb = [np.empty(nb * nt * D, m.F) for _ in range(k)]
        resid = np.empty(k * nb * nt * D, m.F)
        scale = np.empty_like(resid)
        m.newton_linearise(*[a.reshape(-1) for a in (*h0, *x)], *self.rest,
                           *[a.reshape(-1) for a in s], *self.fv, *self.jac, *self.sa,
                           *self.sb, resid, scale, nb, T, D, self.ch, self.chunk)
        rel = _relative(resid.reshape(k, nb, nt, D), scale.reshape(k, nb, nt, D))
        return np.nan_to_num(rel, nan=np.inf)

    def _step(self) -> None:
        """The full Newton update of the active sequences."""
        m, (_, T, D) = self.module, self.shape
        nb, nt = len(self.active), -(-T // self.chunk)
        carry = [np.empty(nb * nt * D, m.F) for _ in range(len(self.s))]
        m.newton_carry(*self.sa, *self.sb, *carry, nb, nt, D, self.ch)
        m.newton_fixup(*self.fv, *self.jac, *carry, *[a.reshape(-1) for a in self._arrays()[2]],
                       nb, T, D, self.ch, self.chunk)

    def _keep(self, keep: np.ndarray) -> None:
        """Drop the active sequences where `keep` is False (their states are final)."""
        if keep.all():
            return
        self._flush()
        nb = len(self.active)
        self.active = self.active[keep]
        a = self.active
        self._sub = ([h[a] for h in self.h0], [v[a] for v in self.x], [v[a] for v in self.s])
        # the linearisation of the current iterate, restricted to the kept sequences
        for arrays in (self.fv, self.jac, self.sa, self.sb):
            arrays[:] = [v.reshape(nb, -1)[keep].reshape(-1) for v in arrays]

    def _flush(self) -> None:
        if self._sub is not None:
            for full, part in zip(self.s, self._sub[2], strict=True):
                full[self.active] = part

    def _record(self, rel: np.ndarray) -> np.ndarray:
        """Note the residual `rel` of the current iterate (the stats' residual) and the
        channels that converged now; return the unconverged ones (active b, D)."""
        self.residual = float(rel.max())
        ok = rel <= self.tol
        it = self.iters[self.active]
        it[ok & (it < 0)] = self.done
        self.iters[self.active] = it
        return ~ok

    def solve(self, iterations: int, damped: int, damping: str = "lm") -> np.ndarray:
        """Up to `iterations` plain Newton updates, then (`damping` "lm") up to `damped`
        linearisations of Levenberg–Marquardt updates for the channels still unconverged;
        returns the unconverged (b, d) as a (B, D) bool array."""
        B, _, D = self.shape
        self.module.newton_guess(*[a.reshape(-1) for a in (*self.h0, *self.x)], *self.rest,
                                 *[a.reshape(-1) for a in self.s], B, self.shape[1], D,
                                 self.ch, self.chunk)
        rel = self._linearise()
        bad = self._record(rel)
        while bad.any() and self.done < iterations:
            self._keep(bad.any(axis=1))
            self._step()
            self.done += 1
            rel = self._linearise()
            bad = self._record(rel)
        if damping == "lm":
            bad = self._levenberg_marquardt(rel, bad, damped)
        self._flush()
        out = np.zeros((B, D), bool)
        out[self.active] = bad
        return out

    def _levenberg_marquardt(self, rel: np.ndarray, bad: np.ndarray, budget: int,
                             ) -> np.ndarray:
        """Levenberg–Marquardt updates (`_damping.lm_step`) of the unconverged channels (of a
        per-channel cell; of whole sequences of a dense one, whose channels are coupled),
        linearised at the current iterate with residuals `rel` and unconverged set `bad`
        (active b, D), for up to `budget` linearisations. Per (b, d) (per b when dense) a step
        is accepted when the relative residual decreases, and λ shrinks; otherwise it is
        undone (states and linearisation) and λ grows. Returns the unconverged set."""
        m, (_, T, D) = self.module, self.shape
        entries = np.array(m.META["jac_entries"], np.int64).reshape(-1, 2)
        lam = np.full((len(self.active), D), _defaults.LM_LAMBDA_INIT)
        used = 0
        while bad.any() and used < budget:
            keep = bad.any(axis=1)
            self._keep(keep)
            rel, bad, lam = rel[keep], bad[keep], lam[keep]
            nb = len(self.active)
            # a dense cell's channels move (and are accepted) together
            move = np.repeat(bad.any(axis=1, keepdims=True), D, axis=1) if self.dense else bad
            s = self._arrays()[2]
            old = [a.copy() for a in (*s, *self.fv, *self.jac)]
            r = np.stack([a.reshape(-1) - f for a, f in zip(s, self.fv, strict=True)])
            delta = np.empty_like(r)
            _damping.lm_step(np.stack(self.jac), entries, r, lam.reshape(-1),
                             move.reshape(-1), delta, T, D)
            for a, dl in zip(s, delta, strict=True):
                a += dl.reshape(nb, T * D)
            new = self._linearise()
            used += 1
            self.done += 1
            if self.dense:
                better = np.repeat((new.max(axis=1) < rel.max(axis=1))[:, None], D, axis=1)
            else:
                better = new < rel
            reject = move & ~better
            for a, o in zip((*s, *self.fv, *self.jac), old, strict=True):
                a3, o3 = a.reshape(nb, T, D), o.reshape(nb, T, D)
                a3[...] = np.where(reject[:, None, :], o3, a3)
            rel = np.where(reject, rel, new)
            lam = np.where(reject, lam * _defaults.LM_LAMBDA_UP,
                           np.where(move, lam / _defaults.LM_LAMBDA_DOWN, lam))
            bad = self._record(rel)
        return bad


def _relative(resid: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per (sequence, channel): max over states of max_t |h_t - f(h_{t-1})| / max_t |h_t|,
    from the per-(state, sequence, time chunk, channel) maxima the kernels stored. The scale
    is clamped to [tiny / eps, max]: an all-zero channel converges, an overflowed one never
    does; NaN stays NaN."""
    finfo = np.finfo(resid.dtype)
    floor = resid.dtype.type(finfo.tiny / finfo.eps)
    return (resid.max(axis=2) / np.clip(scale.max(axis=2), floor, finfo.max)).max(axis=0)


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
    ch = _defaults.cpu_channel_block(B, D, numba.get_num_threads())
    module.backward_adjoint(*g_states, *g_outputs, *[_flat(h) for h in h0s],
                            *[_flat(x) for x in xs], *p, *M, *[_flat(s) for s in states],
                            *[_out(g) for g in g_h0s], *[_out(g) for g in g_xs], *g_p, *g_M,
                            B, T, D, ch)
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

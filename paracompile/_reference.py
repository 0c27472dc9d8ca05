"""Pure-torch reference backend: the oracle every compiled kernel is checked against.

Everything here is built from the cell's *forward step* and torch autograd / ``torch.func``
only; nothing uses the compiler's symbolic derivatives, so it is an independent check of them.

A *step* is a callable

    step(states, inputs, params) -> (new_states, outputs)

on tuples of tensors: ``states`` k × (N, D), ``inputs`` m × (N, D) (one time step),
``params`` q × ((D,) vector | () scalar | (D, D) matrix; a matrix ``M`` acts as ``v @ M.T``),
``new_states`` k × (N, D), ``outputs`` o × (N, D) (o may be 0). The batch size N is arbitrary:
the functions below call the step with N = B (sequential) or N = B·T (all time steps at once).

Shapes used throughout: B batch, T time, D channels, k states.

* :func:`sequential` — the plain loop ``h_t = f(h_{t-1}, x_t)``, differentiable by autograd.
* :func:`newton` — the ParaRNN parallel-in-time method (Newton iterations whose linear steps
  are solved by a log-step parallel prefix reduction over time), with a residual check that
  keeps iterating (or falls back to the loop) until the answer equals the sequential one,
  and an exact backward (the adjoint recurrence, solved by the same reduction reversed).
* :func:`adjoint` — that backward as a plain function, with the signature of the ops'
  ``backward`` (for checking compiled backward kernels directly).
* helpers: :func:`zeros_h0`, :func:`scale_floor`, :func:`residual`,
  :func:`jacobians`, :func:`affine_scan`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._defaults import (
    DAMPINGS,
    LM_LAMBDA_DOWN,
    LM_LAMBDA_INIT,
    LM_LAMBDA_UP,
    default_iterations,
    default_tol,
)

__all__ = [
    "Step",
    "NewtonInfo",
    "sequential",
    "newton",
    "adjoint",
    "zeros_h0",
    "scale_floor",
    "residual",
    "jacobians",
    "affine_scan",
    "lm_solve",
]

Tensors = tuple[Tensor, ...]
Step = Callable[[Tensors, Tensors, Tensors], tuple[Sequence[Tensor], Sequence[Tensor]]]



# --------------------------------------------------------------------------------------------
# helpers


def zeros_h0(num_states: int, like: Tensor) -> Tensors:
    """Zero initial states: ``num_states`` tensors of shape (B, D), with the dtype and device
    of ``like``, which is an input (B, T, D) or a state (B, D)."""
    if like.dim() not in (2, 3):
        raise ValueError(f"like: expected a tensor of shape (B, T, D) or (B, D), "
                         f"got {tuple(like.shape)}")
    B, D = like.shape[0], like.shape[-1]
    return tuple(like.new_zeros(B, D) for _ in range(num_states))


def _check(h0: Sequence[Tensor], inputs: Sequence[Tensor],
           params: Sequence[Tensor]) -> tuple[Tensors, Tensors, Tensors, int, int, int]:
    """Validate argument shapes; return them as tuples with (B, T, D)."""
    for name, seq in (("h0", h0), ("inputs", inputs), ("params", params)):
        if not isinstance(seq, (tuple, list)):
            raise TypeError(f"{name}: expected a tuple of tensors, got {type(seq).__name__}")
        for i, v in enumerate(seq):
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(v).__name__}")
    if not h0:
        raise ValueError("h0: expected at least one state tensor of shape (B, D)")
    if not inputs:
        raise ValueError("inputs: expected at least one input tensor of shape (B, T, D)")
    if inputs[0].dim() != 3:
        raise ValueError(f"inputs[0]: expected shape (B, T, D), got {tuple(inputs[0].shape)}")
    B, T, D = inputs[0].shape
    for i, x in enumerate(inputs):
        if x.dim() != 3 or tuple(x.shape) != (B, T, D):
            raise ValueError(f"inputs[{i}]: expected shape (B, T, D) = {(B, T, D)}, "
                             f"got {tuple(x.shape)}")
    for i, h in enumerate(h0):
        if tuple(h.shape) != (B, D):
            raise ValueError(f"h0[{i}]: expected shape (B, D) = {(B, D)}, got {tuple(h.shape)}")
    for i, p in enumerate(params):
        if tuple(p.shape) not in ((D,), (), (D, D)):
            raise ValueError(f"params[{i}]: expected shape (D,), () or (D, D) with D = {D}, "
                             f"got {tuple(p.shape)}")
    return tuple(h0), tuple(inputs), tuple(params), B, T, D


def _check_states(states: Sequence[Tensor], k: int, B: int, T: int, D: int) -> Tensors:
    """Validate a trajectory: k tensors of shape (B, T, D)."""
    states = tuple(states)
    if len(states) != k:
        raise ValueError(f"states: expected {k} tensors (one per state), got {len(states)}")
    for i, s in enumerate(states):
        if not isinstance(s, Tensor) or tuple(s.shape) != (B, T, D):
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"states[{i}]: expected shape (B, T, D) = {(B, T, D)}, got {got}")
    return states


def _call(step: Step, states: Tensors, inputs: Tensors, params: Tensors) -> tuple[Tensors, Tensors]:
    """Call the step and check what it returns."""
    out = step(states, inputs, params)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("step must return (new_states, outputs), two tuples of tensors")
    ns, ys = tuple(out[0]), tuple(out[1])
    if len(ns) != len(states):
        raise ValueError(f"step returned {len(ns)} new states for {len(states)} states")
    shape = states[0].shape
    for i, v in enumerate(ns + ys):
        if not isinstance(v, Tensor) or v.shape != shape:
            what = f"new state {i}" if i < len(ns) else f"output {i - len(ns)}"
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"step: {what} has shape {got}, expected {tuple(shape)}")
    return ns, ys


def _flat(xs: Sequence[Tensor]) -> Tensors:
    """(B, T, D) × n -> (B·T, D) × n."""
    return tuple(x.reshape(-1, x.shape[-1]) for x in xs)


def _unflat(xs: Sequence[Tensor], B: int, T: int) -> Tensors:
    """(B·T, D) × n -> (B, T, D) × n."""
    return tuple(x.reshape(B, T, x.shape[-1]) for x in xs)


def _previous(h0: Tensors, H: Tensors) -> Tensors:
    """The states each step starts from: (h0, h_0, ..., h_{T-2}), each (B, T, D)."""
    return tuple(torch.cat([a.unsqueeze(1), h[:, :-1]], dim=1) for a, h in zip(h0, H, strict=True))


def _to_vec(xs: Sequence[Tensor], dense: bool) -> Tensor:
    """k × (..., D) -> (..., D, k) (block layout) or (..., k·D) (dense layout, state-major)."""
    return torch.cat(list(xs), dim=-1) if dense else torch.stack(list(xs), dim=-1)


def _from_vec(v: Tensor, k: int, dense: bool) -> Tensors:
    """Inverse of `_to_vec`."""
    return tuple(v.chunk(k, dim=-1)) if dense else tuple(v.unbind(dim=-1))


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale max_t |h_t| of the convergence test, ``tiny / eps`` (float32:
    1e-31, float64: 1e-292): residuals below ``tol`` times it count as converged, so a channel
    that stays at zero (or subnormal) converges."""
    info = torch.finfo(dtype)
    return info.tiny / info.eps


def _seq_rel(H: Sequence[Tensor], F: Sequence[Tensor]) -> Tensor:
    """Per sequence b, the largest normwise relative residual of any state and channel:
    max_{i,d} max_t |h_t - f_t| / max_t |h_t| (scale clamped to [`scale_floor`, finfo.max],
    so an overflowed state never counts as converged). (B,); NaN where a residual is NaN."""
    return _channel_rel(H, F).amax(dim=1)


def _channel_rel(H: Sequence[Tensor], F: Sequence[Tensor]) -> Tensor:
    """`_seq_rel` per (sequence, channel): the largest over states, (B, D); NaN stays NaN."""
    h = torch.stack(tuple(H))  # (k, B, T, D)
    r = (h - torch.stack(tuple(F))).abs().amax(dim=2)  # (k, B, D); amax keeps NaN
    info = torch.finfo(h.dtype)
    scale = h.abs().amax(dim=2).nan_to_num(nan=info.max).clamp(scale_floor(h.dtype), info.max)
    return (r / scale).amax(dim=0)


def _max_rel(H: Sequence[Tensor], F: Sequence[Tensor]) -> float:
    """The largest `_seq_rel` (0 when there is no sequence); NaN if any is NaN."""
    ratio = _seq_rel(H, F)
    return float(ratio.max()) if ratio.numel() else 0.0


# --------------------------------------------------------------------------------------------
# the linear solve: a log-step (Hillis–Steele) prefix reduction of affine maps


def affine_scan(A: Tensor, b: Tensor, *, reverse: bool = False) -> Tensor:
    """Solve the linear recurrence ``x_t = A_t x_{t-1} + b_t`` with ``x_{-1} = 0`` (or, with
    ``reverse=True``, ``x_t = A_t x_{t+1} + b_t`` with ``x_T = 0``) by a Hillis–Steele
    inclusive scan over time of the affine maps (A_t, b_t), composed associatively:
    ``(A2, b2) ∘ (A1, b1) = (A2 A1, A2 b1 + b2)``. ⌈log2 T⌉ levels of batched matmuls; no
    Python loop over T.

    A: (B, T, *batch, n, n); b: (B, T, *batch, n) — ``*batch`` is (D,) for block-diagonal
    Jacobians (n = k) and () for dense ones (n = k·D). Returns x, shaped like b.
    """
    if reverse:
        return affine_scan(A.flip(1), b.flip(1)).flip(1)
    T = b.shape[1]
    off = 1
    while off < T:
        # element t (>= off) becomes  map[t] ∘ map[t - off]  (each a composition of a block)
        A_cur, A_prev = A[:, off:], A[:, :-off]
        b_new = (A_cur @ b[:, :-off].unsqueeze(-1)).squeeze(-1) + b[:, off:]
        b = torch.cat([b[:, :off], b_new], dim=1)
        if 2 * off < T:  # the composed A is needed only by a further level
            A = torch.cat([A[:, :off], A_cur @ A_prev], dim=1)
        off *= 2
    return b


def lm_solve(J: Tensor, r: Tensor, lam: Tensor) -> Tensor:
    """The Levenberg–Marquardt step: with (L δ)_t = δ_t - J_t δ_{t-1} (δ_{-1} = 0), the
    minimiser of ||L δ + r||² + λ ||δ||², i.e. the solution of the block tridiagonal SPD
    system (LᵀL + λI) δ = -Lᵀ r, by block Gaussian elimination forward in time and back
    substitution (a loop over T of batched n×n solves; ``torch.linalg.solve``).

    J: (B, T, *batch, n, n); r: (B, T, *batch, n); lam: (B, *batch). Returns δ, shaped like r.
    """
    T, n = r.shape[1], r.shape[-1]
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    diag = (1 + lam)[..., None, None] * eye  # (1 + λ) I
    gains: list[Tensor] = []  # C_t = S_t^{-1} (-J_{t+1}ᵀ)
    ys: list[Tensor] = []  # y_t = S_t^{-1} (g_t + J_t y_{t-1})
    for t in range(T):
        S, g = diag, -r[:, t]
        if t + 1 < T:
            Jn = J[:, t + 1]
            S = S + Jn.mT @ Jn
            g = g + (Jn.mT @ r[:, t + 1].unsqueeze(-1)).squeeze(-1)
        if t > 0:  # S_t = D_t - (-J_t) C_{t-1}
            S = S + J[:, t] @ gains[-1]
            g = g + (J[:, t] @ ys[-1].unsqueeze(-1)).squeeze(-1)
        rhs = g.unsqueeze(-1) if t + 1 == T else torch.cat([-Jn.mT, g.unsqueeze(-1)], dim=-1)
        X = torch.linalg.solve(S, rhs)
        ys.append(X[..., -1])
        gains.append(X[..., :-1])
    delta = [ys[-1]]
    for t in range(T - 2, -1, -1):
        delta.append(ys[t] - (gains[t] @ delta[-1].unsqueeze(-1)).squeeze(-1))
    return torch.stack(delta[::-1], dim=1)


# --------------------------------------------------------------------------------------------
# Jacobians by forward-mode AD


@functools.cache
def _quiet_forward_ad_setup() -> None:
    """torch's first forward-mode AD call imports ``torch._decomp.decompositions_for_jvp``,
    which uses ``torch.jit.script`` and so raises a DeprecationWarning in recent torch (an
    error under ``filterwarnings = error``). Import it once here with that warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with contextlib.suppress(Exception):  # a private module: may change between versions
            import torch._decomp.decompositions_for_jvp  # noqa: F401


def _jvp(f: Callable[..., Tensors], primals: Tensors, tangents: Tensors) -> Tensors:
    """The tangent part of ``torch.func.jvp(f, primals, tangents)``."""
    _quiet_forward_ad_setup()
    return tuple(torch.func.jvp(f, primals, tangents)[1])


def _jac_flat(step: Step, prev: Tensors, xs: Tensors, params: Tensors, dense: bool) -> Tensor:
    """∂f/∂s at N points (prev k × (N, D), xs m × (N, D)).

    dense=False: (N, D, k, k), entry [n, d, i, j] = ∂ns_i[d]/∂s_j[d], from k JVPs with the
    tangent ones on state j (all channels) and zeros elsewhere — exact only when the step does
    not mix channels (then Σ_d' ∂ns_i[d]/∂s_j[d'] = ∂ns_i[d]/∂s_j[d]).
    dense=True: (N, k·D, k·D), row/column index ``state * D + channel``, from k·D JVPs.
    """
    k, D = len(prev), prev[0].shape[-1]

    def f(*s: Tensor) -> Tensors:
        return _call(step, s, xs, params)[0]

    cols = []
    if dense:
        for j in range(k):
            for d in range(D):
                tangent = tuple(torch.zeros_like(s) for s in prev)
                tangent[j][:, d] = 1
                cols.append(torch.cat(_jvp(f, prev, tangent), dim=-1))  # (N, kD)
    else:
        for j in range(k):
            tangent = tuple(torch.ones_like(s) if i == j else torch.zeros_like(s)
                            for i, s in enumerate(prev))
            cols.append(torch.stack(_jvp(f, prev, tangent), dim=-1))  # (N, D, k)
    return torch.stack(cols, dim=-1)


def jacobians(step: Step, h0: Sequence[Tensor], inputs: Sequence[Tensor],
              params: Sequence[Tensor], states: Sequence[Tensor], *, dense: bool) -> Tensor:
    """J_t = ∂f/∂h (h_{t-1}, x_t) for t = 0..T-1 along the trajectory ``states`` (k × (B, T, D),
    with h_{-1} = h0). Returns (B, T, D, k, k) (block layout, [b, t, d, i, j] =
    ∂h'_i[d]/∂h_j[d]) or, with ``dense=True``, (B, T, k·D, k·D) (index ``state * D + channel``).
    """
    h0, inputs, params, B, T, D = _check(h0, inputs, params)
    prev = _flat(_previous(h0, _check_states(states, len(h0), B, T, D)))
    J = _jac_flat(step, prev, _flat(inputs), params, dense)
    return J.reshape(B, T, *J.shape[1:])


def residual(step: Step, h0: Sequence[Tensor], inputs: Sequence[Tensor],
             params: Sequence[Tensor], states: Sequence[Tensor]) -> float:
    """Normwise relative residual of a trajectory, the quantity Newton's convergence test
    bounds by ``tol``: the largest over sequences b, states i and channels d of

        max_t |h_t - f(h_{t-1}, x_t)| / max(max_t |h_t|, scale_floor)

    (NaN if any value is NaN; 0 for an empty batch). ``states``: k × (B, T, D)."""
    h0, inputs, params, B, T, D = _check(h0, inputs, params)
    states = _check_states(states, len(h0), B, T, D)
    if T == 0:
        return 0.0
    with torch.no_grad():
        F, _ = _call(step, _flat(_previous(h0, states)), _flat(inputs), params)
        return _max_rel(states, _unflat(F, B, T))


# --------------------------------------------------------------------------------------------
# sequential


def sequential(step: Step, h0: Sequence[Tensor], inputs: Sequence[Tensor],
               params: Sequence[Tensor]) -> tuple[Tensors, Tensors]:
    """The exact recurrence ``h_t = f(h_{t-1}, x_t)``, t = 0..T-1, ``h_{-1} = h0``, as a
    plain Python loop over time (differentiable by autograd w.r.t. everything).

    h0: k × (B, D); inputs: m × (B, T, D); params: (D,) / () / (D, D) each.
    Returns (states, outputs): k × (B, T, D) (the state after each step) and o × (B, T, D).
    """
    h0, inputs, params, B, T, D = _check(h0, inputs, params)
    if T == 0:  # call once only to learn the number of outputs
        ns, ys = _call(step, h0, tuple(x.new_zeros(B, D) for x in inputs), params)
        return (tuple(h.new_zeros(B, 0, D) for h in ns), tuple(y.new_zeros(B, 0, D) for y in ys))
    s = h0
    hist_s: list[Tensors] = []
    hist_y: list[Tensors] = []
    for t in range(T):
        s, y = _call(step, s, tuple(x[:, t] for x in inputs), params)
        hist_s.append(s)
        hist_y.append(y)
    states = tuple(torch.stack(seq, dim=1) for seq in zip(*hist_s, strict=True))
    outputs = tuple(torch.stack(seq, dim=1) for seq in zip(*hist_y, strict=True))
    return states, outputs


# --------------------------------------------------------------------------------------------
# Newton


@dataclass
class NewtonInfo:
    """What :func:`newton` did.

    iterations: Newton iterations performed (it stops early once the residual is within
    ``tol``; more than ``requested`` when the residual check asked for extra ones).
    converged: the final residual is within ``tol`` (always true after a fallback).
    fell_back: Newton did not converge within ``max_iterations`` for some sequences, and
    their answer was recomputed by the sequential loop; ``fallback_sequences`` counts them
    (batch entries). Damped (Levenberg–Marquardt) updates (see :func:`newton`) count as
    iterations.
    residuals: the normwise relative residual (see :func:`residual`) of the initial guess and
    after each iteration; ``residual`` is the last one.
    """

    requested: int
    tol: float = 0.0
    iterations: int = 0
    converged: bool = False
    fell_back: bool = False
    fallback_sequences: int = 0
    residuals: list[float] = field(default_factory=list)
    histogram: list[int] = field(default_factory=list)
    """histogram[i]: the sequences that converged after i updates (the fallback ones are not
    counted)."""

    @property
    def residual(self) -> float:
        return self.residuals[-1] if self.residuals else math.nan

    @property
    def extra_iterations(self) -> int:
        """Iterations beyond the requested number."""
        return max(0, self.iterations - self.requested)

    @property
    def needed_extra(self) -> bool:
        """True when ``requested`` iterations were not enough (extra ones, or the fallback)."""
        return self.extra_iterations > 0 or self.fell_back


def _newton_solve(step: Step, h0: Tensors, inputs: Tensors, params: Tensors, dense: bool,
                  iterations: int, tol: float, max_iterations: int, damped: int,
                  damping: str, info: NewtonInfo) -> tuple[Tensors, Tensors]:
    """The Newton forward (no autograd): returns (states, outputs), fills ``info``."""
    B, T, D = inputs[0].shape
    k = len(h0)
    xs = _flat(inputs)

    def evaluate(prev: Tensors) -> tuple[Tensors, Tensors]:
        ns, ys = _call(step, _flat(prev), xs, params)
        return _unflat(ns, B, T), _unflat(ys, B, T)

    # initial guess f(0, x_t) — and the exact f(h0, x_0) at t = 0
    zero_prev = tuple(torch.cat([a.unsqueeze(1), a.new_zeros(B, T - 1, D)], dim=1) for a in h0)
    H, _ = evaluate(zero_prev)
    prev = _previous(h0, H)
    F, Y = evaluate(prev)
    ratio = _seq_rel(H, F)
    info.residuals.append(_max_rel(H, F))
    first = torch.full((B,), -1, dtype=torch.int64)  # the update at which b converged

    def record(n: int) -> Tensor:  # the unconverged sequences, (B,) bool
        ok = (ratio <= tol).cpu()  # NaN never passes `<=`
        first[ok & (first < 0)] = n
        return ~ok

    def linearised() -> tuple[Tensor, Tensor]:
        """(J_t, r_t = h_t - f(h_{t-1})) at the current iterate, as `affine_scan` and
        `lm_solve` take them."""
        J = _jac_flat(step, _flat(prev), xs, params, dense)
        r = _to_vec([h - f for h, f in zip(H, F, strict=True)], dense)
        return J.reshape(B, T, *J.shape[1:]), r

    def newton_step() -> Tensors:
        J, r = linearised()
        return _from_vec(affine_scan(J, -r), k, dense)  # δ_t = J_t δ_{t-1} - r_t, δ_{-1} = 0

    def moved(base: Tensors, delta: Tensors, mask: Tensor) -> Tensors:
        # only the sequences in `mask` (the unconverged ones) move
        a = mask.to(base[0].device, base[0].dtype).view(B, 1, 1)
        return tuple(h + a * d for h, d in zip(base, delta, strict=True))

    n = 0
    bad = record(0)
    while bool(bad.any()) and n < max_iterations:
        H = moved(H, newton_step(), bad)
        n += 1
        prev = _previous(h0, H)
        F, Y = evaluate(prev)
        ratio = _seq_rel(H, F)
        info.residuals.append(_max_rel(H, F))
        bad = record(n)
    used = 0
    if damping == "lm" and damped:
        # λ per (sequence, channel) of a per-channel cell, per sequence of a dense one
        rel = (ratio if dense else _channel_rel(H, F)).nan_to_num(nan=math.inf)
        lam = torch.full(rel.shape, LM_LAMBDA_INIT, dtype=H[0].dtype, device=H[0].device)

        def where(mask: Tensor, a: Tensors, b: Tensors) -> Tensors:  # mask (B,) or (B, D)
            m = mask.view(B, 1, 1) if dense else mask.view(B, 1, D)
            return tuple(torch.where(m, x, y) for x, y in zip(a, b, strict=True))

        while bool(bad.any()) and used < damped:
            move = ~(rel <= tol)  # the unconverged channels (sequences when dense)
            delta = _from_vec(lm_solve(*linearised(), lam), k, dense)
            trial = where(move, tuple(h + d for h, d in zip(H, delta, strict=True)), H)
            F_new, Y_new = evaluate(_previous(h0, trial))
            new = _seq_rel(trial, F_new) if dense else _channel_rel(trial, F_new)
            new = new.nan_to_num(nan=math.inf)
            used += 1
            n += 1
            accept = move & (new < rel)  # else the step is undone and λ grows
            H, F, Y = where(accept, trial, H), where(accept, F_new, F), where(accept, Y_new, Y)
            rel = torch.where(accept, new, rel)
            lam = torch.where(accept, lam / LM_LAMBDA_DOWN,
                              torch.where(move, lam * LM_LAMBDA_UP, lam))
            prev = _previous(h0, H)
            ratio = _seq_rel(H, F)
            info.residuals.append(_max_rel(H, F))
            bad = record(n)
    info.iterations = n
    info.histogram = torch.bincount(first[first >= 0], minlength=1).tolist()
    bad = bad.nonzero().flatten().to(H[0].device)
    if bad.numel():  # never silently differ from the sequential answer
        Hs, Ys = sequential(step, tuple(h[bad] for h in h0), tuple(x[bad] for x in inputs),
                            params)
        H = tuple(h.index_copy(0, bad, hs) for h, hs in zip(H, Hs, strict=True))
        Y = tuple(y.index_copy(0, bad, ys) for y, ys in zip(Y, Ys, strict=True))
        info.fell_back = True
        info.fallback_sequences = int(bad.numel())
        info.residuals.append(residual(step, h0, inputs, params, H))
    info.converged = True
    return H, Y


class _NewtonFunction(torch.autograd.Function):
    """Forward: the Newton solve. Backward: :func:`adjoint` at the solved states.

    ``tensors`` = h0 (k) + inputs (m) + params (q), flattened so that autograd sees each one.
    """

    @staticmethod
    def forward(ctx, step, k, m, dense, iterations, tol, max_iterations, damped, damping,
                info, *tensors):
        h0, inputs, params = tensors[:k], tensors[k:k + m], tensors[k + m:]
        H, Y = _newton_solve(step, h0, inputs, params, dense, iterations, tol,
                             max_iterations, damped, damping, info)
        ctx.step, ctx.k, ctx.m, ctx.dense = step, k, m, dense
        H = tuple(h.clone() for h in H)  # fresh tensors: never views of inputs or of each other
        Y = tuple(y.clone() for y in Y)
        ctx.save_for_backward(*tensors, *H)
        return (*H, *Y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        k, m = ctx.k, ctx.m
        saved = ctx.saved_tensors
        n = len(saved) - k
        h0, inputs, params, H = saved[:k], saved[k:k + m], saved[k + m:n], saved[n:]
        g_h0, g_x, g_p = adjoint(ctx.step, h0, inputs, params, H, grads[:k], grads[k:],
                                 dense=ctx.dense)
        g = (*g_h0, *g_x, *g_p)
        needs = ctx.needs_input_grad[10:]
        g = tuple(gi if need else None for gi, need in zip(g, needs, strict=True))
        return (None,) * 10 + g


def newton(step: Step, h0: Sequence[Tensor], inputs: Sequence[Tensor],
           params: Sequence[Tensor], *, dense: bool, iterations: int | None = None,
           tol: float | None = None,
           max_iterations: int | None = None,
           damped: int = 0, damping: str = "lm") -> tuple[Tensors, Tensors, NewtonInfo]:
    """The ParaRNN parallel-in-time solve of the recurrence of :func:`sequential`.

    Unknowns H = (h_0..h_{T-1}); residual r_t = h_t - f(h_{t-1}, x_t). Initial guess
    f(0, x_t) (f(h0, x_0) at t = 0). Each iteration computes J_t = ∂f/∂h at the current
    iterate (forward-mode JVPs) and solves δ_t - J_t δ_{t-1} = -r_t by :func:`affine_scan`.

    dense=False: J is taken block-diagonal over channels, k×k blocks (B, T, D, k, k), from k
    JVPs — the right choice for every cell without a matrix acting on a state. (On a cell that
    does mix channels this is a quasi-Newton iteration: still exact in the end, see below, but
    slow; and its backward would be wrong: pass the proven structure, as the runtime does.)
    dense=True: the full (B, T, k·D, k·D) Jacobian from k·D JVPs (small D only).

    The guarantee: a sequence b has converged when, for every state i and channel d,

        max_t |h_t - f(h_{t-1}, x_t)| <= tol * max(max_t |h_t|, scale_floor)

    (normwise relative per channel: a channel whose states are all tiny is held to the same
    relative accuracy as a large one; ``tol`` and ``iterations`` default to
    `_defaults.default_tol` and `_defaults.default_iterations` of the dtype).
    Newton stops as soon as every sequence has converged; it keeps iterating past
    ``iterations`` while some has not. Iteration n makes h_0..h_{n-1} exact, so T iterations
    suffice in exact arithmetic; the sequences that ``max_iterations`` (default T + 2; the
    runtime passes ``iterations``) do not bring within ``tol`` (round-off blown up by a
    chaotic cell, overflow) get up to ``damped`` damped updates (the runtime passes
    `_defaults.DAMPED_STEPS`) and the ones still unconverged are recomputed by the sequential
    loop (``info.fell_back``, ``info.fallback_sequences``).

    ``damping="lm"`` (the default; ``"none"`` skips them): the damped updates are
    Levenberg–Marquardt steps (:func:`lm_solve`) with λ per (sequence, channel) (per sequence
    when ``dense``), starting at `_defaults.LM_LAMBDA_INIT`; a step is kept when the relative
    residual of its channel (sequence) decreases, and λ shrinks by `LM_LAMBDA_DOWN`, else it
    is undone and λ grows by `LM_LAMBDA_UP`. Each trial is one linearisation, counted as an
    iteration. Independent of the CPU's numba implementation (`_damping`), which takes the
    same decisions.

    Differentiable w.r.t. h0, inputs and params with the exact gradients of the sequential
    recurrence (the backward is :func:`adjoint` at the solved states; no autograd through the
    iterations). Not twice differentiable.

    Shapes as in :func:`sequential`. Returns (states, outputs, info): k × (B, T, D),
    o × (B, T, D) and a :class:`NewtonInfo`.
    """
    h0, inputs, params, B, T, D = _check(h0, inputs, params)
    if iterations is None:
        iterations = default_iterations(inputs[0].dtype)
    if iterations < 0:
        raise ValueError(f"iterations: expected >= 0, got {iterations}")
    if damping not in DAMPINGS:
        raise ValueError(f"damping: expected one of {DAMPINGS}, got {damping!r}")
    if tol is None:
        tol = default_tol(inputs[0].dtype)
    if max_iterations is None:
        max_iterations = T + 2
    max_iterations = max(max_iterations, iterations)
    info = NewtonInfo(requested=iterations, tol=tol)
    if T == 0 or B == 0:
        states, outputs = sequential(step, h0, inputs, params)
        info.converged = True
        return states, outputs, info
    out = _NewtonFunction.apply(step, len(h0), len(inputs), dense, iterations, tol,
                                max_iterations, damped, damping, info, *h0, *inputs, *params)
    return tuple(out[:len(h0)]), tuple(out[len(h0):]), info


# --------------------------------------------------------------------------------------------
# backward: the adjoint recurrence


def adjoint(step: Step, h0: Sequence[Tensor], inputs: Sequence[Tensor],
            params: Sequence[Tensor], states: Sequence[Tensor],
            grad_states: Sequence[Tensor | None], grad_outputs: Sequence[Tensor | None], *,
            dense: bool) -> tuple[Tensors, Tensors, Tensors]:
    """The exact backward of the recurrence at the trajectory ``states`` (k × (B, T, D)).

    With g_t the cotangent of h_t (``grad_states``, k × (B, T, D); None = zeros) and gy_t that
    of output y_t = y(h_{t-1}, x_t) (``grad_outputs``, o × (B, T, D); None = zeros), the
    adjoint λ_t = dL/dh_t obeys

        λ_{T-1} = g_{T-1},   λ_t = g_t + (∂y_{t+1}/∂h_t)ᵀ gy_{t+1} + J_{t+1}ᵀ λ_{t+1},

    a linear reverse recurrence solved by :func:`affine_scan` (``reverse=True``, the same
    log-step reduction as the forward, on the transposed Jacobians). The output term is one
    ``torch.func.vjp`` of the step (cotangent (0, gy)) at all time steps at once; then one more
    vjp with cotangent (λ_t, gy_t) gives the gradients w.r.t. h_{t-1} (at t = 0: h0), x_t and
    the params (summed over B and T by the vjp itself).

    Returns (grad_h0 k × (B, D), grad_inputs m × (B, T, D), grad_params each shaped like its
    param).
    """
    h0, inputs, params, B, T, D = _check(h0, inputs, params)
    states = _check_states(states, len(h0), B, T, D)
    k = len(h0)
    with torch.no_grad():
        prev, xs = _flat(_previous(h0, states)), _flat(inputs)
        # detached primals: the vjp below must not build a graph on the caller's tensors
        prev = tuple(s.detach() for s in prev)
        xs = tuple(x.detach() for x in xs)
        ps = tuple(p.detach() for p in params)
    (ns, ys), vjp_fn = torch.func.vjp(lambda s, x, p: _call(step, s, x, p), prev, xs, ps)
    grad_states = tuple(grad_states) + (None,) * (k - len(tuple(grad_states)))
    grad_outputs = tuple(grad_outputs) + (None,) * (len(ys) - len(tuple(grad_outputs)))
    g = tuple(torch.zeros_like(a) if c is None else c.reshape(a.shape)
              for a, c in zip(ns, grad_states, strict=True))
    gy = tuple(torch.zeros_like(a) if c is None else c.reshape(a.shape)
               for a, c in zip(ys, grad_outputs, strict=True))
    with torch.no_grad():
        # output term: c_t = (∂y_t/∂h_{t-1})ᵀ gy_t, which belongs to λ_{t-1}
        c = _unflat(vjp_fn((tuple(torch.zeros_like(a) for a in ns), gy))[0], B, T) if gy else None
        b = []
        for i in range(k):
            gi = g[i].reshape(B, T, D)
            if c is not None:
                gi = gi + torch.cat([c[i][:, 1:], torch.zeros_like(c[i][:, :1])], dim=1)
            b.append(gi)
        J = _jac_flat(step, prev, xs, ps, dense)
        J = J.reshape(B, T, *J.shape[1:])
        # A_t = J_{t+1}ᵀ (t < T-1); A_{T-1} is never applied (λ_T = 0)
        Jt = J.transpose(-1, -2)
        A = torch.cat([Jt[:, 1:], torch.zeros_like(Jt[:, :1])], dim=1)
        lam = _from_vec(affine_scan(A, _to_vec(b, dense), reverse=True), k, dense)
        g_prev, g_x, g_p = vjp_fn((_flat(lam), gy))
        g_prev = _unflat(g_prev, B, T)
        g_h0 = tuple(a[:, 0] for a in g_prev)
        g_x = _unflat(g_x, B, T)
    return g_h0, g_x, tuple(g_p)

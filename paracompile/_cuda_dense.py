"""Launcher of the generated CUDA kernels of dense cells (``templates/cuda_dense.py.jinja``):
cells with a matrix parameter, whose ``M @ expr`` couples the channels.

The interface is `_cpu`'s and `_cuda`'s (see `_backend`); the device plumbing (array views,
the stream, the simulator) is `_cuda._Ctx`'s. One block per batch entry runs the whole
sequence, every step staged through shared memory (see docs/cuda-dense.md):

* forward: the exact sequential recurrence (there is no Newton kernel for dense cells on
  CUDA: ``method="newton"`` is a ValueError, "auto" is "sequential");
* backward: the exact adjoint through M^T at every step; the kernel stores each product's
  cotangent gu_t and operand v_t, and the gradient of a matrix is sum over (b, t) of
  gu_t v_t^T, one matmul here (deterministic: no atomics).

The matrices are passed twice, as M and as its transpose M^T (contiguous copies), so that
both products read them coalesced.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from . import _defaults
from ._backend import ForwardStats
from ._cuda import _Ctx, _torch_dtype

DEFAULT_THREADS = 256  # at most this many threads per block; each loops over its channels


def block_threads(D: int, threads: int | None, max_threads: int) -> int:
    """Threads per block: `threads`, or by default one per channel (whole warps), at most
    `DEFAULT_THREADS`; a thread handles channels c, c + threads, ... when D is larger."""
    if threads is None:
        return min(DEFAULT_THREADS, 32 * -(-D // 32))
    threads = int(threads)
    if not 1 <= threads <= max_threads:
        raise ValueError(f"threads must be in [1, {max_threads}], got {threads}")
    return threads


def _prepare(module: ModuleType, tensors: Sequence[torch.Tensor], ps: Sequence[torch.Tensor],
             D: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Check the module and the tensors' dtype and D; return (vector and scalar params,
    matrix params), each in declaration order (a param's kind is its rank: the runtime has
    checked the shapes)."""
    if not getattr(module, "CUDA_DENSE", False):
        raise ValueError("_cuda_dense runs the kernels of dense cells (cuda_dense.py.jinja); "
                         "this module is not one")
    dtype = _torch_dtype(module)
    for t in [*tensors, *ps]:
        if t.dtype != dtype:
            raise TypeError(f"CUDA module is {module.CUDA_DTYPE}, got a {t.dtype} tensor")
    if D > module.CUDA_MAX_D:
        raise ValueError(f"D = {D} channels: the CUDA kernels of this dense cell hold at most "
                         f"{module.CUDA_MAX_D} channels ({module.CUDA_DTYPE}) in shared "
                         "memory; use backend='cpu' or 'torch' for wider layers")
    vectors = [p for p in ps if p.dim() < 2]
    matrices = [p for p in ps if p.dim() == 2]
    if len(vectors) != module.CUDA_Q or len(matrices) != module.CUDA_N_MATRICES:
        raise ValueError(f"expected {module.CUDA_Q} vector/scalar params and "
                         f"{module.CUDA_N_MATRICES} matrices, got {len(vectors)} and "
                         f"{len(matrices)}")
    return vectors, matrices


def forward(module: ModuleType, h0s: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
            ps: Sequence[torch.Tensor], *, method: str = "auto", iterations: int | None = None,
            tol: float | None = None, chunk: int | None = None, threads: int | None = None,
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], ForwardStats]:
    """Run the forward recurrence (the sequential kernel).

    h0s: k tensors (B, D); xs: m tensors (B, T, D); ps: the params in declaration order
    ((D,), () or (D, D)). method: "sequential" or "auto"; "newton" is a ValueError (dense
    cells have no Newton kernel on CUDA). iterations, tol and chunk belong to Newton and are
    not used. threads: threads per block (default `block_threads`).

    Returns (states: k tensors (B, T, D), outputs: o tensors (B, T, D), stats).
    """
    method = _defaults.resolve_method(method, "cuda", dense=True)
    if method == "newton":
        raise ValueError("method='newton' is not available for dense cells on CUDA: their "
                         "kernel runs the sequence sequentially, all channels of a batch "
                         "entry in one block; use method='sequential' or 'auto' (or "
                         "backend='cpu' or 'torch' for Newton)")
    B, T, D = xs[0].shape
    vectors, matrices = _prepare(module, [*h0s, *xs], ps, D)
    ctx = _Ctx(module, xs[0])
    states = [ctx.empty(B, T, D) for _ in h0s]
    outputs = [ctx.empty(B, T, D) for _ in range(module.CUDA_O)]
    nthr = block_threads(D, threads, module.CUDA_MAX_THREADS)
    if B * D and T:
        transposed = [m.t().contiguous() for m in matrices]
        ctx.launch(module.dense_sequential_kernel, B, nthr,
                   *[ctx.view(t) for t in [*h0s, *xs, *vectors, *transposed, *states,
                                            *outputs]], B, T, D)
    return states, outputs, ForwardStats(method)


def backward(module: ModuleType, g_states: Sequence[torch.Tensor | None],
             g_outputs: Sequence[torch.Tensor | None], h0s: Sequence[torch.Tensor],
             xs: Sequence[torch.Tensor], ps: Sequence[torch.Tensor],
             states: Sequence[torch.Tensor], *, threads: int | None = None,
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of sum(g_states * states) + sum(g_outputs * outputs).

    g_states: k tensors (B, T, D) and g_outputs: o tensors (B, T, D) (None means zeros);
    states: the forward states; threads: as in `forward`.
    Returns (g_h0s: k (B, D), g_xs: m (B, T, D), g_ps shaped like ps).
    """
    B, T, D = xs[0].shape
    given = [g for g in (*g_states, *g_outputs) if g is not None]
    vectors, matrices = _prepare(module, [*h0s, *xs, *states, *given], ps, D)
    ctx = _Ctx(module, xs[0])
    g_states = [ctx.zeros(B, T, D) if g is None else g for g in g_states]
    g_outputs = [ctx.zeros(B, T, D) if g is None else g for g in g_outputs]
    # the kernel accumulates into these: the running adjoint (its last value is the gradient
    # of h0) and the per-(b, c) param partials
    g_h0s = [ctx.zeros(B, D) for _ in h0s]
    g_xs = [ctx.empty(B, T, D) for _ in xs]
    g_parts = [ctx.zeros(B, D) for _ in vectors]
    n_products = len(module.CUDA_MATVEC_MATRIX)
    g_us = [ctx.empty(B, T, D) for _ in range(n_products)]
    vs = [ctx.empty(B, T, D) for _ in range(n_products)]
    g_matrices = [torch.zeros_like(m) for m in matrices]
    if B * D and T:
        transposed = [m.t().contiguous() for m in matrices]
        ctx.launch(module.dense_backward_kernel, B, block_threads(D, threads,
                                                                  module.CUDA_MAX_THREADS),
                   *[ctx.view(t) for t in [*g_states, *g_outputs, *h0s, *xs, *vectors,
                                            *matrices, *transposed, *states, *g_h0s, *g_xs,
                                            *g_parts, *g_us, *vs]], B, T, D)
        # dM = sum over (b, t) of gu_t v_t^T, for each product of M
        for g_u, v, index in zip(g_us, vs, module.CUDA_MATVEC_MATRIX, strict=True):
            g_matrices[index] += g_u.reshape(-1, D).t() @ v.reshape(-1, D)
    g_ps, parts, mats = [], iter(g_parts), iter(g_matrices)
    for p in ps:
        if p.dim() == 2:
            g_ps.append(next(mats))
        else:
            part = next(parts)
            g_ps.append(part.sum(0) if p.dim() == 1 else part.sum())
    return g_h0s, g_xs, g_ps

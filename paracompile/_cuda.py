"""Launcher of the generated CUDA kernels (``templates/cuda.py.jinja``).

Given a loaded generated module and torch tensors, allocate the results, pick a launch
configuration, launch, rerun non-converged sequences with the sequential kernel, and return
results plus a `ForwardStats` (the interface `_cpu` has, see `_backend`).

Two modes, chosen by numba's CUDA mode at import time of ``numba.cuda``:

* real GPU: tensors must be CUDA tensors; they are passed zero-copy through
  ``numba.cuda.as_cuda_array`` on the current torch stream (``cuda.external_stream``);
* simulator (``NUMBA_ENABLE_CUDASIM=1``): tensors must be CPU tensors; numpy views are passed
  and CPU tensors are returned.  The module must have been rendered with ``simulator=True``.

fp16/bf16 are converted to float32 by the caller; every tensor given here must have the
module's dtype.  See docs/cuda.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from . import _defaults
from ._backend import ForwardStats

WARP = 32
MAX_THREADS = 1024
# newton_kernel / backward_kernel: a block is 32 channels x (threads / 32) time warps.
# They are compiled with at most 128 registers a thread (CUDA_MAX_REGISTERS), so 16 warps
# always fit the 64K register file: the default and the most an explicit `threads` may ask.
DEFAULT_THREADS = FUSED_MAX_THREADS = 512
# Steps per thread and pass: >= 8 so that the per-pass serial scan over the warps (one
# affine apply per warp) stays small next to the chunk's work; <= 32 so that a pass's span
# (512 steps at 16 warps) of inputs and states stays in L2 between its two sweeps.
MIN_CHUNK, MAX_CHUNK = 8, 32


def _cuda():
    from numba import cuda

    return cuda


def _torch_dtype(module) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[module.CUDA_DTYPE]


def launch_config(T: int, *, chunk: int | None = None, threads: int | None = None,
                  max_threads: int = DEFAULT_THREADS, limit: int = MAX_THREADS
                  ) -> tuple[int, int]:
    """(threads per block, chunk length) of the fused kernels for sequences of length T.

    A block runs 32 channels (its lanes) of one batch entry with ``threads / 32`` time warps;
    in each pass, every thread composes ``chunk`` consecutive steps of its channel, so a pass
    covers ``threads / 32 * chunk`` steps and longer sequences loop over passes.  Defaults:
    chunk = clamp(ceil(T / warps), MIN_CHUNK, MAX_CHUNK) for ``max_threads / 32`` warps, and the
    fewest warps that cover T in one pass.  ``limit`` is the module's bound (its shared arrays
    are sized for ``CUDA_MAX_WARPS``); explicit ``threads`` must be a multiple of 32 in
    [32, limit].
    """
    limit = min(int(limit), MAX_THREADS)
    max_warps = max(1, min(max_threads, limit) // WARP)
    if chunk is None:
        chunk = min(MAX_CHUNK, max(MIN_CHUNK, math.ceil(T / max_warps)))
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if threads is None:
        threads = WARP * min(max_warps, max(1, math.ceil(T / chunk)))
    threads = int(threads)
    if threads < WARP or threads % WARP or threads > limit:
        raise ValueError(f"threads must be a multiple of {WARP} in [{WARP}, {limit}], "
                         f"got {threads}")
    return threads, chunk


def _fused_limit(module) -> int:
    """The most threads a block of `module`'s fused kernels may have: its shared arrays are
    sized for CUDA_MAX_WARPS warps, its register cap for FUSED_MAX_THREADS threads."""
    return min(FUSED_MAX_THREADS, WARP * module.CUDA_MAX_WARPS)


def fused_grid(B: int, D: int) -> int:
    """Blocks of the fused kernels: one per batch entry and tile of 32 channels."""
    return B * math.ceil(D / WARP)


class _Ctx:
    """Device/host plumbing for one call: array views and the stream."""

    def __init__(self, module, ref: torch.Tensor):
        self.cuda = _cuda()
        # the mode numba.cuda was imported in (fixed then), which the module must match;
        # `_defaults.simulator_enabled` is what the user asks for, read before numba loads
        self.sim = bool(self.cuda.config.ENABLE_CUDASIM)
        if self.sim != bool(module.CUDA_SIMULATOR):
            raise RuntimeError(
                "generated CUDA module was rendered for "
                f"{'the simulator' if module.CUDA_SIMULATOR else 'a real GPU'}, but numba.cuda "
                f"is in {'simulator' if self.sim else 'GPU'} mode")
        self.dtype = _torch_dtype(module)
        self.device = ref.device
        if self.sim:
            if ref.device.type != "cpu":
                raise ValueError("the CUDA simulator takes CPU tensors")
            self.stream = 0
        else:
            if ref.device.type != "cuda":
                raise ValueError(f"the CUDA backend needs CUDA tensors, got {ref.device}")
            self.stream = self.cuda.external_stream(
                torch.cuda.current_stream(ref.device).cuda_stream)

    def view(self, t: torch.Tensor):
        # kernels take flat contiguous 1-d views (one offset computation serves all arrays)
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        t = t.reshape(-1)
        if t.device != self.device:
            raise ValueError(f"all tensors must be on {self.device}, got one on {t.device}")
        if self.sim:
            return t.numpy()
        # zero-copy; no stream sync needed: the kernels run on torch's current stream
        return self.cuda.as_cuda_array(t, sync=False)

    def param(self, t: torch.Tensor):
        # vector params (D,); scalar params () are seen by the kernels as (1,)
        return self.view(t)

    def empty(self, *shape, dtype=None):
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def zeros(self, *shape, dtype=None):
        return torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    def launch(self, kernel, grid: int, block: int, *args):
        if grid <= 0:
            return
        if self.sim:
            kernel[grid, block](*args)
            return
        from numba.cuda.core.errors import NumbaPerformanceWarning

        with warnings.catch_warnings():
            # numba warns about grids under 128 blocks; small B * D (decoding, tests) is a
            # legitimate use, so this warning is silenced deliberately (nothing else is)
            warnings.simplefilter("ignore", NumbaPerformanceWarning)
            kernel[grid, block, self.stream](*args)


def _check(module, h0s, xs, ps):
    k, m, q = module.CUDA_K, module.CUDA_M, module.CUDA_Q
    if len(h0s) != k or len(xs) != m or len(ps) != q:
        raise ValueError(f"expected {k} h0, {m} inputs, {q} params; got "
                         f"{len(h0s)}, {len(xs)}, {len(ps)}")
    dtype = _torch_dtype(module)
    for t in list(h0s) + list(xs) + list(ps):
        if t.dtype != dtype:
            raise TypeError(f"CUDA module is {module.CUDA_DTYPE}, got a {t.dtype} tensor")


def forward(module, h0s: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
            ps: Sequence[torch.Tensor], *, method: str = "auto", iterations: int | None = None,
            tol: float | None = None, chunk: int | None = None, threads: int | None = None,
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], ForwardStats]:
    """Run the forward recurrence.

    h0s: k tensors (B, D); xs: m tensors (B, T, D); ps: q tensors (D,) or ().
    method: "newton" (fused parallel Newton, non-converged sequences rerun sequentially),
    "sequential" (one thread per (b, c)) or "auto" (see `_defaults.auto_method`).
    iterations: Newton's (default `_defaults.default_iterations`).
    tol: bound on the normwise relative residual of the returned iterate, per sequence
    (b, c) and state: max_t |h_t - f(h_{t-1}, x_t)| <= tol * max_t |h_t| (default
    `_defaults.default_tol`; see docs/numerics.md).
    chunk, threads: the fused kernel's launch configuration (default `launch_config`'s):
    steps per thread and pass, and threads per block (32 channels x threads / 32 time warps).

    Returns (states: k tensors (B, T, D), outputs: o tensors (B, T, D), stats), where
    stats.fallback counts sequences (b, c) rerun sequentially.
    """
    _check(module, h0s, xs, ps)
    B, T, D = xs[0].shape if xs else (h0s[0].shape[0], 0, h0s[0].shape[1])
    ctx = _Ctx(module, (list(xs) + list(h0s))[0])
    k, o = module.CUDA_K, module.CUDA_O
    states = [ctx.empty(B, T, D) for _ in range(k)]
    outputs = [ctx.empty(B, T, D) for _ in range(o)]
    method = _defaults.resolve_method(method, "cuda", dense=False)
    stats = ForwardStats(method)
    if B * D == 0 or T == 0:
        return states, outputs, stats
    iterations = _defaults.default_iterations(ctx.dtype) if iterations is None else iterations
    iterations = int(iterations)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    tol = _defaults.default_tol(ctx.dtype) if tol is None else float(tol)
    args = ([ctx.view(t) for t in h0s] + [ctx.view(t) for t in xs]
            + [ctx.param(t) for t in ps])
    outs = [ctx.view(t) for t in states + outputs]

    if method == "sequential":
        idx = torch.arange(B * D, dtype=torch.int32, device=ctx.device)
        _run_sequential(module, ctx, idx, args, outs, (B, T, D))
        return states, outputs, stats

    nthr, chunk = launch_config(T, chunk=chunk, threads=threads, limit=_fused_limit(module))
    status = ctx.empty(B, D, dtype=torch.int32)
    resid = ctx.empty(B, D)
    ctx.launch(module.newton_kernel, fused_grid(B, D), nthr, *args, *outs, ctx.view(status),
               ctx.view(resid), B, T, D, chunk, iterations, tol)
    status_h = status.cpu()  # synchronises the stream
    bad = (status_h < 0).flatten().nonzero().flatten()
    stats = ForwardStats(method, iterations=iterations if bad.numel() else int(status_h.max()),
                         fallback=int(bad.numel()), residual=float(resid.max()), chunk=chunk,
                         threads=nthr, histogram=tuple(
                             torch.bincount(status_h[status_h >= 0].long(), minlength=1).tolist()))
    if bad.numel():
        idx = bad.to(torch.int32).to(ctx.device)
        _run_sequential(module, ctx, idx, args, outs, (B, T, D))
    return states, outputs, stats


def _run_sequential(module, ctx, idx: torch.Tensor, args, outs, shape):
    n = idx.numel()
    block = 128 if not ctx.sim else 32
    ctx.launch(module.sequential_kernel, (n + block - 1) // block, block, ctx.view(idx),
               *args, *outs, *shape)


def backward(module, g_states: Sequence[torch.Tensor | None],
             g_outputs: Sequence[torch.Tensor | None], h0s: Sequence[torch.Tensor],
             xs: Sequence[torch.Tensor], ps: Sequence[torch.Tensor],
             states: Sequence[torch.Tensor], *, method: str = "parallel",
             chunk: int | None = None, threads: int | None = None,
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of sum(g_states * states) + sum(g_outputs * outputs).

    g_states: k tensors (B, T, D) (None means zeros); g_outputs: o tensors (B, T, D) or None;
    states: the forward states.  method: "parallel" (fused reverse-time reduction, one block
    per 32 channels of a batch entry) or "sequential" (one thread per (b, c)).
    chunk, threads: as for `forward`.
    Returns (g_h0s: k (B, D), g_xs: m (B, T, D), g_ps: q tensors shaped like ps).
    """
    _check(module, h0s, xs, ps)
    k, m, q, o = module.CUDA_K, module.CUDA_M, module.CUDA_Q, module.CUDA_O
    if len(g_states) != k or len(g_outputs) != o or len(states) != k:
        raise ValueError(f"expected {k} state cotangents, {o} output cotangents and {k} states")
    B, T, D = states[0].shape
    ctx = _Ctx(module, states[0])
    g_states = [ctx.zeros(B, T, D) if g is None else g for g in g_states]
    g_outputs = [ctx.zeros(B, T, D) if g is None else g for g in g_outputs]
    for t in list(g_states) + list(g_outputs) + list(states):
        if t.dtype != ctx.dtype:
            raise TypeError(f"CUDA module is {module.CUDA_DTYPE}, got a {t.dtype} tensor")
    g_h0s = [ctx.zeros(B, D) for _ in range(k)]
    g_xs = [ctx.zeros(B, T, D) for _ in range(m)]
    g_parts = [ctx.zeros(B, D) for _ in range(q)]
    if B * D and T:
        args = ([ctx.view(t) for t in g_states] + [ctx.view(t) for t in g_outputs]
                + [ctx.view(t) for t in h0s] + [ctx.view(t) for t in xs]
                + [ctx.param(t) for t in ps] + [ctx.view(t) for t in states]
                + [ctx.view(t) for t in g_h0s] + [ctx.view(t) for t in g_xs]
                + [ctx.view(t) for t in g_parts])
        if method == "parallel":
            nthr, chunk = launch_config(T, chunk=chunk, threads=threads,
                                        limit=_fused_limit(module))
            ctx.launch(module.backward_kernel, fused_grid(B, D), nthr, *args, B, T, D, chunk)
        elif method == "sequential":
            block = 128 if not ctx.sim else 32
            ctx.launch(module.backward_sequential_kernel, (B * D + block - 1) // block, block,
                       *args, B, T, D)
        else:
            raise ValueError(f"method must be 'parallel' or 'sequential', got {method!r}")
    g_ps = []
    for part, kind, p in zip(g_parts, module.CUDA_PARAM_KINDS, ps, strict=True):
        g = part.sum(0) if kind == "vector" else part.sum()
        g_ps.append(g.reshape(p.shape))
    return g_h0s, g_xs, g_ps

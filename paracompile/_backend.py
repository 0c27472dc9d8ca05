"""The interface the kernel launchers `_cpu` and `_cuda` share, so that `_runtime` only picks
one of them:

    forward(module, h0s, xs, ps, *, method="auto", iterations=None, tol=None, chunk=None)
        -> (states, outputs, ForwardStats)
    backward(module, g_states, g_outputs, h0s, xs, ps, states) -> (g_h0s, g_xs, g_ps)

`module` is a generated module of the launcher's target; h0s are k (B, D) tensors, xs m
(B, T, D), ps q params in declaration order ((D,) vector, () scalar, (D, D) matrix), all of the
module's dtype; states and outputs come back as k and o (B, T, D) tensors, gradients shaped
like what they are the gradients of. `method`, `iterations` and `tol` default as in
`_defaults`; `chunk` is the number of time steps per parallel work item (None: the launcher's
own choice). `_cuda` takes a few more launch knobs (see its functions).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardStats:
    """What one forward call did."""

    method: str
    """The method that ran, "sequential" or "newton" ("auto" resolved)."""
    iterations: int = 0
    """Newton updates done (the largest number over the sequences)."""
    fallback: int = 0
    """Sequences recomputed by the sequential kernel because Newton had not converged within
    the iterations: (b, channel) pairs (batch entries b for dense cells, whose channels are
    coupled)."""
    residual: float = 0.0
    """The largest normwise relative residual of Newton's last iterate, before the fallback."""
    chunk: int = 0
    """Time steps per parallel work item (0 for the sequential method)."""
    threads: int = 0
    """CUDA threads per block (0 on the CPU, and for the sequential method)."""
    histogram: tuple[int, ...] = ()
    """histogram[i]: the sequences that converged after i Newton updates ((b, channel) pairs;
    batch entries b for dense cells); the fallback ones are not counted."""

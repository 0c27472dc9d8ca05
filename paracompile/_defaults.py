"""Every default of the run-time side, defined once: Newton's tolerance and iteration count,
the CPU kernels' time chunk and channel block, the CUDA simulator switch, and the "auto"
method and backend.

`cell.apply`, the CPU and CUDA launchers (`_cpu`, `_cuda`) and the torch reference
(`_reference`) all read them from here. Imports neither torch nor numba.
"""

from __future__ import annotations

import os

METHODS = ("auto", "sequential", "newton")
"""The values of `cell.apply(method=...)`."""

BACKENDS = ("auto", "cpu", "cuda", "torch")
"""The values of `cell.apply(backend=...)`."""

DEFAULT_ITERATIONS: dict[str, int] = {"float32": 8, "float64": 10}
"""Plain Newton iterations (the cap: each sequence stops as soon as it has converged) before
the damped ones and the sequential fallback, per compute dtype. Three reach float32 precision
on mildly nonlinear cells, but ParaGRU/ParaLSTM with saturated gates need up to 6-8 (float64:
a few more); see the measurements in docs/numerics.md."""

DAMPED_STEPS = 8
"""On the CPU and in the torch reference: linearisations spent on damped Newton updates
(Levenberg–Marquardt, `damping="lm"`: see docs/numerics.md) for the (sequence, channel)
pairs still unconverged after the plain iterations, before the sequential fallback; each
counts as an iteration. The CUDA kernel falls back directly."""

DAMPINGS = ("lm", "none")
"""The values of `cell.apply(damping=...)`: the damped updates of the sequences still
unconverged after the plain Newton iterations (see `DAMPED_STEPS`)."""

LM_LAMBDA_INIT = 1e-6
"""λ of the first Levenberg–Marquardt step (damping="lm"), per (sequence, channel). LᵀL >= I
in the directions Newton handles well, so a small λ keeps those components of the Newton
step and only damps the ones along L's tiny singular values, where Newton's step blows up
(products of Jacobians > 1). Measured: 1e-12..1e-6 rescue the same sequences; 0.1 and 1
(heavily damped steps) rescue far fewer, fewer than the step-halving they replace."""

LM_LAMBDA_DOWN = 3.0
"""λ is divided by this after an accepted step (the linear model was good: trust it more)."""

LM_LAMBDA_UP = 10.0
"""λ is multiplied by this after a rejected step (a shorter, more gradient-like step)."""

TOL_FACTOR = 16.0
"""Newton's default relative residual tolerance, in machine epsilons of the dtype."""

CPU_TIME_CHUNK = 128
"""Time steps per parallel task of the CPU Newton kernels: each task composes the affine maps
of its chunk, so longer chunks mean fewer tasks and a shorter carry across chunks."""

CPU_CHANNEL_BLOCKS = (512, 256, 128, 64)
"""The channel blocks `cpu_channel_block` chooses from, longest first."""

CPU_TASKS_PER_THREAD = 2
"""`cpu_channel_block` keeps at least this many (sequence, channel block) tasks per thread
where it can, so that every thread has work and an uneven split costs little."""


def cpu_channel_block(B: int, D: int, threads: int) -> int:
    """Channels per task of the per-channel CPU kernels for a call on B sequences of D
    channels with `threads` numba threads (the launcher passes it to every kernel as CH).

    The longest block of `CPU_CHANNEL_BLOCKS` that still leaves B * ceil(D / CH) >=
    `CPU_TASKS_PER_THREAD` * threads tasks (one task for one thread), the shortest (64)
    when none does; then the shortest block with as many blocks per row (D = 70 takes 128,
    not 512: the same single block). Longer blocks amortise the per-(task, time step)
    overhead and give the core more independent channels per step (one thread, B=4, D=256:
    the forward is 1.4-1.7x faster with 256 than with 64, the backward 5-15%; see
    docs/benchmarks.md); shorter ones give more tasks to spread over threads."""
    want = CPU_TASKS_PER_THREAD * threads if threads > 1 else 1  # one thread: nothing to balance
    ch = next((c for c in CPU_CHANNEL_BLOCKS if B * -(-D // c) >= want),
              CPU_CHANNEL_BLOCKS[-1])
    return min(c for c in CPU_CHANNEL_BLOCKS if c <= ch and -(-D // c) == -(-D // ch))


# the machine epsilons (torch.finfo(dtype).eps), by dtype name: no torch import needed
_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23,
        "float64": 2.0 ** -52}


def _dtype_name(dtype: object) -> str:
    # "float32", torch.float32 and numpy.dtype("float32") all name the same dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _EPS:
        raise ValueError(f"dtype must be a floating-point dtype "
                         f"({', '.join(_EPS)}), got {dtype!r}")
    return name


def default_tol(dtype: object) -> float:
    """Newton's relative residual tolerance for `dtype` (a name or a torch/numpy dtype):
    ``TOL_FACTOR * eps`` (float32: 1.9e-6, float64: 3.6e-15). A sequence has converged when,
    per channel and state, max_t |h_t - f(h_{t-1})| <= tol * max_t |h_t| (see
    docs/numerics.md); converged iterates of well-behaved cells sit at about 1-3 eps."""
    return TOL_FACTOR * _EPS[_dtype_name(dtype)]


def default_iterations(dtype: object) -> int:
    """`DEFAULT_ITERATIONS` of `dtype` (a name or a torch/numpy dtype; float16 and bfloat16
    compute in float32)."""
    name = _dtype_name(dtype)
    return DEFAULT_ITERATIONS.get(name, DEFAULT_ITERATIONS["float32"])


def simulator_enabled() -> bool:
    """True when the user asked for numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM`` set and
    not "0"): backend="cuda" then runs on CPU tensors. Read from the environment, so asking
    does not import numba."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def auto_backend(*, on_cuda: bool, dense: bool) -> str:
    """backend="auto": "cuda" for CUDA tensors, "cpu" otherwise (for every structure:
    `dense` does not change the choice)."""
    return "cuda" if on_cuda else "cpu"


def auto_method(backend: str, *, dense: bool) -> str:
    """method="auto" on `backend`: Newton on CUDA (parallel in time pays off on a GPU at any
    length), the sequential kernel elsewhere (on the CPU the parallelism over batch and
    channels already fills the cores) and for dense cells on CUDA (their CUDA kernels are
    sequential: there is no dense Newton kernel)."""
    return "newton" if backend == "cuda" and not dense else "sequential"


def resolve_method(method: str, backend: str, *, dense: bool) -> str:
    """The method to run on `backend` ("cpu" or "cuda"): `method`, or `auto_method` for
    "auto"; ValueError for anything else."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return auto_method(backend, dense=dense) if method == "auto" else method

"""The run-time side of a compiled cell: the `CompiledCell` object (see docs/api.md), torch
custom ops around the generated kernels, autograd, and single-step decoding (`step`).

Imports neither SymPy, Lark nor Jinja: modules written by `paracompile build` use only this.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from . import _cache, _cpu, _cuda, _cuda_dense, _reference
from ._checks import (
    COMPUTE_DTYPES,
    check_choice,
    check_dtype,
    check_iterations,
    check_names,
    check_tol,
    consistency_check,
    param_tensors,
    tensor,
)
from ._defaults import (
    BACKENDS,
    DAMPED_STEPS,
    DAMPINGS,
    METHODS,
    auto_backend,
    default_iterations,
    default_tol,
    resolve_method,
    simulator_enabled,
)
from ._layer import layer_class
from ._meta import CellMeta
from ._version import __version__

# (target, dtype) -> generated module; supplied by the driver (render + cache) or a built file
ModuleProvider = Callable[[str, str], ModuleType]
_MODULE_LOCK = threading.Lock()


@dataclass
class NewtonStats:
    """Counters of what the Newton solver did (updated by every forward call)."""

    calls: int = 0
    iterations: int = 0  # summed over calls
    fallback_sequences: int = 0  # sequences recomputed sequentially because Newton stalled
    # histogram[i]: sequences that converged after i updates, summed over calls (see
    # ForwardStats.histogram); the fallback ones are not counted
    histogram: list[int] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)


class CompiledCell:
    """A compiled recurrent cell (see docs/api.md). Create with `paracompile.load`.

    Attributes: ``name``, ``states``, ``inputs``, ``params`` (name -> "vector" | "scalar" |
    "matrix"), ``outputs``, ``structure`` ("diagonal", "block(K)" or "dense"), ``meta`` (the
    `CellMeta` they come from).

    `loader`, when given, is a picklable callable that makes this cell again in another
    process (the driver passes `functools.partial(load, source)`): layers of the cell pickle
    by it, so this module needs to know neither the driver nor how the cell was made.
    """

    def __init__(self, meta: CellMeta, modules: ModuleProvider,
                 torch_step: Callable[..., Any],
                 loader: Callable[[], CompiledCell] | None = None) -> None:
        self.meta = meta
        self._stats_lock = threading.Lock()  # apply() may run in several threads at once
        self.name: str = meta.name
        self.states: tuple[str, ...] = meta.states
        self.inputs: tuple[str, ...] = meta.inputs
        self.params: dict[str, str] = dict(meta.params)
        self.outputs: tuple[str, ...] = meta.outputs
        self.structure: str = meta.structure
        self.inits: dict[str, tuple[str, tuple[float, ...]] | None] = dict(meta.inits)
        self.key: str = meta.key
        self.loader = loader
        self.stats = NewtonStats()
        self._modules = modules
        self._torch_step = torch_step
        self._forward_op, self._backward_op = _ops_for(self)

    def __repr__(self) -> str:
        return (f"<CompiledCell {self.name}: states={self.states}, inputs={self.inputs}, "
                f"params={self.params}, structure={self.structure!r}>")

    @property
    def dense(self) -> bool:
        return self.structure == "dense"

    @property
    def Layer(self) -> type:  # noqa: N802 - a class (docs/api.md): cell.Layer(...)
        """An `nn.Module` class running this cell (see `paracompile._layer.CellLayer`)."""
        return layer_class(self)

    def step(
        self,
        inputs: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One step of the recurrence, for decoding: inputs (B, D) per name, state (B, D) per
        state name (missing states start at zero) -> ``(new state, outputs)``, each a dict of
        (B, D) tensors. Runs the pure-torch step: differentiable by plain torch autograd.

        float16/bfloat16 are computed in float32 and returned in the input dtype, as in `apply`.
        """
        check_names("inputs", inputs, self.inputs, required=True)
        check_names("params", params, tuple(self.params), required=True)
        if state is not None:
            check_names("state", state, self.states, required=False)
        xs = [tensor(f"inputs[{n!r}]", inputs[n]) for n in self.inputs]
        given = {} if state is None else {n: tensor(f"state[{n!r}]", state[n]) for n in state}
        if xs:
            ref_arg, ref = f"inputs[{self.inputs[0]!r}]", xs[0]
        elif given and len(given) == len(self.states):
            ref_arg, ref = f"state[{self.states[0]!r}]", given[self.states[0]]
        else:
            raise ValueError(f"cell {self.name} has no inputs, so step() cannot tell the batch "
                             f"size: pass every state ({', '.join(self.states)}) as (B, D) "
                             "tensors")
        if ref.dim() != 2:
            hint = (" (one time step; use apply() for (B, T, D) sequences)" if ref.dim() == 3
                    else "")
            raise ValueError(f"{ref_arg} must have shape (B, D){hint}, got {tuple(ref.shape)}")
        B, D = ref.shape
        check_dtype(ref_arg, ref.dtype)
        if D == 0:
            raise ValueError(f"{ref_arg} has D = 0 channels")

        same = consistency_check(ref_arg, ref, B=B, D=D)
        for n, x in zip(self.inputs, xs, strict=True):
            same(f"inputs[{n!r}]", x, (B, D), "(B, D)")
        ps = param_tensors(params, self.params, D, same)
        ss = []
        for n in self.states:
            if n in given:
                same(f"state[{n!r}]", given[n], (B, D), "(B, D)")
                ss.append(given[n])
            else:
                ss.append(ref.new_zeros(B, D))
        in_dtype = ref.dtype
        dtype = in_dtype if in_dtype in COMPUTE_DTYPES else torch.float32
        cast = [[t.to(dtype) for t in group] for group in (ss, xs, ps)]
        new_states, outputs = self._torch_step(*(tuple(group) for group in cast))

        def result(v: Any) -> torch.Tensor:  # a constant or (D,) expression still gives (B, D)
            v = torch.as_tensor(v, dtype=dtype, device=ref.device)
            return torch.broadcast_to(v, (B, D)).to(in_dtype)

        return ({n: result(v) for n, v in zip(self.states, new_states, strict=True)},
                {n: result(v) for n, v in zip(self.outputs, outputs, strict=True)})

    # -- the public entry point ----------------------------------------------------------------
    def apply(
        self,
        inputs: Mapping[str, torch.Tensor],
        params: Mapping[str, torch.Tensor],
        h0: Mapping[str, torch.Tensor] | None = None,
        method: str = "auto",
        backend: str = "auto",
        *,
        iterations: int | None = None,
        tol: float | None = None,
        damping: str = "lm",
    ) -> dict[str, torch.Tensor]:
        """Run the recurrence over whole sequences.

        Args:
            inputs: input name -> (B, T, D) tensor.
            params: param name -> (D,) vector, () scalar or (D, D) matrix.
            h0: optional state name -> (B, D) initial state (missing states start at zero).
            method: "sequential", "newton" (parallel in time; the same answer), or "auto"
                (sequential on the CPU, Newton on CUDA).
            backend: "cpu", "cuda" (CUDA tensors, or numba's simulator on CPU tensors when
                NUMBA_ENABLE_CUDASIM=1), "torch" (the pure-torch reference), or "auto".
            iterations: plain Newton iterations (default 8 in float32, 10 in float64: see
                `_defaults.DEFAULT_ITERATIONS`); the sequences still unconverged get the damped
                updates, then fall back to the sequential kernel.
            tol: Newton's relative residual tolerance (default 16 machine epsilons).
            damping: the damped updates tried before the fallback (CPU and torch backends;
                the CUDA kernel falls back directly): "lm" (Levenberg–Marquardt, the default)
                or "none" (no damped updates).

        Returns:
            state name -> (B, T, D) state after each step, and output name -> (B, T, D).
        """
        xs, ps, h0s, B, T, D = self._check(inputs, params, h0)
        method, backend = self._choose(method, backend, xs[0])
        check_choice("damping", damping, DAMPINGS)
        in_dtype = xs[0].dtype
        dtype = in_dtype if in_dtype in COMPUTE_DTYPES else torch.float32
        xs = [x.to(dtype) for x in xs]
        ps = [p.to(dtype) for p in ps]
        h0s = [h.to(dtype) for h in h0s]
        name = COMPUTE_DTYPES[dtype]
        iterations = (default_iterations(name) if iterations is None
                      else check_iterations(iterations))
        tol = default_tol(name) if tol is None else check_tol(tol)
        if T == 0:
            empty = xs[0].new_empty(B, 0, D).to(in_dtype)
            return {n: empty for n in self.states + self.outputs}
        if backend == "torch":
            if method == "newton":
                states, outs, counts = _reference_newton(self._torch_step, h0s, xs, ps,
                                                         self.dense, iterations, tol, damping)
                self._count(*counts[:2], list(counts[2]))
            else:
                states, outs = _reference.sequential(
                    self._torch_step, tuple(h0s), tuple(xs), tuple(ps))
            results = [*states, *outs]
        else:
            target = "cudasim" if backend == "cuda" and not xs[0].is_cuda else backend
            if _plain_eager([*h0s, *xs, *ps]):
                *results, counts = _EagerCall.apply(self, method, target, iterations, tol,
                                                    damping, *h0s, *xs, *ps)
            else:
                *results, counts = self._forward_op(h0s, xs, ps, method, target, iterations,
                                                    tol, damping)
            # the counters come back through the op (no side channel: apply may run in several
            # threads); under torch.compile reading them would break the graph, so they are not
            if method == "newton" and not torch.compiler.is_compiling():
                done, fallback, *histogram = counts.tolist()
                self._count(done, fallback, histogram)
        return {n: r.to(in_dtype) for n, r in zip(self.states + self.outputs, results,
                                                   strict=True)}

    # -- argument checking ---------------------------------------------------------------------
    def _check(self, inputs: Any, params: Any, h0: Any):
        if not self.inputs:
            raise ValueError(f"cell {self.name} has no inputs, so apply() cannot tell the "
                             "sequence length; declare an input")
        check_names("inputs", inputs, self.inputs, required=True)
        check_names("params", params, tuple(self.params), required=True)
        if h0 is not None:
            check_names("h0", h0, self.states, required=False)
        xs = [tensor(f"inputs[{n!r}]", inputs[n]) for n in self.inputs]
        first = self.inputs[0]
        if xs[0].dim() != 3:
            raise ValueError(f"inputs[{first!r}] must have shape (B, T, D), got "
                             f"{tuple(xs[0].shape)}")
        B, T, D = xs[0].shape
        check_dtype(f"inputs[{first!r}]", xs[0].dtype)
        if D == 0:
            raise ValueError(f"inputs[{first!r}] has D = 0 channels")

        same = consistency_check(f"inputs[{first!r}]", xs[0], B=B, T=T, D=D)
        for n, x in zip(self.inputs[1:], xs[1:], strict=True):
            same(f"inputs[{n!r}]", x, (B, T, D), "(B, T, D)")
        ps = param_tensors(params, self.params, D, same)
        h0s = []
        for n in self.states:
            if h0 is not None and n in h0:
                h = tensor(f"h0[{n!r}]", h0[n])
                same(f"h0[{n!r}]", h, (B, D), "(B, D)")
            else:
                h = xs[0].new_zeros(B, D)
            h0s.append(h)
        return xs, ps, h0s, B, T, D

    def _choose(self, method: str, backend: str, x: torch.Tensor) -> tuple[str, str]:
        check_choice("method", method, METHODS)
        check_choice("backend", backend, BACKENDS)
        if backend == "auto":
            backend = auto_backend(on_cuda=x.is_cuda, dense=self.dense)
        if backend == "cpu" and x.is_cuda:
            raise ValueError("backend='cpu' needs CPU tensors; the inputs are on "
                             f"{x.device} (use backend='cuda' or 'auto')")
        if backend == "cuda" and not x.is_cuda and not simulator_enabled():
            raise ValueError("backend='cuda' needs CUDA tensors, or CPU tensors with "
                             "NUMBA_ENABLE_CUDASIM=1 set to run numba's CUDA simulator")
        if backend == "cuda" and self.dense and method == "newton":
            raise ValueError(f"method='newton' is not available for cell {self.name} on CUDA: "
                             "it is dense (a matrix parameter couples the channels), and its "
                             "CUDA kernel runs sequentially; use method='sequential' or "
                             "'auto', or backend='cpu' or 'torch' for Newton")
        return resolve_method(method, backend, dense=self.dense), backend

    # -- kernels behind the ops ----------------------------------------------------------------
    def _module(self, target: str, dtype: torch.dtype) -> ModuleType:
        # one thread at a time: a module being imported is already in sys.modules, and
        # another thread must not get it half-executed (concurrent first apply() calls)
        with _MODULE_LOCK:
            return self._modules(target, COMPUTE_DTYPES[dtype])

    def _run_forward(self, h0s, xs, ps, method, target, iterations, tol,
                     damping) -> list[torch.Tensor]:
        """The results, then an int64 tensor (Newton iterations, sequences that fell back, the
        iteration histogram padded to `_histogram_size(iterations)`)."""
        B, T, D = xs[0].shape
        if B == 0 or T == 0:  # nothing to run: no kernels to load
            return ([xs[0].new_empty(B, T, D) for _ in self.states + self.outputs]
                    + [_counters(0, 0, (), iterations)])
        # the CUDA kernels have no damped updates: they fall back directly; "" is the CPU
        # launcher's default
        damped = {"damping": damping} if target == "cpu" and damping else {}
        states, outputs, stats = self._launcher(target).forward(
            self._module(target, xs[0].dtype), h0s, xs, ps, method=method,
            iterations=iterations, tol=tol, **damped)
        return [*states, *outputs,
                _counters(stats.iterations, stats.fallback, stats.histogram, iterations)]

    def _count(self, iterations: int, fallback: int, histogram: list[int]) -> None:
        while histogram and not histogram[-1]:
            histogram.pop()
        with self._stats_lock:
            self.stats.calls += 1
            self.stats.iterations += iterations
            self.stats.fallback_sequences += fallback
            total = self.stats.histogram
            total.extend([0] * (len(histogram) - len(total)))
            for i, n in enumerate(histogram):
                total[i] += n
            self.stats.last = {"iterations": iterations, "fallback_sequences": fallback,
                               "histogram": histogram}

    def _run_backward(self, gs, gy, h0s, xs, ps, ss, target) -> list[torch.Tensor]:
        B, T, D = xs[0].shape
        if B == 0 or T == 0:
            return ([h.new_zeros(h.shape) for h in h0s] + [x.new_zeros(x.shape) for x in xs]
                    + [p.new_zeros(p.shape) for p in ps])
        g_h0s, g_xs, g_ps = self._launcher(target).backward(
            self._module(target, xs[0].dtype), gs, gy, h0s, xs, ps, ss)
        return [*g_h0s, *g_xs, *g_ps]

    def _launcher(self, target: str) -> ModuleType:
        """The launcher of `target`'s kernels (all have the interface of `_backend`)."""
        if target == "cpu":
            _check_fork_safe()
            return _cpu
        return _cuda_dense if self.dense else _cuda


def cell_from_sources(meta: Mapping[str, Any], sources: Mapping[str, str],
                      package: str | None = None) -> CompiledCell:
    """A cell from its metadata (`CellMeta.to_dict`) and pre-rendered module sources
    ("target/dtype" -> text), as written by `paracompile build`: each source is materialised
    in the cache (content-addressed) and imported, so numba's cache works for built modules
    too. Its layers pickle by these arguments: unpickling needs no compiler either.

    package: `_cache.package_fingerprint()` of the paracompile that built it (None: a build
    older than this check). The kernels were rendered for that package's launchers, so any
    other package is refused (ImportError): running them would risk wrong answers."""
    info = CellMeta.from_dict(meta)
    if package != _cache.package_fingerprint():
        raise ImportError(
            f"cell {info.name} was built by another version of paracompile (built by "
            f"{info.version}; this is {__version__}, with different sources): its kernels may "
            f"not match this runtime. Rebuild it: paracompile build <the .cell file> "
            f"(or paracompile.load the .cell file directly)")

    def module(target: str, dtype: str) -> ModuleType:
        source = sources.get(f"{target}/{dtype}")
        if source is None:
            raise NotImplementedError(f"cell {info.name} was built without {target} "
                                      f"{dtype} kernels")
        mod, _ = _cache.load_module(_cache.key("built", source),
                                    f"{info.name.lower()}_{target}_{dtype}", lambda: source)
        return mod

    cached = functools.cache(module)
    return CompiledCell(info, cached, cached("torch", "any").torch_step,
                        functools.partial(cell_from_sources, meta, sources, package))


@torch.compiler.disable
def _reference_newton(step, h0s, xs, ps, dense, iterations, tol, damping):
    """The torch reference Newton (data-dependent iteration count): run eagerly under
    torch.compile. Capped at `iterations`, like the compiled backends: unconverged sequences
    are recomputed by the loop. Returns (states, outputs, (iterations, fallback sequences))."""
    states, outs, info = _reference.newton(step, tuple(h0s), tuple(xs), tuple(ps), dense=dense,
                                           iterations=iterations, tol=tol,
                                           max_iterations=iterations,
                                           damped=DAMPED_STEPS if iterations else 0,
                                           damping=damping)
    return states, outs, (info.iterations, info.fallback_sequences, info.histogram)


# -- fork safety ----------------------------------------------------------------------------
# numba's "omp" threading layer on GNU OpenMP is not fork-safe: in a child forked after any
# parallel kernel ran, the next parallel kernel kills the child with SIGTERM. numba picks
# "tbb" first when the tbb package is installed (fork- and thread-safe); otherwise "omp"
# (thread-safe, needed for concurrent apply()). There, a forked child gets this error instead.
_FORK_UNSAFE_CHILD = False


def _after_fork_in_child() -> None:
    global _FORK_UNSAFE_CHILD
    numba = sys.modules.get("numba")
    if numba is None or _FORK_UNSAFE_CHILD:
        return
    try:
        layer = numba.threading_layer()  # ValueError: no parallel kernel has run yet
    except ValueError:
        return
    if layer == "omp":
        from numba.np.ufunc import omppool

        _FORK_UNSAFE_CHILD = omppool.openmp_vendor == "GNU"


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_fork_safe() -> None:
    if _FORK_UNSAFE_CHILD:
        raise RuntimeError(
            "paracompile: this process was fork()ed from one that had already run parallel "
            "CPU kernels with numba's 'omp' threading layer (GNU OpenMP), which is not "
            "fork-safe: a CPU kernel here would kill the process. Start worker processes with "
            "multiprocessing's 'spawn' or 'forkserver' method, or install the 'tbb' package "
            "(numba then uses its fork-safe 'tbb' layer); see docs/api.md")


def _histogram_size(iterations: int) -> int:
    # a fixed length (the fake op must know it): updates run to 0..iterations + DAMPED_STEPS
    return iterations + DAMPED_STEPS + 1


def _counters(iterations: int, fallback: int, histogram: Sequence[int],
              cap: int) -> torch.Tensor:
    size = _histogram_size(cap)
    padded = list(histogram)[:size] + [0] * max(0, size - len(histogram))
    return torch.tensor([iterations, fallback, *padded], dtype=torch.int64)




# -- the kernels' autograd: a plain autograd.Function in eager mode, custom ops otherwise ------
# Both run the same `_run_forward` and `_run_backward`. The custom ops are what torch.compile,
# FakeTensor and other tracers see (fake implementations, a backward op it can trace); in
# plain eager mode their Python wrappers (pytree flattening of the list arguments, two
# dispatcher round trips, the backward op inside the backward) cost ~0.2-0.3 ms of host time
# per backward call on top of the kernel (docs/benchmarks.md), which `_EagerCall` skips.


# nn.Parameter is a subclass only to mark module parameters (it disables __torch_function__)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernels can run directly: no tracer can be watching (not compiling, not
    jit-tracing, no `__torch_dispatch__` mode such as FakeTensorMode or make_fx's proxy mode)
    and only plain tensors or `nn.Parameter`s (no other subclass, e.g. FakeTensor or a
    functional tensor) with data (on the CPU or a GPU; the ops answer meta tensors with
    shapes). If torch no longer has the dispatch-mode probe, False: the custom ops are always
    correct, just slower."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if dispatch_modes is None or dispatch_modes() > 0:
        return False
    return all(type(t) in _PLAIN_TENSORS and (t.is_cpu or t.is_cuda) for t in tensors)


def _saved_groups(saved: Sequence[torch.Tensor], n_states: int, n_inputs: int
                  ) -> tuple[Sequence[torch.Tensor], ...]:
    """(h0s, xs, ps, states) from the tensors both autograd paths save for the backward: h0
    (k), xs (m), ps, then the forward's states (k)."""
    n = len(saved) - n_states
    return (saved[:n_states], saved[n_states:n_states + n_inputs],
            saved[n_states + n_inputs:n], saved[n:])


def _cotangents(grads: Sequence[torch.Tensor | None], like: torch.Tensor
                ) -> list[torch.Tensor]:
    """The (B, T, D) cotangents of the states and outputs for `_run_backward`: zeros where
    autograd gave none, contiguous."""
    return [torch.zeros_like(like) if g is None else g.contiguous() for g in grads]


class _EagerCall(torch.autograd.Function):
    """The forward op and its backward as one plain autograd.Function (eager mode only, see
    `_plain_eager`). Arguments: the cell, method, target, iterations, tol, damping, then the
    tensors h0 (k), xs (m), ps (q); returns the states, outputs and the counters, as the op."""

    @staticmethod
    def forward(ctx: Any, cell: CompiledCell, method: str, target: str, iterations: int,
                tol: float, damping: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k, m = len(cell.states), len(cell.inputs)
        h0s, xs, ps = tensors[:k], tensors[k:k + m], tensors[k + m:]
        results = cell._run_forward(h0s, xs, ps, method, target, iterations, tol, damping)
        ctx.save_for_backward(*tensors, *results[:k])
        ctx.cell, ctx.target = cell, target
        ctx.mark_non_differentiable(results[-1])  # Newton's counters
        ctx.set_materialize_grads(False)  # `_cotangents` makes the zeros it needs
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the backward op: no double backward
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        cell = ctx.cell
        k = len(cell.states)
        h0s, xs, ps, ss = _saved_groups(ctx.saved_tensors, k, len(cell.inputs))
        gs = _cotangents(grads[:-1], ss[0])  # the counters have no gradient
        out = cell._run_backward(gs[:k], gs[k:], h0s, xs, ps, ss, ctx.target)
        return (None,) * 6 + tuple(out)


# -- torch custom ops ------------------------------------------------------------------------

_OPS: dict[str, tuple[Any, Any]] = {}
_CELLS: dict[str, CompiledCell] = {}


def _ops_for(cell: CompiledCell):
    """The (forward, backward) custom ops of a cell, registered once per process per key."""
    _CELLS[cell.key] = cell  # the newest object with this key serves the ops
    if cell.key in _OPS:
        return _OPS[cell.key]
    n_states, n_in = len(cell.states), len(cell.inputs)
    key = cell.key
    base = f"paracompile::{_identifier(cell.name)}_{key[:16]}"

    @torch.library.custom_op(base + "_forward", mutates_args=())
    def forward(h0: list[torch.Tensor], xs: list[torch.Tensor], ps: list[torch.Tensor],
                method: str, target: str, iterations: int, tol: float,
                damping: str = "") -> list[torch.Tensor]:
        return _CELLS[key]._run_forward(h0, xs, ps, method, target, iterations, tol, damping)

    @forward.register_fake
    def _(h0, xs, ps, method, target, iterations, tol, damping=""):
        return ([xs[0].new_empty(xs[0].shape) for _ in range(n_states + len(cell.outputs))]
                + [torch.empty(2 + _histogram_size(iterations), dtype=torch.int64)])

    @torch.library.custom_op(base + "_backward", mutates_args=())
    def backward(gs: list[torch.Tensor], gy: list[torch.Tensor], h0: list[torch.Tensor],
                 xs: list[torch.Tensor], ps: list[torch.Tensor], ss: list[torch.Tensor],
                 target: str) -> list[torch.Tensor]:
        return _CELLS[key]._run_backward(gs, gy, h0, xs, ps, ss, target)

    @backward.register_fake
    def _(gs, gy, h0, xs, ps, ss, target):
        return ([h.new_empty(h.shape) for h in h0] + [x.new_empty(x.shape) for x in xs]
                + [p.new_empty(p.shape) for p in ps])

    def setup_context(ctx, inputs, output):
        h0, xs, ps, _, target = inputs[:5]  # then iterations, tol, damping
        ctx.save_for_backward(*h0, *xs, *ps, *output[:n_states])
        ctx.target = target
        # torch's dispatcher drops an argument equal to its default before autograd sees
        # it: damping="" (a direct call without it; apply always passes it) has no grad slot
        ctx.n_inputs = len(inputs) - (inputs[7] == "")

    def grad(ctx, grads):
        h0, xs, ps, ss = (list(g) for g in _saved_groups(ctx.saved_tensors, n_states, n_in))
        grads = _cotangents(grads[:-1], ss[0])  # the counters have no gradient
        out = backward(grads[:n_states], grads[n_states:], h0, xs, ps, ss, ctx.target)
        return (out[:n_states], out[n_states:n_states + n_in], out[n_states + n_in:],
                *[None] * (ctx.n_inputs - 3))

    torch.library.register_autograd(base + "_forward", grad, setup_context=setup_context)
    _OPS[key] = (forward, backward)
    return _OPS[key]


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)

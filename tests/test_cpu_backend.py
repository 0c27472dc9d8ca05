"""The numba CPU backend against the pure-torch reference.

Every shipped cell × dtype × method: states, outputs and all gradients (inputs, params, h0)
of ``backend="cpu"`` against ``backend="torch", method="sequential"`` run in float64 on the
same data (rounded to the tested dtype first), so the bound measures the kernel's own error.

Tolerance (both dtypes): ``max|a - b| / (1 + max|b|) <= 50 · eps · sqrt(T)``.
Why: one step adds a few ulps of rounding (float64 libm is within 1 ulp; the float32 fast
exp/tanh/sigmoid of ``_fastmath`` within ~8 ulp; a handful of arithmetic operations), and
Newton stops at a relative residual of 16 eps. The shipped recurrences do not expand errors
(with the scaled random params of conftest), so independent per-step errors add at most like a
random walk: ~sqrt(T). Gradients are sums of T (params: B·T) such terms and are compared
relative to their own size. The worst error measured over all cells, shapes and both methods
was 3.1 eps·sqrt(T) (ParaGRU/ParaLSTM ≤ 0.9; Coupled3's parameter gradients the largest), so
50 leaves a ~16× margin; float64 gets the same formula, i.e. ≤ 2e-13 — far tighter than 1e-10.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from conftest import (
    CELLS_DIR,
    SHIPPED,
    cast,
    leaves,
    make_case,
    make_h0,
    make_inputs,
    make_params,
    max_rel_err,
    rel_err,
    shipped,
    warm_kernels,
)

import paracompile
from paracompile import _runtime
from paracompile._defaults import DAMPED_STEPS, default_tol

DTYPES = {"float64": torch.float64, "float32": torch.float32}
METHODS = ("sequential", "newton")
B = 3
# (T, D): T = 1 and 2 (edge cases of the Newton guess), 37, 130 and 300 (more than one
# 128-step time chunk of the Newton reduction); D = 1, 5 and 70 (more than one 64-channel
# block); the largest sizes are paired with the others rather than all combined.
SHAPES = [(1, 5), (2, 1), (37, 70), (130, 5), (300, 1), (300, 70)]


LOGISTIC = """
cell Logistic
state h
input x
h' = 3.9 * sigmoid(x) * h * (1 - h)
"""


@pytest.fixture(scope="module", autouse=True)
def _warm(request):
    """Compile every kernel used here in parallel first (the slowest part of a cold run), when
    most of this module is selected (a few tests compile just what they need themselves)."""
    selected = sum(item.module is request.module for item in request.session.items)
    if selected < 50:
        return
    cells = ["coupled3", "paralstm", "elman", "paragru", "indrnn", "mingru"]
    jobs = [(str(CELLS_DIR / f"{c}.cell"), d) for c in cells for d in DTYPES]
    warm_kernels(jobs + [(LOGISTIC, d) for d in DTYPES])


def fresh(name: str):
    """A newly loaded shipped cell, for tests that read `cell.stats` (they start at zero)."""
    return paracompile.load(CELLS_DIR / f"{name}.cell")


def bound(dtype: torch.dtype, T: int) -> float:
    return 50 * torch.finfo(dtype).eps * math.sqrt(max(T, 1))


def names_out(cell) -> list[str]:
    return [*cell.states, *cell.outputs]


def run(cell, xs, ps, h0, cots, **kw):
    """apply, then the gradients of sum(cot · out) w.r.t. every input, param and h0 tensor."""
    out = cell.apply(xs, ps, h0, **kw)
    assert list(out) == names_out(cell)
    loss = sum((out[n] * cots[n].to(out[n].dtype)).sum() for n in out)
    grads = torch.autograd.grad(loss, leaves(xs, ps, h0))
    return [out[n].detach() for n in out], list(grads)


@cache
def case(name: str, dtype_name: str, T: int, D: int):
    """Data for one test (rounded to the dtype), its random cotangents and the float64 torch
    reference (states + outputs, gradients), shared by both methods."""
    cell = shipped(name)
    dtype = DTYPES[dtype_name]
    xs, ps, h0 = make_case(cell, B, T, D, torch.float64, seed=T * 1000 + D)
    xs, ps, h0 = (cast(cast(d, dtype), torch.float64) for d in (xs, ps, h0))
    g = torch.Generator().manual_seed(7)
    cots = {n: torch.randn(B, T, D, dtype=torch.float64, generator=g).to(dtype).double()
            for n in names_out(cell)}
    ref = run(cell, cast(xs, torch.float64, True), cast(ps, torch.float64, True),
              cast(h0, torch.float64, True), cots, method="sequential", backend="torch")
    return xs, ps, h0, cots, ref


@pytest.mark.parametrize("T,D", SHAPES, ids=[f"T{t}-D{d}" for t, d in SHAPES])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", SHIPPED)
def test_matches_torch_reference(name, dtype_name, method, T, D):
    cell = shipped(name)
    dtype = DTYPES[dtype_name]
    xs, ps, h0, cots, (ref_out, ref_grads) = case(name, dtype_name, T, D)
    out, grads = run(cell, cast(xs, dtype, True), cast(ps, dtype, True), cast(h0, dtype, True),
                     cots, method=method, backend="cpu")
    for o in out:
        assert o.dtype == dtype and o.shape == (B, T, D)
    for gr, leaf in zip(grads, leaves(xs, ps, h0), strict=True):
        assert gr.dtype == dtype and gr.shape == leaf.shape
    tol = bound(dtype, T)
    err_out = {n: rel_err(a, b) for n, a, b in zip(names_out(cell), out, ref_out, strict=True)}
    assert max(err_out.values()) <= tol, (err_out, tol)
    grad_names = [f"d/d{n}" for d in (xs, ps, h0) for n in d]
    err_grad = {n: rel_err(a, b) for n, a, b in zip(grad_names, grads, ref_grads, strict=True)}
    assert max(err_grad.values()) <= tol, (err_grad, tol)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", SHIPPED)
def test_newton_converges_given_enough_iterations(name, dtype_name):
    """With iterations to spare, Newton itself (not the sequential fallback) gives the answer:
    exercises the chunked reduction over several time chunks and channel blocks."""
    cell = fresh(name)
    T, D = 300, 70
    dtype = DTYPES[dtype_name]
    xs, ps, h0, cots, (ref_out, ref_grads) = case(name, dtype_name, T, D)
    out, grads = run(cell, cast(xs, dtype, True), cast(ps, dtype, True), cast(h0, dtype, True),
                     cots, method="newton", backend="cpu", iterations=T)
    assert cell.stats.last["fallback_sequences"] == 0, cell.stats.last
    assert 0 < cell.stats.last["iterations"] < T, cell.stats.last
    assert max_rel_err(out, ref_out) <= bound(dtype, T)
    assert max_rel_err(grads, ref_grads) <= bound(dtype, T)


# -- long sequences ----------------------------------------------------------------------------

@pytest.mark.parametrize("iterations", [None, 12], ids=["default-iterations", "12-iterations"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_newton_long_sequence(name, dtype_name, iterations):
    """T = 50 000: Newton (default iterations, possibly with fallback; and with enough
    iterations to converge by itself) agrees with the sequential kernel."""
    cell = fresh(name)
    dtype = DTYPES[dtype_name]
    Bl, T, D = 2, 50_000, 8
    xs, ps, h0 = make_case(cell, Bl, T, D, dtype, seed=11)
    seq = cell.apply(xs, ps, h0, method="sequential", backend="cpu")
    new = cell.apply(xs, ps, h0, method="newton", backend="cpu", iterations=iterations)
    stats = dict(cell.stats.last)
    if iterations is not None:
        assert stats["fallback_sequences"] == 0, stats
    # errors do not accumulate over T in these contracting cells: Newton's answer is within
    # its residual tolerance (16 eps) of the sequential one, amplified by 1 / (1 - |J|)
    tol = 50 * torch.finfo(dtype).eps
    for n in seq:
        assert torch.isfinite(new[n]).all()
        assert rel_err(new[n], seq[n]) <= tol, (n, rel_err(new[n], seq[n]), stats)


def test_stats_belong_to_their_cell():
    """`cell.stats` counts the Newton calls of that cell object. Loading the same cell again
    (same key) must not divert the counts of the first object to the second."""
    first = fresh("paragru")
    second = fresh("paragru")
    xs, ps, h0 = make_case(first, 2, 10, 3, torch.float64)
    first.apply(xs, ps, h0, method="newton", backend="cpu")
    second.apply(xs, ps, h0, method="newton", backend="cpu")
    second.apply(xs, ps, h0, method="newton", backend="cpu")
    assert (first.stats.calls, second.stats.calls) == (1, 2)


# -- Newton that cannot converge ---------------------------------------------------------------

@pytest.fixture
def logistic():
    return paracompile.load(LOGISTIC)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_chaotic_cell_falls_back_to_sequential(logistic, dtype_name):
    """The logistic map at r = 3.9 (x = +10) is chaotic: Newton's linearisation cannot
    converge in 3 iterations nor in the damped steps after them, those sequences (1 and 2) are
    recomputed sequentially (counted per (sequence, channel)), and their
    answer (and gradient) is the sequential kernel's, bit for bit. Sequence 0 has r ~ 0
    (x = -10): it converges at once and keeps Newton's answer."""
    cell = logistic
    dtype = DTYPES[dtype_name]
    Bc, T, D = 3, 200, 4
    g = torch.Generator().manual_seed(3)
    x = torch.full((Bc, T, D), 10.0, dtype=torch.float64)
    x[0] = -10.0
    h0 = {"h": (0.2 + 0.6 * torch.rand(Bc, D, dtype=torch.float64, generator=g)).to(dtype)}
    xs = {"x": x.to(dtype)}
    before = cell.stats.fallback_sequences
    seq_out, seq_grads = run(cell, cast(xs, dtype, True), {}, cast(h0, dtype, True),
                             {"h": torch.ones(Bc, T, D)}, method="sequential", backend="cpu")
    new_out, new_grads = run(cell, cast(xs, dtype, True), {}, cast(h0, dtype, True),
                             {"h": torch.ones(Bc, T, D)}, method="newton", backend="cpu",
                             iterations=3)
    assert cell.stats.last == {"iterations": 3 + DAMPED_STEPS,
                               "fallback_sequences": (Bc - 1) * D, "histogram": [0, D]}
    assert cell.stats.fallback_sequences == before + (Bc - 1) * D
    assert torch.equal(new_out[0][1:], seq_out[0][1:])
    for a, b in zip(new_grads, seq_grads, strict=True):
        assert torch.equal(a[1:], b[1:])
    assert rel_err(new_out[0][0], seq_out[0][0]) <= bound(dtype, T)
    # sequences 1 and 2 really are chaotic: a perturbation of h0 by ~1 ulp grows to O(1)
    bumped = {"h": h0["h"] * (1 + 4 * torch.finfo(dtype).eps)}
    other = cell.apply(xs, {}, bumped, method="sequential", backend="cpu")["h"]
    assert (other[1:, -1] - seq_out[0][1:, -1]).abs().max() > 0.1


# -- robustness --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SHIPPED)
def test_nan_in_one_sequence_stays_there(name, method):
    cell = shipped(name)
    T, D = 150, 6
    dtype = torch.float32
    xs, ps, h0 = make_case(cell, B, T, D, dtype, seed=5)
    g = torch.Generator().manual_seed(9)
    cots = {n: torch.randn(B, T, D, generator=g) for n in names_out(cell)}
    clean_out, clean_grads = run(cell, cast(xs, dtype, True), cast(ps, dtype, True),
                                 cast(h0, dtype, True), cots, method=method, backend="cpu")
    bad = cast(xs, dtype)
    bad[cell.inputs[0]][1, 40, 2] = math.nan
    out, grads = run(cell, cast(bad, dtype, True), cast(ps, dtype, True),
                     cast(h0, dtype, True), cots, method=method, backend="cpu")
    others = [0, 2]
    per_sequence = grads[:len(xs)] + grads[len(xs) + len(ps):]  # inputs and h0
    clean_per_sequence = clean_grads[:len(xs)] + clean_grads[len(xs) + len(ps):]
    for a, b in zip(out + per_sequence, clean_out + clean_per_sequence, strict=True):
        assert torch.isfinite(a[others]).all()
        if method == "sequential":
            assert torch.equal(a[others], b[others])
        else:  # more Newton iterations for the others while the NaN sequence fails
            assert rel_err(a[others], b[others]) <= bound(dtype, T)
    # the NaN sequence is untouched before the NaN
    for a, b in zip(out, clean_out, strict=True):
        assert rel_err(a[1, :40], b[1, :40]) <= bound(dtype, T)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SHIPPED)
def test_h0_default_is_zeros(name, method):
    cell = shipped(name)
    T, D = 40, 5
    xs = make_inputs(cell, B, T, D, torch.float64)
    ps = make_params(cell, D, torch.float64)
    zeros = {n: torch.zeros(B, D, dtype=torch.float64) for n in cell.states}
    none = cell.apply(xs, ps, None, method=method, backend="cpu")
    empty = cell.apply(xs, ps, {}, method=method, backend="cpu")
    explicit = cell.apply(xs, ps, zeros, method=method, backend="cpu")
    for n in names_out(cell):
        assert torch.equal(none[n], explicit[n])
        assert torch.equal(empty[n], explicit[n])
    if len(cell.states) > 1:  # a partial h0: the missing states start at zero
        h0 = make_h0(cell, B, D, torch.float64)
        first = cell.states[0]
        partial = cell.apply(xs, ps, {first: h0[first]}, method=method, backend="cpu")
        full = cell.apply(xs, ps, {**zeros, first: h0[first]}, method=method, backend="cpu")
        for n in names_out(cell):
            assert torch.equal(partial[n], full[n])


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SHIPPED)
def test_half_precision_computed_in_float32(name, method, half):
    cell = shipped(name)
    T, D = 20, 5
    xs, ps, h0 = (cast(d, half) for d in make_case(cell, B, T, D, torch.float32, seed=4))
    g = torch.Generator().manual_seed(1)
    cots = {n: torch.randn(B, T, D, generator=g).to(half) for n in names_out(cell)}
    out, grads = run(cell, cast(xs, half, True), cast(ps, half, True), cast(h0, half, True),
                     cots, method=method, backend="cpu")
    f32_out, f32_grads = run(cell, cast(xs, torch.float32, True), cast(ps, torch.float32, True),
                             cast(h0, torch.float32, True), cast(cots, torch.float32),
                             method=method, backend="cpu")
    for a, b in zip(out, f32_out, strict=True):
        assert a.dtype == half
        assert torch.equal(a, b.to(half))
    for a, b, leaf in zip(grads, f32_grads, leaves(xs, ps, h0), strict=True):
        assert a.dtype == half and a.shape == leaf.shape
        assert torch.equal(a, b.to(half))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SHIPPED)
def test_empty_sequence(name, dtype, backend):
    cell = shipped(name)
    D = 4
    xs, ps, h0 = make_case(cell, 2, 0, D, dtype)
    for method in METHODS:
        out = cell.apply(xs, ps, h0, method=method, backend=backend)
        assert list(out) == names_out(cell)
        for t in out.values():
            assert t.shape == (2, 0, D) and t.dtype == dtype


# -- torch integration -------------------------------------------------------------------------

OPCHECK_CELLS = ["paragru", "paralstm", "coupled3", "elman", "mingru"]


def op_args(cell, dtype=torch.float64, T=9, D=3, requires_grad=True):
    xs, ps, h0 = make_case(cell, 2, T, D, dtype, seed=2, requires_grad=requires_grad)
    return ([h0[n] for n in cell.states], [xs[n] for n in cell.inputs],
            [ps[n] for n in cell.params])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", OPCHECK_CELLS)
def test_opcheck_forward(name, method):
    cell = shipped(name)
    h0, xs, ps = op_args(cell)
    torch.library.opcheck(cell._forward_op,
                          (h0, xs, ps, method, "cpu", 5, default_tol("float64")))


@pytest.mark.parametrize("name", OPCHECK_CELLS)
def test_opcheck_backward(name):
    cell = shipped(name)
    h0, xs, ps = op_args(cell, requires_grad=False)
    ss = cell._forward_op(h0, xs, ps, "sequential", "cpu", 5, 1e-12)[:len(cell.states)]
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(s.shape, dtype=s.dtype, generator=g) for s in ss]
    gy = [torch.randn(ss[0].shape, dtype=ss[0].dtype, generator=g) for _ in cell.outputs]
    torch.library.opcheck(cell._backward_op, (gs, gy, h0, xs, ps, ss, "cpu"))


@pytest.fixture
def ops_only(monkeypatch):
    """Every call through the custom ops, as under a tracer (`_runtime._plain_eager`)."""
    monkeypatch.setattr(_runtime, "_plain_eager", lambda tensors: False)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["paragru", "paralstm", "coupled3", "elman"])
def test_gradcheck(name, method, path, request):
    if path == "ops":
        request.getfixturevalue("ops_only")
    cell = shipped(name)
    h0, xs, ps = op_args(cell, T=6, D=3)
    nh, nx = len(h0), len(xs)

    def f(*args):
        hh, xx, pp = args[:nh], args[nh:nh + nx], args[nh + nx:]
        out = cell.apply(dict(zip(cell.inputs, xx, strict=True)),
                         dict(zip(cell.params, pp, strict=True)),
                         dict(zip(cell.states, hh, strict=True)),
                         method=method, backend="cpu", iterations=50)
        return tuple(out.values())

    assert torch.autograd.gradcheck(f, (*h0, *xs, *ps))


def _outputs_and_grads(cell, method: str):
    h0, xs, ps = op_args(cell, T=40, D=5)
    ps = [torch.nn.Parameter(p) for p in ps]  # as a layer passes them
    out = cell.apply(dict(zip(cell.inputs, xs, strict=True)),
                     dict(zip(cell.params, ps, strict=True)),
                     dict(zip(cell.states, h0, strict=True)), method=method, backend="cpu")
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(v.shape, dtype=v.dtype, generator=g) for v in out.values()]
    grads = torch.autograd.grad(list(out.values()), [*h0, *xs, *ps], cot)
    return out, grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", OPCHECK_CELLS)
def test_eager_call_equals_the_ops(name, method, monkeypatch):
    """Plain eager calls skip the custom ops' wrappers (`_runtime._EagerCall`); both paths run
    the same kernels, so outputs and all gradients are bitwise equal."""
    cell = shipped(name)
    out, grads = _outputs_and_grads(cell, method)
    assert type(next(iter(out.values())).grad_fn).__name__ == "_EagerCallBackward"
    monkeypatch.setattr(_runtime, "_plain_eager", lambda tensors: False)
    out_ops, grads_ops = _outputs_and_grads(cell, method)
    assert "_EagerCall" not in type(next(iter(out_ops.values())).grad_fn).__name__
    assert list(out) == list(out_ops)
    for a, b in zip([*out.values(), *grads], [*out_ops.values(), *grads_ops], strict=True):
        assert torch.equal(a, b)


def test_tracers_see_the_ops():
    """Under a tracer the kernels must run as custom ops, or the trace would hold their
    results as constants: `_plain_eager` is False under FakeTensorMode, any dispatch mode,
    for tensor subclasses and meta tensors; make_fx (real tensors, a proxy dispatch mode)
    records the ops, and its graph recomputes on new inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        pass

    x = torch.ones(2, 3, 4)
    assert _runtime._plain_eager([x, torch.nn.Parameter(x)])
    assert not _runtime._plain_eager([x.as_subclass(Subclass)])
    assert not _runtime._plain_eager([x, x.to("meta")])
    with Passthrough():
        assert not _runtime._plain_eager([x])
    with FakeTensorMode():
        assert not _runtime._plain_eager([torch.ones(2)])

    cell = shipped("paragru")
    h0, xs, ps = op_args(cell, T=7, D=3, requires_grad=False)

    def f(*xx):
        out = cell.apply(dict(zip(cell.inputs, xx, strict=True)),
                         dict(zip(cell.params, ps, strict=True)), method="sequential",
                         backend="cpu")
        return out[cell.states[0]]

    graph = make_fx(f)(*xs)
    assert "paracompile" in str(graph.graph)
    other = [2 * x for x in xs]
    assert torch.equal(graph(*other), f(*other))


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_no_double_backward(path, request):
    """The compiled backward is not differentiable again: a second derivative through it is
    an error on both paths, never a silently wrong (constant) result."""
    if path == "ops":
        request.getfixturevalue("ops_only")
    cell = shipped("paragru")
    h0, xs, ps = op_args(cell, T=5, D=3)
    out = cell.apply(dict(zip(cell.inputs, xs, strict=True)),
                     dict(zip(cell.params, ps, strict=True)), method="sequential",
                     backend="cpu")
    (g,) = torch.autograd.grad(out[cell.states[0]].square().sum(), [xs[0]], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), [xs[0]])


# inductor imports torch.utils.mkldnn, whose torch.jit.script_method use warns (torch's own
# deprecation, not ours; the suite turns warnings into errors)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["paralstm", "coupled3"])
def test_torch_compile_fullgraph(name):
    cell = shipped(name)
    h0, xs, ps = op_args(cell, T=30, D=4)
    nh, nx = len(h0), len(xs)

    def f(*args):
        hh, xx, pp = args[:nh], args[nh:nh + nx], args[nh + nx:]
        out = cell.apply(dict(zip(cell.inputs, xx, strict=True)),
                         dict(zip(cell.params, pp, strict=True)),
                         dict(zip(cell.states, hh, strict=True)),
                         method="newton", backend="cpu")
        return sum((v * v).sum() for v in out.values()), out[cell.states[-1]]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    args = [*h0, *xs, *ps]
    loss_c, last_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e, last_e = f(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    assert rel_err(last_c, last_e) <= 1e-13
    assert max_rel_err(grads_c, grads_e) <= 1e-13
    # dynamic shapes: another T reuses the graph (no recompilation), still without breaks
    h1, x1, p1 = op_args(cell, T=17, D=4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_c, _ = compiled(*h1, *x1, *p1)
    loss_e, _ = f(*h1, *x1, *p1)
    assert rel_err(loss_c, loss_e) <= 1e-13

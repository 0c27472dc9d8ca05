"""Regressions of the run-time (issue 8): strided arguments, Newton's convergence test on tiny
states, argument types, B = 0, `cell.stats` under threads, the torch backend's Newton cap, and
fork safety.

The CUDA-simulator cases run in one subprocess (``NUMBA_ENABLE_CUDASIM=1`` must be set before
numba.cuda is imported, and the rest of the suite imports it normally): this file run as a
script prints their results as JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest and paracompile, also as a script

from conftest import CELLS_DIR, make_case, max_rel_err, shipped  # noqa: E402

import paracompile  # noqa: E402
from paracompile._defaults import DAMPED_STEPS, default_tol  # noqa: E402

# h' = tanh(0.99 h + x) with x ~ 1e-8: the states stay around 1e-7, so a residual scaled by
# 1 + |h| accepts the initial guess f(0, x_t) = tanh(x_t), which is 99% off.
TINY_CELL = """\
cell Tiny
state h
input x
h' = tanh(0.99 * h + x)
"""


def tiny_cell():
    return paracompile.load(TINY_CELL)


# -- 1. non-contiguous inputs, h0 and params ---------------------------------------------------

def strided_case(cell, layout: str, B: int = 3, T: int = 7, D: int = 4,
                 dtype: torch.dtype = torch.float64):
    """(leaves, inputs, params, h0): the arguments are views of the leaves with `layout`
    "transposed" (x from (T, B, D)), "sliced" (x[:, ::2] of (B, 2T, D)) or "expanded" (h0 and
    the first param expanded from one value per channel / a scalar)."""
    xs, ps, h0 = make_case(cell, B, T, D, dtype)
    g = torch.Generator().manual_seed(5)
    leaves: dict[str, torch.Tensor] = {}
    inputs, params, states = {}, {}, {}
    for n, x in xs.items():
        if layout == "transposed":
            base = x.transpose(0, 1).contiguous().requires_grad_()
            inputs[n] = base.transpose(0, 1)
        elif layout == "sliced":
            base = torch.randn(B, 2 * T, D, dtype=dtype, generator=g).requires_grad_()
            inputs[n] = base[:, ::2]
        else:
            base = x.clone().requires_grad_()
            inputs[n] = base
        leaves[f"x.{n}"] = base
    for i, (n, p) in enumerate(ps.items()):
        base = p.clone().requires_grad_()
        if layout == "expanded" and i == 0 and cell.params[n] == "vector":
            base = torch.tensor(0.3, dtype=dtype, requires_grad=True)
            params[n] = base.expand(D)
        elif layout == "transposed" and cell.params[n] == "matrix":
            base = p.t().contiguous().requires_grad_()
            params[n] = base.t()
        else:
            params[n] = base
        leaves[f"p.{n}"] = base
    for n, h in h0.items():
        if layout == "expanded":
            base = h[0].clone().requires_grad_()
            states[n] = base.expand(B, D)
        elif layout == "transposed":
            base = h.t().contiguous().requires_grad_()
            states[n] = base.t()
        else:
            base = h[:, :].clone().requires_grad_()
            states[n] = base
        leaves[f"h0.{n}"] = base
    assert layout == "sliced" or not all(t.is_contiguous() for t in
                                         [*inputs.values(), *states.values()])
    return leaves, inputs, params, states


def outputs_and_grads(cell, case, **kw) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    leaves, inputs, params, h0 = case
    out = cell.apply(inputs, params, h0, **kw)
    weights = {n: torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
               for n, o in out.items()}
    loss = sum((o * weights[n]).sum() for n, o in out.items())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return list(out.values()), dict(zip(leaves, grads, strict=True))


def strided_errors(cell, layout: str, backend: str, method: str) -> tuple[float, dict]:
    """Outputs and every gradient of `backend`/`method` against autograd through the torch
    reference loop, on the same strided arguments."""
    case = strided_case(cell, layout)
    ref_out, ref_g = outputs_and_grads(cell, case, backend="torch", method="sequential")
    out, g = outputs_and_grads(cell, case, backend=backend, method=method)
    return (max_rel_err(out, ref_out),
            {n: max_rel_err([g[n]], [ref_g[n]]) for n in ref_g})


LAYOUTS = ("transposed", "sliced", "expanded")


# (dense elman with the torch Newton: its full Jacobian costs D JVPs, covered by test_reference)
STRIDED = [(name, backend, method) for name in ("paragru", "paralstm", "elman")
           for backend, method in (("cpu", "sequential"), ("cpu", "newton"), ("torch", "newton"))
           if (name, backend) != ("elman", "torch")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,backend,method", STRIDED)
def test_strided_arguments(name, backend, method, layout):
    err, gerr = strided_errors(shipped(name), layout, backend, method)
    assert err < 1e-12, err
    assert max(gerr.values()) < 1e-11, gerr


# -- 2. Newton's convergence test is relative per channel --------------------------------------

def tiny_case(B: int = 2, T: int = 64, D: int = 3, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    x = 1e-8 * torch.randn(B, T, D, dtype=torch.float64, generator=g)
    x[:, :, 0] = 0.0  # an all-zero channel: converges at once (the scale floor)
    return {"x": x.to(dtype)}, {}, {"h": torch.zeros(B, D, dtype=dtype)}


def per_channel_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over (sequence, channel) of max_t |a - b| / max_t |b| (0/0 = 0)."""
    a, b = a.double(), b.double()
    num = (a - b).abs().amax(dim=1)
    den = b.abs().amax(dim=1)
    assert bool((num[den == 0] == 0).all())
    return float((num[den > 0] / den[den > 0]).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_newton_tiny_states_relative_accuracy(backend, dtype):
    """newton == sequential to relative accuracy per channel, also where states are ~1e-7.
    The error bound: tol * max_t |h| amplified by at most 1 / (1 - 0.99) = 100 here."""
    cell = tiny_cell()
    xs, ps, h0 = tiny_case(dtype=dtype)
    seq = cell.apply(xs, ps, h0, method="sequential", backend=backend)["h"]
    new = cell.apply(xs, ps, h0, method="newton", backend=backend)["h"]
    assert float(seq[:, :, 1:].abs().max()) < 1e-5  # the states are tiny ...
    # ... and still accurate relative to their size
    assert per_channel_rel_err(new, seq) <= 100 * default_tol(dtype)
    assert cell.stats.calls == 1


def test_residual_is_relative_per_channel():
    """The reference's residual (the quantity bounded by tol) scales with each channel."""
    from paracompile import _reference as R

    cell = tiny_cell()
    xs, ps, h0 = tiny_case(dtype=torch.float64)
    seq, _ = R.sequential(cell._torch_step, (h0["h"],), (xs["x"],), ())
    guess = torch.tanh(xs["x"])  # Newton's initial guess: f(0, x_t)
    assert R.residual(cell._torch_step, (h0["h"],), (xs["x"],), (), (guess,)) > 0.5
    assert R.residual(cell._torch_step, (h0["h"],), (xs["x"],), (), seq) < 1e-15


@pytest.mark.parametrize("dtype,iterations", [(torch.float32, 5), (torch.float64, 7)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_well_behaved_cells_converge_without_fallback(name, backend, dtype, iterations):
    """The relative test does not force channels whose states cross zero to fall back."""
    cell = paracompile.load(CELLS_DIR / f"{name}.cell")
    for B, T, seed in ((2, 64, 0), (3, 150, 1), (4, 300, 2)):
        xs, ps, h0 = make_case(cell, B, T, 8, dtype, seed=seed)
        cell.apply(xs, ps, h0, method="newton", backend=backend, iterations=iterations)
        assert cell.stats.last["fallback_sequences"] == 0, (B, T, cell.stats.last)
        assert cell.stats.last["iterations"] <= iterations - 1, (B, T, cell.stats.last)


# -- 3. API: B = 0, argument types, stats under threads, the torch backend's cap ---------------

@pytest.mark.parametrize("method", ["newton", "sequential"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_empty_batch(backend, method):
    cell = shipped("paralstm")
    xs, ps, h0 = make_case(cell, 0, 5, 3, requires_grad=True)
    out = cell.apply(xs, ps, h0, method=method, backend=backend)
    assert {n: tuple(o.shape) for n, o in out.items()} == {n: (0, 5, 3) for n in out}
    loss = sum(o.sum() for o in out.values())
    grads = torch.autograd.grad(loss, [*xs.values(), *ps.values()], allow_unused=True)
    assert all(g is None or not bool(g.abs().sum()) for g in grads)


@pytest.mark.parametrize("kw,arg", [({"tol": "1e-3"}, "tol"), ({"tol": True}, "tol"),
                                    ({"iterations": True}, "iterations"),
                                    ({"iterations": 2.5}, "iterations"),
                                    ({"iterations": "3"}, "iterations")])
def test_bad_argument_types(kw, arg):
    cell = shipped("paragru")
    xs, ps, h0 = make_case(cell, 1, 4, 2)
    for backend in ("cpu", "torch"):
        with pytest.raises(TypeError, match=arg):
            cell.apply(xs, ps, h0, method="newton", backend=backend, **kw)


@pytest.mark.parametrize("warm", [False, True])
def test_stats_under_concurrent_apply(warm):
    """Several threads apply two cell objects with the same key (and one object from two
    threads): each object counts exactly its own calls. iterations=0 makes every sequence
    fall back, so each call's count is its number of (sequence, channel) pairs. Cold: the
    threads' first calls also import the kernels' module concurrently."""
    first = paracompile.load(CELLS_DIR / "paragru.cell")
    second = paracompile.load(CELLS_DIR / "paragru.cell")
    assert first.key == second.key
    if warm:
        xs, ps, h0 = make_case(first, 1, 6, 2)
        first.apply(xs, ps, h0, method="newton", backend="cpu", iterations=0)
        first.stats = type(first.stats)()
    calls = 60
    D = 2
    jobs = [(first, 1), (first, 2), (second, 3), (second, 4)]
    errors: list[BaseException] = []

    def work(cell, B):
        try:
            xs, ps, h0 = make_case(cell, B, 6, D)
            for _ in range(calls):
                cell.apply(xs, ps, h0, method="newton", backend="cpu", iterations=0)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: interleave the calls' Python steps
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert (first.stats.calls, second.stats.calls) == (2 * calls, 2 * calls)
    assert first.stats.fallback_sequences == calls * (1 + 2) * D
    assert second.stats.fallback_sequences == calls * (3 + 4) * D
    assert first.stats.iterations == second.stats.iterations == 0


def test_torch_backend_newton_is_capped_and_counted():
    """The torch backend's Newton stops at `iterations` (+ the damped steps) like the compiled
    backends: the unconverged sequences are recomputed by the loop and counted in
    cell.stats."""
    cell = paracompile.load(CELLS_DIR / "paragru.cell")
    xs, ps, h0 = make_case(cell, 3, 50, 4)
    seq = cell.apply(xs, ps, h0, method="sequential", backend="torch")
    new = cell.apply(xs, ps, h0, method="newton", backend="torch", iterations=0)
    assert cell.stats.last == {"iterations": 0, "fallback_sequences": 3, "histogram": []}
    assert cell.stats.calls == 1
    assert max_rel_err(new.values(), seq.values()) < 1e-15
    new = cell.apply(xs, ps, h0, method="newton", backend="torch", iterations=1)
    last = cell.stats.last
    assert last["iterations"] <= 1 + DAMPED_STEPS
    assert sum(last["histogram"]) + last["fallback_sequences"] == 3
    assert max_rel_err(new.values(), seq.values()) < 1e-12
    cell.apply(xs, ps, h0, method="newton", backend="torch", iterations=8)
    assert cell.stats.last["fallback_sequences"] == 0 and cell.stats.last["iterations"] <= 8


# -- 4. fork safety ----------------------------------------------------------------------------

FORK_SCRIPT = """
import multiprocessing as mp, os, sys
import torch
import paracompile
cell = paracompile.load({cell!r})
def run(_=None):
    g = torch.Generator().manual_seed(0)
    x = {{"x_z": torch.randn(2, 9, 3, generator=g), "x_r": torch.randn(2, 9, 3, generator=g),
          "x_h": torch.randn(2, 9, 3, generator=g)}}
    p = {{n: 0.5 * torch.randn(3, generator=g) for n in cell.params}}
    return cell.apply(x, p, backend="cpu")["h"]
def in_child(q):
    try:
        q.put(("ok", float((run() - run()).abs().max())))
    except RuntimeError as e:
        q.put(("error", str(e)))
if __name__ == "__main__":
    expected = run()
    import numba
    from numba.np.ufunc import omppool
    layer = numba.threading_layer()
    unsafe = layer == "omp" and omppool.openmp_vendor == "GNU"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=in_child, args=(q,))
    proc.start()
    status, detail = q.get(timeout=120)
    proc.join()
    with mp.get_context("spawn").Pool(1) as pool:
        spawned = pool.apply(run)
    print(layer, unsafe, status, proc.exitcode, float((spawned - expected).abs().max()))
    print(detail)
"""


def test_fork_after_kernels_ran(tmp_path):
    """A child fork()ed after CPU kernels ran: with a fork-safe layer (tbb) it computes; with
    GNU OpenMP it gets a clear RuntimeError (not a SIGTERM). 'spawn' always works."""
    script = tmp_path / "fork_case.py"
    script.write_text(FORK_SCRIPT.format(cell=str(CELLS_DIR / "paragru.cell")))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, detail = proc.stdout.strip().splitlines()[-2:]
    layer, unsafe, status, exitcode, spawn_err = summary.split()
    assert exitcode == "0" and float(spawn_err) == 0.0, proc.stdout
    if unsafe == "True":
        assert status == "error" and "spawn" in detail and "tbb" in detail, detail
    else:
        assert status == "ok" and float(detail) == 0.0, (layer, detail)


# -- the CUDA simulator ------------------------------------------------------------------------

def cudasim_cases() -> dict[str, float]:
    """Run in a subprocess with NUMBA_ENABLE_CUDASIM=1 (see the module docstring)."""
    results: dict[str, float] = {}
    # every layout once per cell, the methods alternating: the views are made in the
    # launcher's argument handling, which both methods (and the one backward kernel) share
    for offset, name in enumerate(("paragru", "paralstm")):
        cell = shipped(name)
        for i, layout in enumerate(LAYOUTS):
            method = ("sequential", "newton")[(i + offset) % 2]
            err, gerr = strided_errors(cell, layout, "cuda", method)
            results[f"strided {name} {layout} {method} out"] = err
            results[f"strided {name} {layout} {method} grad"] = max(gerr.values())
    cell = tiny_cell()
    for dtype in (torch.float32, torch.float64):
        xs, ps, h0 = tiny_case(B=2, T=40, D=2, dtype=dtype)
        seq = cell.apply(xs, ps, h0, method="sequential", backend="cuda")["h"]
        new = cell.apply(xs, ps, h0, method="newton", backend="cuda")["h"]
        results[f"tiny {dtype}"] = per_channel_rel_err(new, seq) / default_tol(dtype)
    cell = shipped("paragru")
    xs, ps, h0 = make_case(cell, 0, 5, 3, requires_grad=True)
    out = cell.apply(xs, ps, h0, method="newton", backend="cuda")
    results["empty shape ok"] = float(all(o.shape == (0, 5, 3) for o in out.values()))
    return results


@pytest.fixture(scope="module")
def cudasim_results(tmp_path_factory) -> dict[str, float]:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PARACOMPILE_CACHE_DIR=str(tmp_path_factory.mktemp("cudasim-cache")))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True,
                          text=True, timeout=900, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.cudasim
def test_cudasim_strided_tiny_and_empty(cudasim_results):
    res = cudasim_results
    bad = {k: v for k, v in res.items() if k.startswith("strided") and not v < 1e-11}
    assert not bad, bad
    # the error of newton relative to each channel's size, in units of tol (<= 1 / (1 - 0.99))
    assert res["tiny torch.float32"] <= 100 and res["tiny torch.float64"] <= 100, res
    assert res["empty shape ok"] == 1.0
    assert all(not math.isnan(v) for v in res.values())


if __name__ == "__main__":
    print(json.dumps(cudasim_cases()))

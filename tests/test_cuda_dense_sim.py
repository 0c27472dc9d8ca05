"""The CUDA kernels of dense cells (`cuda_dense.py.jinja`, launcher `_cuda_dense`): outputs,
final states and every gradient (inputs, vector/scalar/matrix params, h0) in numba's CUDA
simulator against the pure-torch reference (a sequential torch loop with autograd); the
method="newton" refusal; the routing of backend/method "auto"; the PTX of both kernels.

``NUMBA_ENABLE_CUDASIM=1`` must be set before numba.cuda is imported, so the simulator cases
run in one subprocess: this file run as a script (cases as JSON on stdin, results as JSON on
stdout). Sizes are tiny: the simulator runs every CUDA thread as a Python thread.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import paracompile
from paracompile import _cpu, _cuda_dense, _defaults, _ptx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# two states, two matrices, three products (W twice, once on a state product h * c), a
# vector and a scalar param, an output that reads a primed state
MIX = """\
cell DenseMix
state h, c
input x, g
param W : matrix
param V : matrix
param a
param s : scalar
z = sigmoid(V @ c + g)
h' = z * tanh(W @ h + a * x) + (1 - z) * h
c' = 0.5 * c + s * tanh(W @ (h * c) + x)
output y = h' * c
"""

CASES = [
    dict(name="elman_f64", cell="elman", dtype="float64", B=2, T=7, D=5),
    dict(name="elman_f32", cell="elman", dtype="float32", B=2, T=9, D=8),
    dict(name="elman_f64_T1", cell="elman", dtype="float64", B=2, T=1, D=3),
    dict(name="mix_f64", cell="mix", dtype="float64", B=2, T=12, D=5),
    dict(name="mix_f32", cell="mix", dtype="float32", B=2, T=20, D=8),
    # fewer threads than channels: each thread loops over its channels (3 of 7 own 3, 3, 1)
    dict(name="mix_f64_3threads", cell="mix", dtype="float64", B=2, T=9, D=7, threads=3),
    dict(name="elman_f32_1thread", cell="elman", dtype="float32", B=2, T=8, D=6, threads=1),
]

# max |a - b| / (1 + max |b|) against a float64 reference on the same (rounded) data
TOLERANCE = {"float64": 1e-12, "float32": 2e-6}


def _load(name: str):
    return paracompile.load(MIX if name == "mix" else ROOT / "cells" / f"{name}.cell")


# -- the subprocess (NUMBA_ENABLE_CUDASIM=1) ------------------------------------------------------

def _data(cell, B: int, T: int, D: int):
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    xs = {n: torch.randn(B, T, D, dtype=torch.float64, generator=gen) for n in cell.inputs}
    ps = {}
    for n, kind in cell.params.items():
        shape = {"matrix": (D, D), "vector": (D,), "scalar": ()}[kind]
        scale = 0.3 / D ** 0.5 if kind == "matrix" else 0.5  # W @ h contracts
        ps[n] = scale * torch.randn(shape, dtype=torch.float64, generator=gen)
    h0 = {n: 0.5 * torch.randn(B, D, dtype=torch.float64, generator=gen) for n in cell.states}
    cot = {n: torch.randn(B, T, D, dtype=torch.float64, generator=gen)
           for n in cell.states + cell.outputs}
    return xs, ps, h0, cot


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / (1 + b.abs().max()))


def _run_case(case: dict) -> dict:
    from paracompile import _cuda_dense as launcher

    cell = _load(case["cell"])
    dtype = getattr(torch, case["dtype"])
    xs, ps, h0, cot = _data(cell, case["B"], case["T"], case["D"])
    names = [f"inputs[{n}]" for n in xs] + [f"params[{n}]" for n in ps] + [f"h0[{n}]"
                                                                          for n in h0]

    def leaves(t: torch.dtype):
        return [{n: v.to(t).requires_grad_() for n, v in d.items()} for d in (xs, ps, h0)]

    ref_leaves = leaves(torch.float64)
    ref = cell.apply(*ref_leaves, method="sequential", backend="torch")
    flat_ref = [v for d in ref_leaves for v in d.values()]
    g_ref = torch.autograd.grad(sum((ref[n] * cot[n]).sum() for n in ref), flat_ref)

    run = leaves(dtype)
    flat = [v for d in run for v in d.values()]
    result: dict = {"name": case["name"]}
    if case.get("threads") is None:
        out = cell.apply(*run, method="auto", backend="cuda")
        g = torch.autograd.grad(sum((out[n] * cot[n].to(dtype)).sum() for n in out), flat)
        result["newton_calls"] = cell.stats.calls  # "auto" must not have run Newton
    else:  # the launcher itself, with a thread count below D
        module = cell._module("cudasim", dtype)
        x_in, p_in, h_in = ([d[n] for n in order] for d, order in
                            zip(run, (cell.inputs, cell.params, cell.states), strict=True))
        states, outputs, stats = launcher.forward(module, h_in, x_in, p_in,
                                                  threads=case["threads"])
        result["stats_method"] = stats.method
        out = dict(zip(cell.states + cell.outputs, states + outputs, strict=True))
        g_h0, g_x, g_p = launcher.backward(
            module, [cot[n].to(dtype) for n in cell.states],
            [cot[n].to(dtype) for n in cell.outputs], h_in, x_in, p_in, states,
            threads=case["threads"])
        g = [*g_x, *g_p, *g_h0]
    result["out"] = {n: _err(out[n], ref[n]) for n in ref}
    result["final"] = {n: _err(out[n][:, -1], ref[n][:, -1]) for n in cell.states}
    result["grad"] = {name: _err(a, b) for name, a, b in zip(names, g, g_ref, strict=True)}
    result["dtypes"] = sorted({str(v.dtype) for v in [*out.values(), *g]})
    return result


def _main() -> None:
    results = []
    for case in json.load(sys.stdin):
        try:
            results.append(_run_case(case))
        except Exception as exc:  # reported per case by the parametrized test
            results.append({"name": case["name"], "error": f"{type(exc).__name__}: {exc}"})
    json.dump(results, sys.stdout)


# -- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_results(tmp_path_factory) -> dict[str, dict]:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONWARNINGS="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], cwd=str(ROOT), env=env,
                          input=json.dumps(CASES), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in json.loads(proc.stdout)}


@pytest.mark.cudasim
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dense_cuda_kernels_match_the_reference(sim_results, case):
    r = sim_results[case["name"]]
    assert "error" not in r, r.get("error")
    tol = TOLERANCE[case["dtype"]]
    cell = _load(case["cell"])
    assert set(r["out"]) == set(cell.states + cell.outputs)
    for kind in ("out", "final", "grad"):
        bad = {n: e for n, e in r[kind].items() if not e <= tol}
        assert not bad, f"{kind} differ: {bad}"
    # every leaf has a gradient: inputs, every param (the matrices too) and every h0
    assert len(r["grad"]) == len(cell.inputs) + len(cell.params) + len(cell.states)
    assert r["dtypes"] == [f"torch.{case['dtype']}"]
    if case.get("threads") is None:
        assert r["newton_calls"] == 0
    else:
        assert r["stats_method"] == "sequential"


def test_newton_on_cuda_is_refused_for_dense_cells(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # only the backend check reads it here
    cell = _load("elman")
    B, T, D = 2, 4, 3
    inputs = {"x": torch.randn(B, T, D)}
    params = {"W": torch.randn(D, D), "b": torch.randn(D)}
    with pytest.raises(ValueError, match=r"method='newton' is not available .* dense.*"
                                         r"method='sequential'"):
        cell.apply(inputs, params, method="newton", backend="cuda")
    # the launcher refuses it too, before it looks at its module
    with pytest.raises(ValueError, match="method='newton'"):
        _cuda_dense.forward(None, [torch.zeros(B, D)], [inputs["x"]], list(params.values()),
                            method="newton")
    # Newton on the CPU and in the reference stays available
    out = cell.apply(inputs, params, method="newton", backend="torch")
    assert out["h"].shape == (B, T, D)


def test_auto_runs_dense_cells_sequentially_on_cuda():
    assert _defaults.auto_backend(on_cuda=True, dense=True) == "cuda"
    assert _defaults.resolve_method("auto", "cuda", dense=True) == "sequential"
    assert _defaults.resolve_method("auto", "cuda", dense=False) == "newton"


def test_too_many_channels_is_a_clear_error():
    module = SimpleNamespace(CUDA_DENSE=True, CUDA_DTYPE="float32", CUDA_MAX_D=4, CUDA_Q=1,
                             CUDA_N_MATRICES=1)
    D = 5
    with pytest.raises(ValueError, match=r"D = 5 channels.* at most 4 channels"):
        _cuda_dense.forward(module, [torch.zeros(1, D)], [torch.zeros(1, 2, D)],
                            [torch.zeros(D, D), torch.zeros(D)])


def test_the_shared_memory_limit_fits_a_block():
    for cell, products in (("elman", 1), ("mix", 3)):
        for dtype, size in (("float32", 4), ("float64", 8)):
            source = _render(cell, "cudasim", dtype)
            limit = int(source.split("CUDA_MAX_D = ")[1].split("\n")[0])
            # the backward kernel's two shared arrays within 48 KiB of static shared memory
            assert 2 * products * limit * size <= 48 * 1024, (cell, dtype, limit)
            assert limit >= 512, (cell, dtype, limit)


def _render(name: str, target: str, dtype: str) -> str:
    from paracompile._analyse import analyse
    from paracompile._codegen import render
    from paracompile._driver import metadata
    from paracompile._parse import parse_cell

    text = MIX if name == "mix" else (ROOT / "cells" / f"{name}.cell").read_text()
    analysis = analyse(parse_cell(text, "<test>"))
    return render(analysis, target, dtype, metadata(analysis, "test"))


def test_the_launcher_has_the_shared_interface():
    def parameters(fn, extras):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
                if p.name not in extras]

    # (`damping` is the CPU's: the CUDA kernels have no damped phase)
    assert parameters(_cuda_dense.forward, {"threads"}) == parameters(_cpu.forward, {"damping"})
    assert parameters(_cuda_dense.backward, {"threads"}) == parameters(_cpu.backward, set())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["elman", "mix"])
def test_dense_kernels_on_a_gpu(name, dtype):
    """On a real GPU (skipped elsewhere): backend="auto" on CUDA tensors runs these kernels;
    D = 300 is more channels than the default 256 threads of a block."""
    if not torch.cuda.is_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("needs a CUDA GPU (numba.cuda in GPU mode)")
    cell = _load(name)
    xs, ps, h0, cot = _data(cell, 3, 40, 300)
    t = getattr(torch, dtype)
    run = [{n: v.to("cuda", t).requires_grad_() for n, v in d.items()} for d in (xs, ps, h0)]
    ref_leaves = [{n: v.clone().requires_grad_() for n, v in d.items()} for d in (xs, ps, h0)]
    ref = cell.apply(*ref_leaves, method="sequential", backend="torch")
    out = cell.apply(*run)
    assert cell._launcher("cuda") is _cuda_dense
    flat = [v for d in run for v in d.values()]
    flat_ref = [v for d in ref_leaves for v in d.values()]
    g = torch.autograd.grad(sum((out[n] * cot[n].to("cuda", t)).sum() for n in out), flat)
    g_ref = torch.autograd.grad(sum((ref[n] * cot[n]).sum() for n in ref), flat_ref)
    tol = 1e-10 if dtype == "float64" else 2e-5
    for n in ref:
        assert _err(out[n].cpu(), ref[n]) <= tol, n
    for a, b in zip(g, g_ref, strict=True):
        assert _err(a.cpu(), b) <= tol


# -- PTX: both kernels compile for sm_80 and sm_90 without spills ---------------------------------

def _signatures(module) -> dict[str, tuple]:
    """The numba signatures of the dense kernels, as `_cuda_dense` launches them."""
    from numba.cuda import types

    ft = {"float32": types.float32, "float64": types.float64}[module.CUDA_DTYPE]
    a1, i64 = types.Array(ft, 1, "C"), types.int64
    k, m, q, o = module.CUDA_K, module.CUDA_M, module.CUDA_Q, module.CUDA_O
    n_mat, n_prod = module.CUDA_N_MATRICES, len(module.CUDA_MATVEC_MATRIX)
    forward = k + m + q + n_mat + k + o
    backward = k + o + k + m + q + 2 * n_mat + k + k + m + q + 2 * n_prod
    return {"dense_sequential_kernel": (a1,) * forward + (i64,) * 3,
            "dense_backward_kernel": (a1,) * backward + (i64,) * 3}


@pytest.mark.parametrize("name", ["elman", "mix"])
def test_ptx_both_archs_no_spills(name, monkeypatch):
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: compile_ptx is not available in the simulator")
    reason = _ptx.missing_toolchain()
    if reason:
        pytest.skip(reason)
    module = _load(name)._module("cuda", torch.float32)
    # the signatures are the argument lists of the rendered kernels
    for kernel, sig in _signatures(module).items():
        assert len(sig) == len(inspect.signature(getattr(module, kernel).py_func).parameters)
    monkeypatch.setattr(_ptx, "kernel_signatures", _signatures)
    rows = _ptx.ptx_report(module, label=name)
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in module.CUDA_KERNELS for a in ("sm_80", "sm_90")}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, _ptx.format_table(rows)
        assert 0 < r["registers"] <= 128, _ptx.format_table(rows)
        # the operands (and in the backward the products' cotangents) in shared memory
        per_array = len(module.CUDA_MATVEC_MATRIX) * module.CUDA_MAX_D * 4
        assert r["smem"] >= per_array * (2 if r["kernel"] == "dense_backward_kernel" else 1)
        assert r["smem"] <= 48 * 1024, _ptx.format_table(rows)


if __name__ == "__main__":
    _main()

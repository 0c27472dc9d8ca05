"""CUDA kernels in numba's simulator, against a plain torch sequential loop with autograd.

``NUMBA_ENABLE_CUDASIM=1`` must be set before ``numba.cuda`` is first imported, and the rest
of the suite imports it normally, so all simulator cases run in two subprocesses
(``python tests/_cuda_fixtures.py``, cases as JSON on stdin, results as JSON on stdout),
started once per module and run in parallel (the simulator is single-core bound); each case
is then checked by its own parametrized test.  Cases are tiny (B <= 2, D <= 33, T <= 100):
the simulator runs every CUDA thread as a Python thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

F64 = dict(dtype="float64", tol=1e-12)

# chunk/threads are the launcher's knobs: a block is 32 channels x threads / 32 time warps,
# each thread composes `chunk` steps per pass, so a pass covers threads / 32 * chunk steps
# and small values give several passes (the pass carry) on short sequences.
CASES = [
    # 13 passes of 8 steps (T = 100): the last one partial, its second warp's chunk empty
    dict(name="gru_f64_newton_multipass", cell="ParaGRU", B=2, T=100, D=2, threads=64,
         chunk=4, iterations=30, expect_fallback="zero", **F64),
    # D = 33: two channel tiles per batch entry, the second with one live lane of 32
    dict(name="lstm_f64_newton_d33", cell="ParaLSTM", B=1, T=24, D=33, threads=64,
         chunk=4, iterations=30, expect_fallback="zero", **F64),
    # outputs and a scalar param; 3 warps, 4 passes of 12 steps for T = 45 (last: 4, 4, 1)
    dict(name="gruout_f64_newton", cell="GRUOut", B=2, T=45, D=3, threads=96, chunk=4,
         iterations=30, expect_fallback="zero", **F64),
    # channel 1's recurrence is linear: its lane converges after 2 updates and freezes
    # while the other lanes of its block go on (per-lane update counts in the histogram)
    dict(name="gru_f64_early_lane", cell="ParaGRU", B=2, T=40, D=5, threads=64, chunk=4,
         iterations=30, zero_channels=[1], expect_fallback="zero", expect_early=(2, 2),
         **F64),
    # Newton does not converge in 1 iteration: every sequence is rerun sequentially
    dict(name="gru_f64_newton_fallback", cell="ParaGRU", B=2, T=50, D=3, threads=64, chunk=4,
         iterations=1, expect_fallback="all", backward=False, **F64),
    # float32, default launch configuration (T = 70: chunk 8, 9 warps, 1 pass), 3 iterations
    dict(name="gruout_f32_newton_default", cell="GRUOut", dtype="float32", B=2, T=70, D=3,
         expect_fallback="any"),
    dict(name="lstm_f32_newton", cell="ParaLSTM", dtype="float32", B=2, T=37, D=3,
         threads=32, chunk=8, expect_fallback="any"),
    # sequential forward and sequential backward kernels (T = 31: a 3-step last group)
    dict(name="lstm_f64_sequential", cell="ParaLSTM", B=2, T=100, D=3, method="sequential",
         bwd_method="sequential", **F64),
    dict(name="gruout_f64_sequential", cell="GRUOut", B=2, T=31, D=3, method="sequential",
         bwd_method="sequential", **F64),
    # partial last chunk (T = 99, chunk 7: 14 passes, the last of 1 step) where one of the
    # two lanes converges in 3 iterations and the other falls back
    dict(name="lstm_f32_chunk7", cell="ParaLSTM", dtype="float32", B=1, T=99, D=2,
         threads=32, chunk=7, expect_fallback="partial"),
    dict(name="lstm_f64_chunk3", cell="ParaLSTM", B=2, T=100, D=1, threads=64, chunk=3,
         iterations=30, expect_fallback="zero", **F64),
    # no Newton update allowed: the initial guess is checked and every sequence falls back
    dict(name="gruout_f64_iterations0", cell="GRUOut", B=1, T=20, D=2, iterations=0,
         expect_fallback="all", backward=False, **F64),
    # the text rendered for a real GPU (cache=True kernels)
    dict(name="gpu_text_gruout_f32", cell="GRUOut", dtype="float32", B=2, T=45, D=2,
         threads=64, chunk=8, expect_fallback="any", gpu_text=True),
    # T = 1
    dict(name="gru_f64_T1", cell="ParaGRU", B=2, T=1, D=3, iterations=3,
         expect_fallback="zero", **F64),
]

# float32 bounds: errors are max|a - b| / (1 + max|b|) against a float64 reference on the
# same (rounded) data; Newton states are within ~tol (1e-6) of the fixed point.
TOL = {
    "float64": dict(states=1e-10, outputs=1e-10, grads=1e-10),
    "float32": dict(states=1e-5, outputs=1e-5, grads=1e-6),
}


def _split(cases):
    # balance the two subprocesses by a rough cost estimate
    def cost(c):
        return c["B"] * c["D"] * c["T"] * (1 if c.get("method") == "sequential" else 4)

    groups = ([], [])
    loads = [0, 0]
    for c in sorted(cases, key=cost, reverse=True):
        i = loads.index(min(loads))
        groups[i].append(c)
        loads[i] += cost(c)
    return groups


@pytest.fixture(scope="module")
def sim_results(tmp_path_factory):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONWARNINGS="error")
    script = str(HERE / "_cuda_fixtures.py")
    tmp = tmp_path_factory.mktemp("cudasim")
    procs = []
    for i, group in enumerate(_split(CASES)):
        if not group:
            continue
        path = tmp / f"cases{i}.json"
        path.write_text(json.dumps(group))
        with open(path) as stdin:
            procs.append(subprocess.Popen([sys.executable, script], cwd=str(ROOT), env=env,
                                          stdin=stdin, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"simulator subprocess failed:\n{err}"
        for r in json.loads(out):
            results[r["name"]] = r
    return results


@pytest.mark.cudasim
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cuda_simulator(sim_results, case):
    r = sim_results[case["name"]]
    assert "error" not in r, r.get("error")
    tol = TOL[case.get("dtype", "float64")]
    assert r["states_finite"]
    assert r["err_states"] <= tol["states"], r
    assert r["err_outputs"] <= tol["outputs"], r
    info = r["info"]
    ncells = case["B"] * case["D"]
    expect = case.get("expect_fallback")
    if expect == "zero":
        assert info["fallback"] == 0, info
        assert info["residual"] <= case["tol"], info
    elif expect == "all":
        assert info["fallback"] == ncells, info
        assert info["iterations"] == case["iterations"], info
    elif expect == "partial":
        assert 0 < info["fallback"] < ncells, info
    elif expect == "any":
        assert 0 <= info["fallback"] <= ncells, info
    if case.get("method", "newton") == "newton":
        assert info["iterations"] <= case.get("iterations", 3), info
    if "expect_early" in case:
        # (updates, lanes): that many lanes stopped after that many updates, and the
        # others of their blocks needed more
        at, count = case["expect_early"]
        hist = info["histogram"]
        assert hist[at] == count and sum(hist[at + 1:]) > 0 and sum(hist[:at]) == 0, info
    if case.get("backward", True):
        assert r["gp_shapes_ok"]
        for key in ("err_gh0", "err_gx", "err_gp"):
            assert r[key] <= tol["grads"], (key, r)


def test_launch_config():
    from paracompile._cuda import fused_grid, launch_config

    # (threads = 32 x time warps, chunk = steps per thread and pass)
    assert launch_config(1) == (32, 8)
    assert launch_config(100) == (416, 8)  # 13 warps x 8 steps: one pass
    assert launch_config(4096) == (512, 32)  # 16 warps x 32 steps: 8 passes
    assert launch_config(1 << 20) == (512, 32)
    assert launch_config(4096, limit=256) == (256, 32)  # a module of at most 8 warps
    assert launch_config(100, chunk=1, threads=64) == (64, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        launch_config(100, threads=48)
    with pytest.raises(ValueError, match=r"\[32, 608\]"):
        launch_config(100, threads=640, limit=608)
    with pytest.raises(ValueError, match="chunk"):
        launch_config(100, chunk=0)
    # one block per batch entry and 32 channels
    assert fused_grid(3, 32) == 3 and fused_grid(2, 33) == 4 and fused_grid(2, 5) == 2


@pytest.mark.parametrize(("cell", "dtype", "warps"), [
    ("ParaGRU", "float32", 32), ("ParaLSTM", "float32", 32), ("ParaLSTM", "float64", 19)])
def test_rendered_kernels(cell, dtype, warps):
    """Shared arrays sized at render time (<= 40 KB); cache=True only for a real GPU; no
    warp intrinsics (lanes are channels: nothing is exchanged within a warp)."""
    from _cuda_fixtures import CELLS, render

    spec = CELLS[cell]
    gpu, sim = render(spec, dtype, simulator=False), render(spec, dtype, simulator=True)
    assert f"CUDA_MAX_WARPS = {warps}\n" in gpu
    nmv = len(spec.jac_entries) + spec.k
    item = 8 if dtype == "float64" else 4
    assert 32 * item * (warps * (nmv + spec.k) + 2 * spec.k) <= 40960
    assert gpu.count("@cuda.jit(cache=True)\ndef ") == 2  # the sequential kernels
    # the fused ones: also capped at 128 registers (512 threads fit the register file)
    assert gpu.count("@cuda.jit(cache=True, **_FUSED_OPTIONS)\ndef ") == 2
    assert '{"max_registers": 128}' in gpu
    assert "cache=True" not in sim
    assert "shfl" not in gpu

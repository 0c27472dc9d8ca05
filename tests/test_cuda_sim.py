"""CUDA kernels in numba's simulator, against a plain torch sequential loop with autograd.

``NUMBA_ENABLE_CUDASIM=1`` must be set before ``numba.cuda`` is first imported, and the rest
of the suite imports it normally, so all simulator cases run in two subprocesses
(``python tests/_cuda_fixtures.py``, cases as JSON on stdin, results as JSON on stdout),
started once per module and run in parallel (the simulator is single-core bound); each case
is then checked by its own parametrized test.  Cases are tiny (B <= 2, D <= 3, T <= 100):
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

# chunk/threads are the launcher's knobs: threads * chunk steps per block pass, so small
# values give several passes (the multi-block carry) on short sequences.
CASES = [
    # multi-pass (64 steps per pass, T = 100), Newton converged, parallel backward
    dict(name="gru_f64_newton_multipass", cell="ParaGRU", B=2, T=100, D=2, threads=32,
         chunk=2, iterations=30, expect_fallback="zero", **F64),
    # two warps per block (block combine through shared memory) and two passes
    dict(name="lstm_f64_newton_multiwarp", cell="ParaLSTM", B=1, T=100, D=2, threads=64,
         chunk=1, iterations=30, expect_fallback="zero", **F64),
    # outputs and a scalar param; 32 + 13 steps
    dict(name="gruout_f64_newton", cell="GRUOut", B=2, T=45, D=3, threads=32, chunk=1,
         iterations=30, expect_fallback="zero", **F64),
    # Newton does not converge in 1 iteration: every sequence is rerun sequentially
    dict(name="gru_f64_newton_fallback", cell="ParaGRU", B=2, T=50, D=3, threads=32, chunk=1,
         iterations=1, expect_fallback="all", backward=False, **F64),
    # float32, default launch configuration (T = 70: 2 warps, 1 pass) and 3 iterations
    dict(name="gruout_f32_newton_default", cell="GRUOut", dtype="float32", B=2, T=70, D=3,
         expect_fallback="any"),
    dict(name="lstm_f32_newton", cell="ParaLSTM", dtype="float32", B=2, T=37, D=3,
         threads=32, chunk=1, expect_fallback="any"),
    # sequential forward and sequential backward kernels
    dict(name="lstm_f64_sequential", cell="ParaLSTM", B=2, T=100, D=3, method="sequential",
         bwd_method="sequential", **F64),
    dict(name="gruout_f64_sequential", cell="GRUOut", B=2, T=31, D=3, method="sequential",
         bwd_method="sequential", **F64),
    # partial last chunk (T = 99, chunk 7) and a 4-step second pass (chunk 3: 96 per pass)
    # ... where one of the two sequences converges in 3 iterations and the other falls back
    dict(name="lstm_f32_chunk7", cell="ParaLSTM", dtype="float32", B=1, T=99, D=2,
         threads=32, chunk=7, expect_fallback="partial"),
    dict(name="lstm_f64_chunk3", cell="ParaLSTM", B=2, T=100, D=1, threads=32, chunk=3,
         iterations=30, expect_fallback="zero", **F64),
    # no Newton update allowed: the initial guess is checked and every sequence falls back
    dict(name="gruout_f64_iterations0", cell="GRUOut", B=1, T=20, D=2, iterations=0,
         expect_fallback="all", backward=False, **F64),
    # the module rendered for a real GPU (the cuda.shfl_*_sync path) through the warp shim
    dict(name="gpu_text_lstm_f64_multiwarp", cell="ParaLSTM", B=1, T=100, D=2, threads=64,
         chunk=1, iterations=30, expect_fallback="zero", gpu_text=True, **F64),
    dict(name="gpu_text_gruout_f32", cell="GRUOut", dtype="float32", B=2, T=45, D=2,
         threads=32, chunk=1, expect_fallback="any", gpu_text=True),
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
    if case.get("backward", True):
        assert r["gp_shapes_ok"]
        for key in ("err_gh0", "err_gx", "err_gp"):
            assert r[key] <= tol["grads"], (key, r)


def test_launch_config():
    from paracompile._cuda import launch_config

    assert launch_config(1) == (32, 2)
    assert launch_config(100) == (64, 2)
    assert launch_config(4096) == (256, 16)
    assert launch_config(1 << 20) == (256, 16)  # 4096 steps per pass, 256 passes
    assert launch_config(100, chunk=1, threads=64) == (64, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        launch_config(100, threads=48)
    with pytest.raises(ValueError, match="chunk"):
        launch_config(100, chunk=0)

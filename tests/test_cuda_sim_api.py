"""The CUDA kernels of every shipped per-channel cell, rendered by the real pipeline and run
in numba's CUDA simulator through `cell.apply(backend="cuda")`, against the torch reference.

The simulator must be enabled before numba.cuda is imported, so the cases run in one
subprocess (the rest of the suite imports numba.cuda normally)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CELLS = ["paragru", "paralstm", "mingru", "indrnn", "coupled3"]
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}  # float32: T=45 steps of rounding


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str, str], tuple[float, float]]:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PARACOMPILE_CACHE_DIR=str(tmp_path_factory.mktemp("cudasim-cache")))
    proc = subprocess.run([sys.executable, str(HERE / "_cudasim_api_cases.py"), *CELLS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {}
    for line in proc.stdout.splitlines():
        name, dtype, method, err, gerr = line.split()
        out[(name, dtype, method)] = (float(err), float(gerr))
    return out


@pytest.mark.cudasim
@pytest.mark.parametrize("method", ["sequential", "newton"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CELLS)
def test_simulated_cuda_matches_reference(results, name, dtype, method):
    err, gerr = results[(name, dtype, method)]
    assert err <= TOLERANCE[dtype], f"outputs differ by {err}"
    assert gerr <= TOLERANCE[dtype], f"gradients differ by {gerr} (relative to max |grad|)"

"""Fuzzing the compiler with mutants of the shipped cells (the mutator: tests/_fuzz.py).

Every mutant must give a `CellError` or a cell whose `cpu` kernels, `torch` reference and
`cell.step` agree (values, NaN/inf positions, gradients; Newton with the sequential loop).
The bulk runs in a subprocess with NUMBA_DISABLE_JIT=1 (the generated kernels as plain Python,
no numba compile per mutant); a few valid mutants are then compiled by numba for real here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
from conftest import ROOT

import paracompile

SEED = 0
COUNT = 2000
FULL_PER_CELL = 12  # distinct parsable mutants per shipped cell that are loaded and run
JIT_SAMPLE = 2  # numba compiles each cell's kernels for seconds

# Mutants that hit a known bug, by exact text, with the bug: the fuzzer counts them without
# running them (a hang would cost its whole time bound); each needs an xfail(strict=True) test,
# which fails once the bug is fixed: then remove the entry here. None now.
KNOWN: dict[str, str] = {}

# once took minutes in analysis (every numeric trial of a Jacobian entry overflowed, so
# sp.simplify factored 10**308 coefficients)
HUGE_CONST_HANG = """cell Coupled3
state p, v, m
input x
param w ~ uniform(0.1, 0.5)
param gamma ~ uniform(0.05, 0.2)
param lam : scalar ~ constant(0.9)
const dt = 1e308
v' = v + dt * (tanh(x - w * w * p - gamma * v) - 0.1 * m)
p' = exp(p) + dt * v'
m' = lam * m + (1 - lam) * p'
"""


@pytest.fixture(scope="module")
def fuzz_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = dict(os.environ, NUMBA_DISABLE_JIT="1",
               PARACOMPILE_CACHE_DIR=str(tmp_path_factory.mktemp("fuzz-cache")))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_fuzz.py"), str(SEED),
                           str(COUNT), str(FULL_PER_CELL)], input=json.dumps(list(KNOWN)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    result["seconds"] = time.perf_counter() - start
    return result


def test_fuzz_mutants_error_cleanly_or_agree(fuzz_result: dict) -> None:
    counts, failures = fuzz_result["counts"], fuzz_result["failures"]
    print(f"\nfuzz (seed {SEED}, {fuzz_result['seconds']:.1f} s): {counts['mutants']} mutants, "
          f"{counts['distinct']} distinct; parse: {counts['parse-error']} CellError, "
          f"{counts['parsed']} valid; loaded and run: {counts['loaded']} "
          f"({counts['agree']} agree, {counts['nonfinite']} non-finite (agreeing NaN/inf), "
          f"{counts['no-inputs']} without inputs), {counts['load-error']} CellError in "
          f"analysis; {counts['known']} known bugs not run; {len(failures)} failures")
    report = "\n\n".join(f"mutant {f['index']} of {f['base']} ({f['stage']}): {f['message']}\n"
                         f"{f['text']}" for f in failures)
    assert not failures, f"{len(failures)} mutants failed:\n\n{report}"
    # the fuzzer must not silently degrade into only broken (or only valid) mutants
    assert counts["mutants"] >= 2000 and counts["distinct"] >= 1500
    assert counts["parse-error"] >= 800
    assert counts["parsed"] >= 400
    assert counts["agree"] >= 55


def test_fuzz_valid_mutants_with_numba(fuzz_result: dict) -> None:
    """A few valid mutants compiled by numba for real (the fuzz ran them as plain Python):
    the sequential kernels and their backward; Newton's kernels would double the compile."""
    sys.path.insert(0, str(ROOT / "tests"))
    import _fuzz

    sample = fuzz_result["valid"][:: max(1, len(fuzz_result["valid"]) // JIT_SAMPLE)]
    sample = sample[:JIT_SAMPLE]
    assert len(sample) == JIT_SAMPLE
    for i, text in enumerate(sample):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", paracompile.CellWarning)  # unused declarations
            cell = paracompile.load(text)
        category, why = _fuzz.compare(cell, SEED + i, newton=False)
        assert (category, why) == ("agree", None), f"{why}\n{text}"


def test_huge_const_analysis_is_quick(tmp_path) -> None:  # noqa: ANN001
    """dt**2 = 1e616 is beyond the float range: a quick CellError, not minutes in SymPy."""
    env = dict(os.environ, PARACOMPILE_CACHE_DIR=str(tmp_path))
    code = ("import sys, paracompile\ntry:\n    paracompile.load(sys.stdin.read())\n"
            "except paracompile.CellError as err:\n    print(err)")
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code],
                              input=HUGE_CONST_HANG, cwd=ROOT, env=env, text=True, timeout=10,
                              check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the cell took over 10 s (normally under 1 s)")
    assert "beyond the float64 range" in proc.stdout


@pytest.mark.parametrize("update", ["(h * 1e300) * 1e300 + x", "(h + 1e308) + 1e308 + x",
                                    "1e300 * tanh(1e300 * h) + x", "1e300 * tanh(1e300 * p * h)"])
def test_folded_coefficient_beyond_float_range(update: str) -> None:
    """SymPy folds these into exact numbers beyond the float range (10**600), in the update or
    in a derivative the backward pass needs: a CellError at the update, not an OverflowError
    in the torch step or an inf the written order would not give."""
    with warnings.catch_warnings(), pytest.raises(paracompile.CellError,
                                                  match="beyond the float64 range") as err:
        warnings.simplefilter("ignore", paracompile.CellWarning)  # p is unused in most
        paracompile.load(f"cell C\nstate h\ninput x\nparam p\nh' = {update}\n")
    assert (err.value.line, err.value.column) == (5, 1)


@pytest.mark.parametrize("update", ["max(log(h), x)", "min(x, sqrt(h))"])
def test_nan_through_min_max_agrees(update: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import _fuzz

    cell = paracompile.load(f"cell C\nstate h\ninput x\nh' = {update}\n")
    category, why = _fuzz.compare(cell, 0, newton=False)
    assert why is None, why
    assert category == "nonfinite"

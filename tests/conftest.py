"""Shared test set-up: a per-session compile cache, shipped cells, random data for a cell.

The cache: ``PARACOMPILE_CACHE_DIR`` is pointed at a fresh temporary directory before any test
module is imported (``pytest_configure``), so no test reads or writes ``~/.cache`` and every
run compiles from scratch exactly once; generated modules and numba's cache (which lives next
to them) are shared by all tests and by the subprocesses they start, which inherit the
environment. Set ``PARACOMPILE_TEST_CACHE_DIR`` to reuse one directory across runs (faster
local iteration; the directory is then left in place).

OpenMP: ``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before torch is imported.
torch's and numba's OpenMP threads otherwise busy-wait after every parallel region; on a
2-core machine with anything else running, each of the reference's thousands of tiny torch
ops then waits for a descheduled thread: one T = 300 reference forward + backward measured
0.1 s passive, 0.5-11 s active (numba's "omp" layer also resets torch's thread count to 2).

Random data: values are scaled so every shipped recurrence stays bounded for hundreds of
steps: vector and scalar params ``0.5 * randn`` (|a h| stays well inside the gates' linear
range), matrix params ``0.3 / sqrt(D) * randn`` (spectral radius about 0.3, so ``W @ h``
contracts), inputs ``randn``, initial states ``0.5 * randn``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp; see above

import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CELLS_DIR = ROOT / "cells"
SHIPPED = ("paragru", "paralstm", "mingru", "indrnn", "elman", "coupled3")

_SAVED: dict[str, str | None] = {}
_OWNED: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    # before collection: test modules may load cells at import time
    for var in ("PARACOMPILE_CACHE_DIR", "PARACOMPILE_DUMP_DIR"):
        _SAVED[var] = os.environ.get(var)
    chosen = os.environ.get("PARACOMPILE_TEST_CACHE_DIR")
    if chosen:
        path = Path(chosen).expanduser()
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="paracompile-test-cache-"))
        _OWNED.append(path)
    os.environ["PARACOMPILE_CACHE_DIR"] = str(path)
    os.environ.pop("PARACOMPILE_DUMP_DIR", None)  # tests that dump set it themselves


def pytest_unconfigure(config: pytest.Config) -> None:
    for var, value in _SAVED.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    for path in _OWNED:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def paracompile_cache_dir() -> Path:
    """The session's compile cache (already in ``PARACOMPILE_CACHE_DIR``); fails loudly if a
    test or a library changed the variable behind the suite's back."""
    path = Path(os.environ["PARACOMPILE_CACHE_DIR"])
    yield path
    assert os.environ.get("PARACOMPILE_CACHE_DIR") == str(path), (
        "PARACOMPILE_CACHE_DIR was changed during the session")


# -- cells -------------------------------------------------------------------------------------

@cache
def shipped(name: str):
    """A shipped cell, loaded once per process (its compiled kernels are shared by all tests)."""
    import paracompile

    return paracompile.load(CELLS_DIR / f"{name}.cell")


def warm_kernels(jobs: Iterable[tuple[str, str]], workers: int = 2) -> None:
    """Compile the CPU kernels of (cell path or text, dtype) jobs into the session's numba
    cache in `workers` parallel subprocesses (numba compiles on one core; these machines have
    two), so that tests only load them. Jobs already warmed in this session are skipped;
    failures are left for the tests to report."""
    todo = [list(j) for j in jobs if tuple(j) not in _WARMED]
    if not todo:
        return
    groups = [todo[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_warm_kernels.py"),
                               json.dumps(group)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for group in groups if group]
    for proc in procs:
        proc.wait(timeout=900)
    _WARMED.update(tuple(j) for j in todo)


_WARMED: set[tuple[str, ...]] = set()


# -- random data -------------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(cell, B: int, T: int, D: int, dtype: torch.dtype = torch.float64,
                seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """input name -> randn (B, T, D)."""
    g = generator(seed)
    return {n: torch.randn(B, T, D, dtype=torch.float64, generator=g).to(dtype)
            .requires_grad_(requires_grad) for n in cell.inputs}


def param_shape(kind: str, D: int) -> tuple[int, ...]:
    return {"vector": (D,), "scalar": (), "matrix": (D, D)}[kind]


def make_params(cell, D: int, dtype: torch.dtype = torch.float64, seed: int = 1,
                requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """param name -> 0.5 randn (D,) / (); a matrix 0.3 / sqrt(D) randn (D, D)."""
    g = generator(seed)
    out = {}
    for n, kind in cell.params.items():
        scale = 0.3 / math.sqrt(D) if kind == "matrix" else 0.5
        p = scale * torch.randn(param_shape(kind, D), dtype=torch.float64, generator=g)
        out[n] = p.to(dtype).requires_grad_(requires_grad)
    return out


def make_h0(cell, B: int, D: int, dtype: torch.dtype = torch.float64, seed: int = 2,
            requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """state name -> 0.5 randn (B, D)."""
    g = generator(seed)
    return {n: (0.5 * torch.randn(B, D, dtype=torch.float64, generator=g)).to(dtype)
            .requires_grad_(requires_grad) for n in cell.states}


def make_case(cell, B: int, T: int, D: int, dtype: torch.dtype = torch.float64,
              seed: int = 0, requires_grad: bool = False):
    """(inputs, params, h0) for one call of ``cell.apply``."""
    return (make_inputs(cell, B, T, D, dtype, 3 * seed, requires_grad),
            make_params(cell, D, dtype, 3 * seed + 1, requires_grad),
            make_h0(cell, B, D, dtype, 3 * seed + 2, requires_grad))


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype,
         requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Detached copies in ``dtype`` (new leaves)."""
    return {n: t.detach().to(dtype).requires_grad_(requires_grad) for n, t in tensors.items()}


def leaves(*dicts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for d in dicts for t in d.values()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + max |b|), in float64 (NaN if either has a NaN)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def max_rel_err(xs: Iterable[torch.Tensor], ys: Iterable[torch.Tensor]) -> float:
    errs = [rel_err(a, b) for a, b in zip(xs, ys, strict=True)]
    if any(math.isnan(e) for e in errs):
        return math.nan
    return max(errs, default=0.0)

"""The main job: build a shipped cell, import the generated module, and show the sequential
and parallel-in-time (Newton) kernels agreeing, with their speed against a torch loop.

    python examples/demo.py [--cell cells/paragru.cell] [--out out] [--T 1024]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

# torch's and numba's OpenMP workers must not spin against each other (see docs/benchmarks.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def stage(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def timed(fn, repeats: int = 5) -> float:
    """Median wall time of fn() in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default=str(ROOT / "cells" / "paragru.cell"))
    parser.add_argument("--out", default=str(ROOT / "out"), help="where to build the module")
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--D", type=int, default=256)
    args = parser.parse_args()
    total = 5

    stage(1, total, f"paracompile check {args.cell}")
    subprocess.run([sys.executable, "-m", "paracompile", "check", args.cell], check=True)

    stage(2, total, f"paracompile build {args.cell} -o {args.out}")
    subprocess.run([sys.executable, "-m", "paracompile", "build", args.cell, "-o", args.out],
                   check=True)
    sys.path.insert(0, args.out)
    built = sorted(Path(args.out).glob("*.py"), key=lambda p: p.stat().st_mtime)[-1]
    module_name = built.stem
    cell = importlib.import_module(module_name)
    print(f"    imported {module_name}: structure {cell.structure}, inputs {cell.inputs}")

    B, T, D = args.B, args.T, args.D
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(B, T, D, generator=gen) for n in cell.inputs}
    # the shipped cells' initialisation hints: uniform(-0.5, 0.5) recurrent weights
    params = {n: torch.rand(() if k == "scalar" else (D, D) if k == "matrix" else (D,),
                            generator=gen) - 0.5 for n, k in cell.params.items()}

    stage(3, total, "compiling kernels (numba; cached on disk after the first run)")
    start = time.perf_counter()
    for method in ("sequential", "newton"):
        small = {n: v[:, :8] for n, v in inputs.items()}
        cell.apply(small, params, method=method)
    print(f"    ready in {time.perf_counter() - start:.1f} s")

    stage(4, total, f"running B={B} T={T} D={D} float32")
    seq = cell.apply(inputs, params, method="sequential")
    newton = cell.apply(inputs, params, method="newton")
    ref = cell.apply(inputs, params, backend="torch")
    for name in seq:
        diff = (seq[name] - newton[name]).abs().max().item()
        ref_diff = (seq[name] - ref[name]).abs().max().item()
        print(f"    {name}: max |sequential - newton| = {diff:.2e}, "
              f"max |sequential - torch loop| = {ref_diff:.2e}")
    stats = cell.cell.stats.last
    print(f"    newton: {stats['iterations']} iterations, "
          f"{stats['fallback_sequences']} sequences fell back to the sequential kernel")

    stage(5, total, "timing (median of 5)")
    rows = [
        ("compiled sequential", timed(lambda: cell.apply(inputs, params, method="sequential"))),
        ("compiled newton", timed(lambda: cell.apply(inputs, params, method="newton"))),
        ("torch loop (reference)", timed(lambda: cell.apply(inputs, params, backend="torch"),
                                         repeats=3)),
    ]
    base = rows[-1][1]
    for label, ms in rows:
        print(f"    {label:<24} {ms:9.2f} ms   {base / ms:7.1f}x vs torch loop")


if __name__ == "__main__":
    main()

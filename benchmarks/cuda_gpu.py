"""CUDA benchmark: compiled fused Newton vs the compiled sequential kernel vs a torch loop.

ParaGRU and ParaLSTM, B=4, D=256 (override with flags), float32, T from 256 to 65536;
forward and forward+backward; CUDA-event timing, median of repeats. Prints a Markdown table
with the device name and writes benchmarks/results/cuda.md.

    python benchmarks/cuda_gpu.py [--T 256 1024 4096 16384 65536] [--loop-limit 4096]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import paracompile

ROOT = Path(__file__).resolve().parent.parent


def median_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_row(cell, B: int, T: int, D: int, repeats: int, loop_limit: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": gen}
    xs = {n: torch.randn(B, T, D, **kw).requires_grad_() for n in cell.inputs}
    ps = {n: (0.5 * torch.rand(D, **kw)).requires_grad_()
          for n in cell.params}
    leaves = [*xs.values(), *ps.values()]

    def fwd(method, backend):
        def run():
            with torch.no_grad():
                cell.apply(xs, ps, method=method, backend=backend)
        return run

    def fwd_bwd(method, backend):
        def run():
            out = cell.apply(xs, ps, method=method, backend=backend)
            torch.autograd.grad(sum(v.sum() for v in out.values()), leaves)
        return run

    row = {"cell": cell.name, "T": T,
           "newton": median_ms(fwd("newton", "cuda"), repeats),
           "sequential": median_ms(fwd("sequential", "cuda"), repeats),
           "newton fwd+bwd": median_ms(fwd_bwd("newton", "cuda"), repeats),
           "sequential fwd+bwd": median_ms(fwd_bwd("sequential", "cuda"),
                                           repeats)}
    if loop_limit >= T:
        row["torch loop"] = median_ms(fwd("sequential", "torch"), 3)
        row["torch loop fwd+bwd"] = median_ms(fwd_bwd("sequential", "torch"), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["paragru", "paralstm"])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--D", type=int, default=256)
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--loop-limit", type=int, default=4096,
                        help="skip the (slow) torch loop above this T")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    header = (f"CUDA benchmark on {device}: B={args.B}, D={args.D}, float32, median ms "
              f"(CUDA events, {args.repeats} repeats)")
    print(header, flush=True)
    rows = []
    for name in args.cells:
        cell = paracompile.load(ROOT / "cells" / f"{name}.cell")
        for T in args.T:
            row = bench_row(cell, args.B, T, args.D, args.repeats, args.loop_limit)
            print(row, cell.stats.last, flush=True)
            rows.append(row)
    columns = ["newton", "sequential", "torch loop", "newton fwd+bwd", "sequential fwd+bwd",
               "torch loop fwd+bwd"]
    lines = ["| cell | T | " + " | ".join(columns) + " | newton vs sequential |",
             "|---" * (len(columns) + 3) + "|"]
    for r in rows:
        vals = [f"{r[c]:.3f}" if c in r else "-" for c in columns]
        lines.append(f"| {r['cell']} | {r['T']} | " + " | ".join(vals)
                     + f" | {r['sequential'] / r['newton']:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()

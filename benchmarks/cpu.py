"""CPU benchmark: compiled kernels vs torch loops vs a memory floor (issue: CPU backend).

For ParaGRU and ParaLSTM at B=4, D=256, T in {256, 1024, 4096}, float32: median times of the
compiled sequential and Newton kernels, a torch sequential loop of the same cell, the torch
reference Newton, and a memory floor (a torch op reading the inputs and writing the states
once), forward and forward+backward. Prints a Markdown table and saves a plot.

    python benchmarks/cpu.py [--threads 1] [--T 256 1024 4096] [--repeats 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numba
import torch

import paracompile

ROOT = Path(__file__).resolve().parent.parent


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_args(cell, B: int, T: int, D: int, grad: bool):
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(B, T, D, generator=gen).requires_grad_(grad) for n in cell.inputs}
    params = {n: (0.5 * torch.rand(D, generator=gen) - 0.25).requires_grad_(grad)
              for n in cell.params}
    return inputs, params


def bench_cell(cell, B: int, T: int, D: int, repeats: int, slow_limit: int) -> dict[str, float]:
    row: dict[str, float] = {}
    slow_repeats = 3 if T <= 1024 else 1  # the torch baselines take seconds at long T
    inputs, params = make_args(cell, B, T, D, grad=False)
    k = len(cell.states)
    stacked = torch.stack(list(inputs.values()))
    outs = [torch.empty(B, T, D) for _ in range(k)]

    def floor() -> None:
        torch.sum(stacked, 0, out=outs[0])
        for o in outs[1:]:
            o.copy_(outs[0])

    with torch.no_grad():
        row["memory floor"] = median_ms(floor, repeats)
        row["compiled sequential"] = median_ms(
            lambda: cell.apply(inputs, params, method="sequential", backend="cpu"), repeats)
        row["compiled newton"] = median_ms(
            lambda: cell.apply(inputs, params, method="newton", backend="cpu"), repeats)
        row["torch loop"] = median_ms(
            lambda: cell.apply(inputs, params, method="sequential", backend="torch"),
            slow_repeats)
        if slow_limit >= T:
            row["torch newton (reference)"] = median_ms(
                lambda: cell.apply(inputs, params, method="newton", backend="torch"), 3)

    g_inputs, g_params = make_args(cell, B, T, D, grad=True)
    leaves = [*g_inputs.values(), *g_params.values()]

    def fwd_bwd(method: str, backend: str):
        def run() -> None:
            out = cell.apply(g_inputs, g_params, method=method, backend=backend)
            loss = sum(v.square().sum() for v in out.values())
            torch.autograd.grad(loss, leaves)
        return run

    row["fwd+bwd compiled sequential"] = median_ms(fwd_bwd("sequential", "cpu"), repeats)
    row["fwd+bwd compiled newton"] = median_ms(fwd_bwd("newton", "cpu"), repeats)
    row["fwd+bwd torch loop (autograd)"] = median_ms(fwd_bwd("sequential", "torch"),
                                                      slow_repeats)
    if slow_limit >= T:
        row["fwd+bwd torch newton (reference)"] = median_ms(fwd_bwd("newton", "torch"), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["paragru", "paralstm"])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--D", type=int, default=256)
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slow-limit", type=int, default=1024,
                        help="skip the (slow) torch reference Newton above this T")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"thread(s), torch {torch.__version__}, numba {numba.__version__}")
    print(f"# CPU benchmark: B={args.B}, D={args.D}, float32; {machine}\n")
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name in args.cells:
        cell = paracompile.load(ROOT / "cells" / f"{name}.cell")
        for T in args.T:
            print(f"  running {cell.name} T={T} ...", flush=True)
            results[(cell.name, T)] = bench_cell(cell, args.B, T, args.D, args.repeats,
                                                 args.slow_limit)
    columns = list(dict.fromkeys(c for r in results.values() for c in r))
    lines = ["| cell | T | " + " | ".join(columns) + " | seq vs loop | seq vs floor | "
             "fwd+bwd vs autograd |",
             "|---" * (len(columns) + 5) + "|"]
    for (name, T), row in results.items():
        cells = [f"{row[c]:.2f}" if c in row else "-" for c in columns]
        speed = row["torch loop"] / row["compiled sequential"]
        floor = row["compiled sequential"] / row["memory floor"]
        bwd = row["fwd+bwd torch loop (autograd)"] / row["fwd+bwd compiled sequential"]
        lines.append(f"| {name} | {T} | " + " | ".join(cells)
                     + f" | {speed:.0f}x | {floor:.1f}x | {bwd:.0f}x |")
    table = "\n".join(lines)
    print("\nmedian milliseconds\n")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.md").write_text(f"CPU benchmark, B={args.B}, D={args.D}, float32, "
                                f"{machine}\n\nmedian milliseconds\n\n{table}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(args.cells), figsize=(6 * len(args.cells), 4.5),
                             squeeze=False)
    for ax, name in zip(axes[0], dict.fromkeys(n for n, _ in results), strict=False):
        for column in columns:
            points = [(T, r[column]) for (n, T), r in results.items() if n == name
                      and column in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=column)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms (median)", title=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"paracompile CPU, B={args.B}, D={args.D}, float32 ({machine})", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cpu.png", dpi=120)
    print(f"\nwrote {out / 'cpu.md'} and {out / 'cpu.png'}")


if __name__ == "__main__":
    main()

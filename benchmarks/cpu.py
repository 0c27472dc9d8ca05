"""CPU benchmark: compiled kernels vs torch loops vs memory floors (issue: CPU backend).

For ParaGRU and ParaLSTM at B=4, D=256, T in {256, 1024, 4096}, float32: the best (minimum)
times of the compiled sequential and Newton forwards, the compiled backward alone, a torch
sequential loop of the same cell, the torch reference Newton, and forward+backward through
each. Prints a Markdown table and saves a plot.

Memory floors: the time to move the bytes a pass must move, each touched once, at memory's
bandwidth, that of a plain `torch` copy of 256 MiB measured in the same run (a copy reads
half and writes half the bytes it moves). With k states, m inputs and o outputs, the forward
reads the inputs and writes the states and outputs: m + k + o arrays of B*T*D values; the
backward reads the state and output cotangents, the inputs and the states and writes the
input cotangents: k + o + m + k + m arrays (h0, the parameters and their gradients are B*D
or D values: negligible). The copy is larger than any last-level cache on purpose: a copy of
the pass's own size (16-40 MB at T=1024) is partly served by a 32 MB L3 and its best time
varies 2x between runs; the table shows it too, as a stricter reference for the backward
("bwd copy", "bwd vs copy"). Minimum, not median, because the machine may be shared: the
minimum is the least disturbed run. The bandwidth is that of the run's best 256 MiB copy.

The backward alone ("bwd compiled") is the median, over TABLE_PLACEMENTS sets of arrays (all
alive at once, so each set lies at other addresses), of each set's best time, the sets and
the 256 MiB copy taking turns within each repeat, half the repeats before the forward
columns and half after them. The VM of docs/benchmarks.md has slow spells of a second or
more, longer than a back-to-back series of repeats of a 3 ms pass (whose minimum then
measures the spell: up to 45% above other processes'), and the same kernel on the same
values runs up to ~30% slower on some sets of arrays than on others.

Warm pages: by default glibc hands freed blocks of more than a few MB back to the kernel, so
every pass that allocates its outputs (the compiled ops, torch's loops alike) would also pay
the page faults of fresh memory: about 5.8 ms per 12 MB on the VM of docs/benchmarks.md,
more than the backward's whole memory floor, while the floors copy into a buffer allocated
once. So the benchmark asks glibc (`mallopt`) to keep freed memory in the process, and
every column runs on warm pages; ``--fresh-pages`` keeps glibc's default. Outside the
benchmark the same is ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``
in the environment.

    python benchmarks/cpu.py [--threads 1] [--T 256 1024 4096] [--repeats 7] [--out DIR]
                             [--fresh-pages] [--placements N]

With ``--placements N`` it only times the backward alone, as for "bwd compiled" but on N sets
of arrays, and prints the spread of the sets' best times and of their ratios to the floor.

With ``--channel-blocks 64 auto`` it only compares channel blocks (channels per task of the
CPU kernels; "auto" is `_defaults.cpu_channel_block`'s choice): the compiled sequential
forward and the backward alone for each block, the blocks taking turns within each repeat
so that load on a shared machine hits them alike; prints the best milliseconds and the
ratios to the memory floors.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numba
import torch

import paracompile
from paracompile import _defaults

ROOT = Path(__file__).resolve().parent.parent


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel (so
    that allocations reuse warm pages); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # 32 MiB is the largest mmap threshold glibc accepts: larger blocks are still mapped
    # afresh each time (at B=4, D=256 an array reaches it at T=8192)
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)
                and libc.mallopt(m_mmap_threshold, 32 << 20))


def once_ms(fn) -> float:
    """The milliseconds of one call of fn."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def best_ms(fn, repeats: int) -> float:
    fn()  # warm up (and compile)
    return min(once_ms(fn) for _ in range(repeats))


_BANDWIDTH_BYTES = 256 << 20  # a copy this large streams from memory, past any L3
TABLE_PLACEMENTS = 4  # sets of arrays the table's "bwd compiled" is the median over


def copier(nbytes: int):
    """A torch copy moving `nbytes` (half read from its source, half written), to time."""
    src = torch.ones(nbytes // 2 // 4)  # float32
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_ms(nbytes: int, repeats: int) -> float:
    """The best time of `copier(nbytes)`."""
    return best_ms(copier(nbytes), repeats)


def memory_bandwidth(repeats: int) -> float:
    """Bytes per millisecond of the best copy moving 256 MiB."""
    return _BANDWIDTH_BYTES / copy_ms(_BANDWIDTH_BYTES, max(repeats, 10))


def pass_arrays(cell) -> tuple[int, int]:
    """The (B, T, D) arrays the forward and the backward each move once (module docstring)."""
    k, m, o = len(cell.states), len(cell.inputs), len(cell.outputs)
    return m + k + o, k + o + 2 * m + k


def floor_ms(n_arrays: int, numel: int, bandwidth: float) -> float:
    """The memory floor of a pass touching n_arrays float32 arrays of numel values once."""
    return n_arrays * numel * 4 / bandwidth


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
    bandwidth = memory_bandwidth(repeats)
    fwd_arrays, bwd_arrays = pass_arrays(cell)
    row["fwd floor"] = row["bwd floor"] = 0.0  # set below, from the best copy of the run
    # at least 50 repeats: the copy takes about a millisecond
    row["bwd copy"] = copy_ms(bwd_arrays * B * T * D * 4, max(repeats, 50))
    # the backward alone (the compiled adjoint kernel and its host-side work): the median of
    # its best times on TABLE_PLACEMENTS sets of arrays, timed in turns with the copy, in two
    # windows: half the repeats now, the rest after the forward columns
    backward = BackwardPlacements(cell, B, T, D, TABLE_PLACEMENTS)
    backward.time((repeats + 1) // 2)
    with torch.no_grad():
        row["compiled sequential"] = best_ms(
            lambda: cell.apply(inputs, params, method="sequential", backend="cpu"), repeats)
        row["compiled newton"] = best_ms(
            lambda: cell.apply(inputs, params, method="newton", backend="cpu"), repeats)
        row["torch loop"] = best_ms(
            lambda: cell.apply(inputs, params, method="sequential", backend="torch"),
            slow_repeats)
        if slow_limit >= T:
            row["torch newton (reference)"] = best_ms(
                lambda: cell.apply(inputs, params, method="newton", backend="torch"), 3)

    backward.time(repeats // 2)
    row["bwd compiled"] = statistics.median(backward.best)
    bandwidth = max(bandwidth, _BANDWIDTH_BYTES / backward.copy)  # the best of the run
    row["fwd floor"] = floor_ms(fwd_arrays, B * T * D, bandwidth)
    row["bwd floor"] = floor_ms(bwd_arrays, B * T * D, bandwidth)

    g_inputs, g_params = make_args(cell, B, T, D, grad=True)
    leaves = [*g_inputs.values(), *g_params.values()]

    def fwd_bwd(method: str, backend: str):
        def run() -> None:
            out = cell.apply(g_inputs, g_params, method=method, backend=backend)
            loss = sum(v.square().sum() for v in out.values())
            torch.autograd.grad(loss, leaves)
        return run

    row["fwd+bwd compiled sequential"] = best_ms(fwd_bwd("sequential", "cpu"), repeats)
    row["fwd+bwd compiled newton"] = best_ms(fwd_bwd("newton", "cpu"), repeats)
    row["fwd+bwd torch loop (autograd)"] = best_ms(fwd_bwd("sequential", "torch"),
                                                      slow_repeats)
    if slow_limit >= T:
        row["fwd+bwd torch newton (reference)"] = best_ms(fwd_bwd("newton", "torch"), 3)
    return row


def compare_channel_blocks(cell, B: int, T: int, D: int, blocks: list[str], repeats: int
                           ) -> dict[str, dict[str, float]]:
    """Best ms of the compiled sequential forward and of the backward alone per channel
    block, the blocks alternating within each repeat. The launcher's choice is replaced for
    the duration (an explicit block for every call), then restored."""
    choose = _defaults.cpu_channel_block
    chosen = {b: choose(B, D, numba.get_num_threads()) if b == "auto" else int(b)
              for b in blocks}
    inputs, params = make_args(cell, B, T, D, grad=True)
    leaves = [*inputs.values(), *params.values()]
    bandwidth = memory_bandwidth(repeats)
    floors = {name: floor_ms(n, B * T * D, bandwidth)
              for name, n in zip(("fwd", "bwd"), pass_arrays(cell), strict=True)}
    best = {b: {"fwd": float("inf"), "bwd": float("inf")} for b in blocks}
    try:
        for rep in range(repeats + 1):  # the first round compiles and warms up
            for b in blocks:
                _defaults.cpu_channel_block = lambda B, D, threads, ch=chosen[b]: ch
                with torch.no_grad():
                    start = time.perf_counter()
                    cell.apply(inputs, params, method="sequential", backend="cpu")
                    fwd = (time.perf_counter() - start) * 1e3
                out = cell.apply(inputs, params, method="sequential", backend="cpu")
                cot = [torch.ones_like(v) for v in out.values()]
                start = time.perf_counter()
                torch.autograd.grad(list(out.values()), leaves, cot)
                bwd = (time.perf_counter() - start) * 1e3
                if rep:
                    best[b]["fwd"] = min(best[b]["fwd"], fwd)
                    best[b]["bwd"] = min(best[b]["bwd"], bwd)
    finally:
        _defaults.cpu_channel_block = choose
    return {f"{b} ({chosen[b]})": {**r, "fwd floor": floors["fwd"], "bwd floor": floors["bwd"]}
            for b, r in best.items()}


class BackwardPlacements:
    """The backward alone on `placements` sets of arrays, all alive at once (so each set lies
    at other addresses), and the 256 MiB copy that sets memory's bandwidth: `time` runs them
    in turns, so that a slow spell of the machine hits them alike (what remains between sets
    is where their arrays lie), and keeps each one's best over all its calls.

    Calling `time` in two windows seconds apart (`bench_cell` does) keeps a slow spell of a
    second or two, which slows the compute-bound kernel but not the copy, from covering every
    repeat: the best of each is then the undisturbed time."""

    def __init__(self, cell, B: int, T: int, D: int, placements: int) -> None:
        self.runs = []
        for _ in range(placements):
            inputs, params = make_args(cell, B, T, D, grad=True)
            leaves = [*inputs.values(), *params.values()]
            out = cell.apply(inputs, params, method="sequential", backend="cpu")
            cotangents = [torch.randn_like(v) for v in out.values()]
            self.runs.append(functools.partial(torch.autograd.grad, list(out.values()),
                                               leaves, cotangents, retain_graph=True))
        self.bandwidth_copy = copier(_BANDWIDTH_BYTES)
        self.copy = float("inf")  # ms, the best copy
        self.best = [float("inf")] * placements  # ms, each set's best backward
        for run in self.runs:  # warm up
            run()

    def time(self, repeats: int) -> None:
        for _ in range(repeats):
            self.copy = min(self.copy, once_ms(self.bandwidth_copy))
            self.best = [min(b, once_ms(run)) for b, run in zip(self.best, self.runs,
                                                                 strict=True)]


def cells_and_lengths(args: argparse.Namespace) -> Iterator[tuple[Any, int]]:
    """(the loaded cell, T) for each cell and sequence length asked for."""
    for name in args.cells:
        cell = paracompile.load(ROOT / "cells" / f"{name}.cell")
        for T in args.T:
            yield cell, T


def print_table_head(title: str, columns: list[str]) -> None:
    print(f"# {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")


def main_placements(args: argparse.Namespace, machine: str) -> None:
    print_table_head(f"CPU backward over {args.placements} array placements: B={args.B}, "
                     f"D={args.D}, float32; {machine}",
                     ["cell", "T", "bwd ms: min", "median", "max", "bwd floor",
                      "bwd vs floor: min", "median", "max"])
    for cell, T in cells_and_lengths(args):
        backward = BackwardPlacements(cell, args.B, T, args.D, args.placements)
        backward.time(args.repeats)
        ms = backward.best
        floor = floor_ms(pass_arrays(cell)[1], args.B * T * args.D,
                         _BANDWIDTH_BYTES / backward.copy)
        low, mid, high = min(ms), statistics.median(ms), max(ms)
        print(f"| {cell.name} | {T} | {low:.2f} | {mid:.2f} | {high:.2f} | {floor:.2f} | "
              f"{low / floor:.1f}x | {mid / floor:.1f}x | {high / floor:.1f}x |", flush=True)


def main_channel_blocks(args: argparse.Namespace, machine: str) -> None:
    print_table_head(f"CPU channel blocks: B={args.B}, D={args.D}, float32; {machine}",
                     ["cell", "T", "channel block", "fwd", "bwd", "fwd floor", "bwd floor",
                      "fwd vs floor", "bwd vs floor"])
    for cell, T in cells_and_lengths(args):
        rows = compare_channel_blocks(cell, args.B, T, args.D, args.channel_blocks,
                                      args.repeats)
        for block, r in rows.items():
            print(f"| {cell.name} | {T} | {block} | {r['fwd']:.2f} | {r['bwd']:.2f} | "
                  f"{r['fwd floor']:.2f} | {r['bwd floor']:.2f} | "
                  f"{r['fwd'] / r['fwd floor']:.1f}x | {r['bwd'] / r['bwd floor']:.1f}x |",
                  flush=True)


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
    parser.add_argument("--channel-blocks", nargs="+", metavar="CH",
                        help='only compare these channel blocks (numbers or "auto")')
    parser.add_argument("--placements", type=int, metavar="N",
                        help="only time the backward, on N sets of arrays at other addresses")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="keep glibc's default of returning freed memory to the kernel")
    args = parser.parse_args()
    warm = not args.fresh_pages and keep_freed_memory()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"thread(s), torch {torch.__version__}, numba {numba.__version__}, "
               f"{'warm' if warm else 'fresh'} pages")
    if args.channel_blocks:
        main_channel_blocks(args, machine)
        return
    if args.placements:
        main_placements(args, machine)
        return
    print(f"# CPU benchmark: B={args.B}, D={args.D}, float32; {machine}\n")
    results: dict[tuple[str, int], dict[str, float]] = {}
    for cell, T in cells_and_lengths(args):
        print(f"  running {cell.name} T={T} ...", flush=True)
        results[(cell.name, T)] = bench_cell(cell, args.B, T, args.D, args.repeats,
                                             args.slow_limit)
    columns = list(dict.fromkeys(c for r in results.values() for c in r))
    lines = ["| cell | T | " + " | ".join(columns) + " | seq vs loop | fwd vs floor | "
             "bwd vs floor | bwd vs copy | fwd+bwd vs autograd |",
             "|---" * (len(columns) + 7) + "|"]
    for (name, T), row in results.items():
        cells = [f"{row[c]:.2f}" if c in row else "-" for c in columns]
        speed = row["torch loop"] / row["compiled sequential"]
        fwd = row["compiled sequential"] / row["fwd floor"]
        bwd = row["bwd compiled"] / row["bwd floor"]
        bwd_copy = row["bwd compiled"] / row["bwd copy"]
        both = row["fwd+bwd torch loop (autograd)"] / row["fwd+bwd compiled sequential"]
        lines.append(f"| {name} | {T} | " + " | ".join(cells)
                     + f" | {speed:.0f}x | {fwd:.1f}x | {bwd:.1f}x | {bwd_copy:.1f}x | "
                     f"{both:.0f}x |")
    table = "\n".join(lines)
    legend = (f"best (minimum) milliseconds; bwd compiled: the median over {TABLE_PLACEMENTS} "
              "sets of arrays of each set's best")
    print(f"\n{legend}\n")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.md").write_text(f"CPU benchmark, B={args.B}, D={args.D}, float32, "
                                f"{machine}\n\n{legend}\n\n{table}\n")
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
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms (best)", title=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"paracompile CPU, B={args.B}, D={args.D}, float32 ({machine})", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cpu.png", dpi=120)
    print(f"\nwrote {out / 'cpu.md'} and {out / 'cpu.png'}")


if __name__ == "__main__":
    main()

"""CUDA benchmark: compiled fused Newton vs the compiled sequential kernel vs a torch loop,
with two external anchors and the HBM floor.

ParaGRU and ParaLSTM, B=4, D=256 (override with flags), float32, T from 256 to 65536;
forward and forward+backward; CUDA-event timing, median of repeats.

* HBM floor: the bytes a kernel must move at least (inputs read and states/outputs written
  once; for forward+backward also the cotangents and saved states read and the input
  gradients written) divided by the measured device-to-device copy bandwidth; each time is
  also printed as a multiple of its floor.
* Anchors, timed in the same run where importable (a printed note otherwise):
  `accelerated-scan` (PyPI; `accelerated_scan.warp.scan`, a first-order linear scan
  x_t = a_t x_{t-1} + b_t over (B, D, T), T a power of 2 in [32, 65536]) — the cost of a
  memory-bound linear recurrence of the same size; and `flashrnn` (PyPI; a fused sequential
  LSTM with a dense per-head recurrent matrix, bfloat16) — a fused sequential RNN kernel.

Prints Markdown tables with the device name and writes benchmarks/results/cuda.md.

    python benchmarks/cuda_gpu.py [--T 256 1024 4096 16384 65536] [--loop-limit 4096]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import paracompile

ROOT = Path(__file__).resolve().parent.parent
FLASHRNN_HEAD = 64  # flashrnn head dimension (D is split into D / 64 heads)


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


def copy_bandwidth(repeats: int, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes per ms (a read and a write per byte)."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src), repeats)


def bench_row(cell, B: int, T: int, D: int, repeats: int, loop_limit: int,
              bandwidth: float) -> dict:
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

    with torch.no_grad():
        returned = cell.apply(xs, ps, method="sequential", backend="cuda")
    in_bytes = sum(x.numel() * x.element_size() for x in xs.values())
    out_bytes = sum(v.numel() * v.element_size() for v in returned.values())
    # forward: inputs read, states/outputs written; backward: cotangents and saved states
    # read (~ the returned bytes each), inputs read, input gradients written
    fwd_floor = (in_bytes + out_bytes) / bandwidth
    bwd_floor = (2 * out_bytes + 2 * in_bytes) / bandwidth
    row = {"cell": cell.name, "T": T, "floor": fwd_floor,
           "floor fwd+bwd": fwd_floor + bwd_floor,
           "newton": median_ms(fwd("newton", "cuda"), repeats)}
    row["newton stats"] = dict(cell.stats.last)
    row["sequential"] = median_ms(fwd("sequential", "cuda"), repeats)
    row["newton fwd+bwd"] = median_ms(fwd_bwd("newton", "cuda"), repeats)
    row["sequential fwd+bwd"] = median_ms(fwd_bwd("sequential", "cuda"), repeats)
    if loop_limit >= T:
        row["torch loop"] = median_ms(fwd("sequential", "torch"), 3)
        row["torch loop fwd+bwd"] = median_ms(fwd_bwd("sequential", "torch"), 3)
    return row


def anchor_accelerated_scan(B: int, T: int, D: int, repeats: int, bandwidth: float
                            ) -> dict | str:
    """accelerated_scan.warp.scan on (B, D, T) float32, or why it was skipped."""
    if T < 32 or T > 65536 or T & (T - 1):
        return f"accelerated-scan skipped at T={T}: needs a power of 2 in [32, 65536]"
    try:
        from accelerated_scan.warp import scan
    except Exception as exc:  # not installed, or its CUDA extension does not build here
        return f"accelerated-scan not available: {exc!r}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    gates = (0.9 + 0.1 * torch.rand(B, D, T, device="cuda", generator=gen)).requires_grad_()
    tokens = torch.randn(B, D, T, device="cuda", generator=gen).requires_grad_()

    def fwd():
        with torch.no_grad():
            scan(gates, tokens)

    def fwd_bwd():
        out = scan(gates, tokens)
        torch.autograd.grad(out.sum(), (gates, tokens))

    nbytes = gates.numel() * gates.element_size()
    # forward: gates, tokens read, states written; backward: gates, states, output
    # cotangent read, two gradients written
    return {"anchor": "accelerated-scan (linear scan, float32)", "T": T,
            "fwd": median_ms(fwd, repeats), "fwd floor": 3 * nbytes / bandwidth,
            "fwd+bwd": median_ms(fwd_bwd, repeats), "fwd+bwd floor": 8 * nbytes / bandwidth}


def anchor_flashrnn(B: int, T: int, D: int, repeats: int, bandwidth: float) -> dict | str:
    """flashrnn's fused LSTM (bfloat16, heads of 64), or why it was skipped."""
    if D % FLASHRNN_HEAD:
        return f"flashrnn skipped: D={D} is not a multiple of its head size {FLASHRNN_HEAD}"
    try:
        from flashrnn import flashrnn
    except Exception as exc:
        return f"flashrnn not available: {exc!r}"
    N, Dh, G, S = D // FLASHRNN_HEAD, FLASHRNN_HEAD, 4, 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": gen}
    dt = torch.bfloat16
    wx = torch.randn(B, T, G, N, Dh, **kw).to(dt).requires_grad_()
    rec = (torch.randn(G, N, Dh, Dh, **kw) * Dh ** -0.5).to(dt).requires_grad_()
    bias = torch.zeros(G, N, Dh, device="cuda", dtype=dt, requires_grad=True)
    s0 = torch.zeros(S, B, 1, N, Dh, device="cuda", dtype=dt)
    errors = []
    for backend in ("cuda_fused", "cuda"):
        def run(bwd: bool, backend=backend):
            if bwd:
                states, _ = flashrnn(wx, rec, bias, states=s0, function="lstm",
                                     backend=backend, dtype="bfloat16")
                torch.autograd.grad(states[0].float().sum(), (wx, rec, bias))
                return
            with torch.no_grad():
                flashrnn(wx, rec, bias, states=s0, function="lstm", backend=backend,
                         dtype="bfloat16")

        try:
            fwd_ms = median_ms(lambda: run(False), repeats)
            fwd_bwd_ms = median_ms(lambda: run(True), repeats)
        except Exception as exc:  # e.g. a head size or dtype its fused kernel rejects
            errors.append(f"{backend}: {exc!r}")
            continue
        x_bytes, s_bytes = wx.numel() * 2, S * B * T * D * 2
        return {"anchor": f"flashrnn LSTM ({backend}, bfloat16, {N} heads of {Dh})", "T": T,
                "fwd": fwd_ms, "fwd floor": (x_bytes + s_bytes) / bandwidth,
                "fwd+bwd": fwd_bwd_ms,
                "fwd+bwd floor": (3 * x_bytes + 3 * s_bytes) / bandwidth}
    return "flashrnn failed: " + "; ".join(errors)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["paragru", "paralstm"])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--D", type=int, default=256)
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--loop-limit", type=int, default=4096,
                        help="skip the (slow) torch loop above this T")
    parser.add_argument("--no-anchors", action="store_true",
                        help="skip accelerated-scan and flashrnn")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(args.repeats)
    torch.cuda.empty_cache()
    header = (f"CUDA benchmark on {device}: B={args.B}, D={args.D}, float32, median ms "
              f"(CUDA events, {args.repeats} repeats); copy bandwidth "
              f"{bandwidth / 1e6:.0f} GB/s (the HBM floor's)")
    print(header, flush=True)
    rows = []
    for name in args.cells:
        cell = paracompile.load(ROOT / "cells" / f"{name}.cell")
        for T in args.T:
            row = bench_row(cell, args.B, T, args.D, args.repeats, args.loop_limit, bandwidth)
            print(row, flush=True)
            rows.append(row)
    columns = ["newton", "sequential", "torch loop", "newton fwd+bwd", "sequential fwd+bwd",
               "torch loop fwd+bwd"]
    lines = ["| cell | T | " + " | ".join(columns)
             + " | newton vs sequential | floor | newton / floor | sequential / floor "
               "| floor fwd+bwd | newton fwd+bwd / floor |",
             "|---" * (len(columns) + 8) + "|"]
    for r in rows:
        vals = [_fmt(r.get(c)) for c in columns]
        lines.append(f"| {r['cell']} | {r['T']} | " + " | ".join(vals)
                     + f" | {r['sequential'] / r['newton']:.2f}x | {r['floor']:.3f}"
                     f" | {r['newton'] / r['floor']:.1f}x | {r['sequential'] / r['floor']:.1f}x"
                     f" | {r['floor fwd+bwd']:.3f}"
                     f" | {r['newton fwd+bwd'] / r['floor fwd+bwd']:.1f}x |")
    tables = ["\n".join(lines)]
    if not args.no_anchors:
        anchors, notes = [], []
        for T in args.T:
            for fn in (anchor_accelerated_scan, anchor_flashrnn):
                res = fn(args.B, T, args.D, args.repeats, bandwidth)
                print(res, flush=True)
                (anchors if isinstance(res, dict) else notes).append(res)
        alines = ["| anchor | T | fwd | fwd floor | fwd / floor | fwd+bwd | fwd+bwd floor "
                  "| fwd+bwd / floor |", "|---" * 8 + "|"]
        for a in anchors:
            alines.append(f"| {a['anchor']} | {a['T']} | {a['fwd']:.3f} | {a['fwd floor']:.3f}"
                          f" | {a['fwd'] / a['fwd floor']:.1f}x | {a['fwd+bwd']:.3f}"
                          f" | {a['fwd+bwd floor']:.3f}"
                          f" | {a['fwd+bwd'] / a['fwd+bwd floor']:.1f}x |")
        tables.append("\n".join(alines + [""] + sorted(set(notes))))
    text = "\n\n".join(tables)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda.md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()

"""Newton convergence benchmark: how often Newton converges, in how many iterations, and how
often it falls back to the sequential kernel, for ParaGRU and ParaLSTM in three parameter
regimes, float32 and float64, over sequence lengths (issue: Newton that pays off).

Regimes (D channels, per-channel parameters):

* ``init`` — the cells' `~` hints: every parameter uniform(-0.5, 0.5); inputs N(0, 1).
* ``gates`` — trained-like, gates near saturation: recurrent weights uniform(-1, 1); every
  gate input (the ones fed to a sigmoid: x_z, x_r of ParaGRU, x_f, x_o of ParaLSTM) gets a
  per-channel bias of magnitude 3-4 and random sign (gates mostly ~0.02 or ~0.98: long
  memory or fast forgetting), plus N(0, 1); candidate inputs N(0, 1).
* ``strong`` — a stress test outside the cells' contracting regime: |recurrent weights| in
  [2, 3] (random sign), inputs N(0, 4). Here |dh'/dh| exceeds 1 over long stretches (the
  candidate tanh(a h + x) with |a| > 1 is bistable), and Newton's iterations needed grow with
  T: fallbacks are expected; they are still exact.

For every (regime, cell, dtype, T): `method="newton"` with the default iteration caps, its
`cell.stats.last` (fallbacks counted per (sequence, channel) pair on the CPU and CUDA), the
iteration range of the converged sequences (histogram), and max |newton − sequential|
relative to max |sequential|. Prints a Markdown table.

    python benchmarks/newton_convergence.py [--backend cpu|cuda] [--T 300 4096 65536]
        [--B 2] [--D 8] [--regimes init gates strong]

With ``--backend cuda`` and ``NUMBA_ENABLE_CUDASIM=1`` it runs in numba's CUDA simulator
(slow: keep B * D and T small, e.g. --B 1 --D 4 --T 1024).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import paracompile

ROOT = Path(__file__).resolve().parent.parent
GATE_INPUTS = {"x_z", "x_r", "x_f", "x_o"}
CELLS = ("paragru", "paralstm")


def make_args(cell, regime: str, B: int, T: int, D: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=dtype)

    def sign(*shape: int) -> torch.Tensor:
        return torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0).to(dtype)

    params, inputs = {}, {}
    for name in cell.params:
        if regime == "init":
            params[name] = uniform(-0.5, 0.5, D)
        elif regime == "gates":
            params[name] = uniform(-1.0, 1.0, D)
        else:
            params[name] = uniform(2.0, 3.0, D) * sign(D)
    for name in cell.inputs:
        x = torch.randn(B, T, D, generator=gen, dtype=dtype)
        if regime == "strong":
            x = 2 * x
        elif regime == "gates" and name in GATE_INPUTS:
            x = x + uniform(3.0, 4.0, D) * sign(D)
        inputs[name] = x
    return inputs, params


def run(cell, regime: str, B: int, T: int, D: int, dtype: torch.dtype, backend: str) -> dict:
    inputs, params = make_args(cell, regime, B, T, D, dtype)
    with torch.no_grad():
        newton = cell.apply(inputs, params, method="newton", backend=backend)
        last = dict(cell.stats.last)
        exact = cell.apply(inputs, params, method="sequential", backend=backend)
    scale = max(v.abs().max().item() for v in exact.values())
    err = max((newton[k] - exact[k]).abs().max().item() for k in exact) / max(scale, 1e-300)
    hist = last["histogram"]
    used = [i for i, n in enumerate(hist) if n]
    return {"fallback": last["fallback_sequences"], "pairs": B * D,
            "iters": f"{used[0]}-{used[-1]}" if used else "-", "err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu", choices=("cpu", "cuda", "torch"))
    ap.add_argument("--T", type=int, nargs="+", default=[300, 4096, 65536])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--D", type=int, default=8)
    ap.add_argument("--regimes", nargs="+", default=["init", "gates", "strong"],
                    choices=("init", "gates", "strong"))
    args = ap.parse_args()
    cells = {n: paracompile.load(ROOT / "cells" / f"{n}.cell") for n in CELLS}
    print(f"backend {args.backend}, B={args.B}, D={args.D} ({args.B * args.D} (sequence, "
          "channel) pairs), default iteration caps and tolerance\n")
    print("| regime | cell | dtype | T | fallbacks | iterations (converged) | "
          "max rel. difference from sequential |")
    print("|---|---|---|---|---|---|---|")
    for regime in args.regimes:
        for cell in cells.values():
            for dtype in (torch.float32, torch.float64):
                for T in args.T:
                    r = run(cell, regime, args.B, T, args.D, dtype, args.backend)
                    print(f"| {regime} | {cell.name} | {str(dtype)[6:]} | {T} | "
                          f"{r['fallback']} / {r['pairs']} | {r['iters']} | {r['err']:.1e} |",
                          flush=True)


if __name__ == "__main__":
    main()

"""Run by test_cuda_sim_api.py in a subprocess with NUMBA_ENABLE_CUDASIM=1: every shipped
per-channel cell through the public API (backend="cuda" on CPU tensors), against the torch
reference, outputs and all gradients. Prints one line per case: NAME DTYPE METHOD OUT GRAD."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import paracompile

CELLS = Path(__file__).resolve().parent.parent / "cells"


def main(names: list[str]) -> None:
    for name in names:
        cell = paracompile.load(CELLS / f"{name}.cell")
        for dtype in (torch.float64, torch.float32):
            gen = torch.Generator().manual_seed(0)
            B, T, D = 2, 45, 3
            xs = {n: torch.randn(B, T, D, dtype=dtype, generator=gen).requires_grad_()
                  for n in cell.inputs}
            ps = {n: (0.5 * torch.rand(() if k == "scalar" else (D,), dtype=dtype,
                                       generator=gen)).requires_grad_()
                  for n, k in cell.params.items()}
            h0 = {s: torch.randn(B, D, dtype=dtype, generator=gen).requires_grad_()
                  for s in cell.states}
            leaves = [*xs.values(), *ps.values(), *h0.values()]
            ref = cell.apply(xs, ps, h0, backend="torch")
            cot = {n: torch.randn(v.shape, dtype=dtype, generator=gen) for n, v in ref.items()}
            g_ref = torch.autograd.grad(sum((ref[n] * cot[n]).sum() for n in ref), leaves)
            for method in ("sequential", "newton"):
                out = cell.apply(xs, ps, h0, method=method, backend="cuda")
                g = torch.autograd.grad(sum((out[n] * cot[n]).sum() for n in out), leaves)
                err = max(float((out[n] - ref[n]).detach().abs().max()) for n in ref)
                gerr = max(float((a - b).abs().max() / max(1.0, float(b.abs().max())))
                           for a, b in zip(g, g_ref, strict=True))
                print(name, str(dtype).split(".")[1], method, f"{err:.3e}", f"{gerr:.3e}",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

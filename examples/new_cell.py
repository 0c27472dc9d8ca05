"""A new cell from scratch: examples/mycell.cell (GatedLeaky), inspected, checked (sequential
== Newton, values and gradients) and trained as a layer.

    python examples/new_cell.py
    python examples/new_cell.py --steps 10

The same inspection from the command line, with the symbolic Jacobian:

    python -m paracompile check examples/mycell.cell
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import paracompile

HERE = Path(__file__).resolve().parent


def describe(hint) -> str:
    """An init hint from the .cell file, e.g. ['uniform', [-0.5, 0.5]] -> uniform(-0.5, 0.5)."""
    if hint is None:
        return "the layer's default"
    distribution, args = hint
    return f"{distribution}({', '.join(f'{a:g}' for a in args)})"


def inspect_cell(cell: paracompile.CompiledCell) -> None:
    print(f"cell {cell.name}")
    print(f"  states:    {', '.join(cell.states)}")
    print(f"  inputs:    {', '.join(cell.inputs)}")
    print("  params:    " + ", ".join(f"{n} ({k})" for n, k in cell.params.items()))
    print("  init:      " + ", ".join(f"{n} ~ {describe(cell.inits[n])}" for n in cell.params))
    print(f"  outputs:   {', '.join(cell.outputs) or '-'}")
    print(f"  structure: {cell.structure}")


def show_an_error() -> None:
    """Mistakes are reported with their position, never as a traceback from the compiler."""
    text = (HERE / "mycell.cell").read_text().replace("tanh(w * h", "tahn(w * h")
    try:
        paracompile.load(text)
    except paracompile.CellError as err:
        print(f"a typo in the cell is reported at line {err.line}, column {err.column}:")
        print(f"  {err}")


def check_methods(cell: paracompile.CompiledCell, dtype: torch.dtype,
                  iterations: int | None = None) -> float:
    """apply() with method='sequential' and method='newton': values and gradients.

    Newton stops once every sequence's residual is within tolerance; a sequence that has not
    converged after `iterations` (default 3 in float32, 5 in float64) is recomputed by the
    sequential kernel, so the answer is the same either way: `cell.stats` counts both."""
    gen = torch.Generator().manual_seed(0)
    B, T, D = 4, 256, 32
    inputs = {n: torch.randn(B, T, D, generator=gen, dtype=dtype) for n in cell.inputs}
    params = {"a": 0.5 * torch.randn(D, generator=gen, dtype=dtype),
              "w": 0.5 * torch.randn(D, generator=gen, dtype=dtype),
              "tau": torch.tensor(0.95, dtype=dtype)}
    grads, outs = {}, {}
    for method in ("sequential", "newton"):
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        kwargs = {} if iterations is None or method == "sequential" else {
            "iterations": iterations}
        out = cell.apply(inputs, leaves, method=method, **kwargs)
        (out["y"].sin().sum() + out["h"][:, -1].sum()).backward()
        outs[method] = out["y"].detach()
        grads[method] = {n: p.grad for n, p in leaves.items()}
    diff = (outs["newton"] - outs["sequential"]).abs().max().item()
    gdiff = max((grads["newton"][n] - grads["sequential"][n]).abs().max().item()
                / (1 + grads["sequential"][n].abs().max().item()) for n in params)
    last = cell.stats.last
    print(f"  {str(dtype).removeprefix('torch.'):8s} iterations={str(iterations or 'default'):7s} "
          f"newton ran {last['iterations']} iterations, {last['fallback_sequences']} of {B} "
          f"sequences fell back; max |y_newton - y_sequential| = {diff:.1e}, max relative "
          f"gradient difference = {gdiff:.1e}")
    return max(diff, gdiff)


def train(cell: paracompile.CompiledCell, steps: int, method: str) -> list[float]:
    """A toy task: read out a slow leaky average of the first input feature."""
    torch.manual_seed(0)
    layer = cell.Layer(4, 16, num_heads=2, method=method)
    readout = nn.Linear(16, 1)
    opt = torch.optim.Adam([*layer.parameters(), *readout.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(16, 64, 4, generator=gen)
        target = torch.zeros(16, 64)
        acc = torch.zeros(16)
        for t in range(64):
            acc = 0.9 * acc + 0.1 * x[:, t, 0]
            target[:, t] = acc
        y, _ = layer(x)
        loss = ((readout(y)[..., 0] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == 1:
            print(f"  step {step:4d}  loss {loss.item():.5f}")
    print(f"  {steps} steps in {time.perf_counter() - start:.1f} s with "
          f"{type(layer).__name__}({layer.extra_repr()})")
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--method", default="newton", choices=("auto", "sequential", "newton"),
                        help="method used for training (default newton)")
    args = parser.parse_args(argv)

    cell = paracompile.load(HERE / "mycell.cell")
    inspect_cell(cell)
    show_an_error()

    print("sequential == newton:")
    worst = max(check_methods(cell, dtype, iterations)
                for iterations in (None, 8) for dtype in (torch.float32, torch.float64))
    ok = worst < 1e-4
    print(f"  newton == sequential: {'yes' if ok else 'NO'} (worst difference {worst:.1e})")
    if not ok:
        raise SystemExit(1)

    print(f"training a {cell.name}Layer (method={args.method}):")
    losses = train(cell, args.steps, args.method)
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}")


if __name__ == "__main__":
    main()

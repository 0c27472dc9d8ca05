"""Worker of the DistributedDataParallel test in test_layer.py (run by torch.multiprocessing
spawn: it must be importable by name in the child processes)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SEED = 1234
B, T, INPUT, HIDDEN, HEADS = 4, 9, 6, 8, 2


def build():
    """(layer, x, target): the same on every rank (seeded)."""
    import torch

    import paracompile

    cell = paracompile.load(ROOT / "cells" / "paralstm.cell")
    torch.manual_seed(SEED)
    layer = cell.Layer(INPUT, HIDDEN, num_heads=HEADS, method="newton", backend="cpu")
    x = torch.randn(B, T, INPUT)
    target = torch.randn(B, T, HIDDEN)
    return layer, x, target


def loss_of(layer, x, target):
    y, state = layer(x)
    return ((y - target) ** 2).mean() + state["c"].pow(2).mean()


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        layer, x, target = build()
        model = DistributedDataParallel(layer)
        share = B // world
        part = slice(rank * share, (rank + 1) * share)
        loss = loss_of(model, x[part], target[part])
        loss.backward()
        if rank == 0:
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            torch.save(grads, os.path.join(out_dir, "ddp_grads.pt"))
        # no rank may tear gloo down while the other still uses it: that races into a
        # C++ std::terminate ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()

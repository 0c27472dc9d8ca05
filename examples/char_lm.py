"""A character-level language model: a stack of ParaGRU layers (cells/paragru.cell) trained
on the source code of a few Python standard-library modules, then sampled one character at a
time with `cell.step`.

    python examples/char_lm.py                      # ~1 minute on 2 CPU cores
    python examples/char_lm.py --method newton      # the parallel-in-time solve instead
    python examples/char_lm.py --compare            # newton and sequential side by side (200 steps)
    python examples/char_lm.py --steps 20 --generate 50
    python examples/char_lm.py --threads 1          # on a busy machine: no thread contention
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import paracompile

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("textwrap", "string", "difflib", "heapq", "bisect", "fractions", "shlex", "fnmatch",
           "glob", "functools", "argparse", "calendar")


def corpus() -> str:
    """The concatenated source of some standard-library modules (available offline)."""
    import importlib

    texts = []
    for name in MODULES:
        try:
            texts.append(inspect.getsource(importlib.import_module(name)))
        except (ImportError, OSError, TypeError):  # a Python without sources: skip it
            continue
    if not texts:
        raise SystemExit("no standard-library sources found to train on")
    return "\n\n".join(texts)


class CharLM(nn.Module):
    """Embedding -> ParaGRU layers -> linear read-out of the next character."""

    def __init__(self, cell, vocab: int, embed: int, hidden: int, layers: int, heads: int,
                 method: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.layers = nn.ModuleList(
            cell.Layer(embed if i == 0 else hidden, hidden, num_heads=heads, method=method)
            for i in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor, states: list[torch.Tensor] | None = None):
        """idx (B, T) -> logits (B, T, vocab), the final state of every layer."""
        x = self.embed(idx)
        finals = []
        for i, layer in enumerate(self.layers):
            x, h = layer(x, None if states is None else states[i])
            finals.append(h)
        return self.head(x), finals


def batches(data: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Endless random (input, target) windows of the training text."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def build(cell, args, vocab: int, method: str) -> CharLM:
    torch.manual_seed(args.seed)
    return CharLM(cell, vocab, args.embed, args.hidden, args.layers, args.heads, method)


def train(model: CharLM, data: torch.Tensor, args, label: str = "", quiet: bool = False):
    """Train; return the list of per-step losses."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    seen, t0 = 0, time.perf_counter()
    stream = batches(data, args.batch, args.seq_len, args.seed)
    for step in range(1, args.steps + 1):
        x, y = next(stream)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        seen += x.numel()
        if not quiet and (step % args.log_every == 0 or step == args.steps):
            elapsed = time.perf_counter() - t0
            recent = losses[-args.log_every:]
            print(f"{label}step {step:5d}  loss {sum(recent) / len(recent):.4f}  "
                  f"({seen / elapsed:,.0f} tokens/s)", flush=True)
    return losses


@torch.no_grad()
def evaluate(model: CharLM, data: torch.Tensor, seq_len: int) -> float:
    """Mean cross-entropy (nats/char) on held-out text, in windows of seq_len."""
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].reshape(n, seq_len)
    y = data[1: n * seq_len + 1].reshape(n, seq_len)
    logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


@torch.no_grad()
def generate(model: CharLM, cell, prompt: torch.Tensor, length: int, temperature: float,
             seed: int) -> list[int]:
    """Read the prompt in one go (`Layer.forward`, i.e. `cell.apply`), then sample `length`
    characters one step at a time with `cell.step`."""
    gen = torch.Generator().manual_seed(seed)
    logits, states = model(prompt[None])
    logits = logits[:, -1]
    out = []
    for _ in range(length):
        probs = F.softmax(logits / temperature, dim=-1)
        c = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (1,)
        out.append(int(c))
        x = model.embed(c)  # (1, embed)
        for i, layer in enumerate(model.layers):
            inputs = {n: v[:, 0] for n, v in layer.project(x[:, None]).items()}  # (1, H) each
            new_state, _ = cell.step(inputs, layer.cell_parameters(), {"h": states[i]})
            states[i] = x = new_state["h"]
        logits = model.head(x)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 1000; 200 with --compare)")
    parser.add_argument("--method", default="auto", choices=("auto", "sequential", "newton"),
                        help="how the layers solve the recurrence (auto: sequential on CPU)")
    parser.add_argument("--compare", action="store_true",
                        help="train twice, with method=newton and method=sequential, from the "
                             "same initialisation and batches; print both loss curves")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--embed", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2, help="heads of the input projection")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--generate", type=int, default=200,
                        help="characters to sample after training (0: none)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch and of the numba kernels (default: all "
                             "cores; 1 can be much faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 200 if args.compare else 1000

    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    cell = paracompile.load(ROOT / "cells" / "paragru.cell")
    text = corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"cell {cell.name} ({cell.structure}); corpus {len(text):,} characters from "
          f"{len(MODULES)} stdlib modules, vocabulary {len(chars)}")
    print(f"model: {args.layers} x {cell.name}Layer(hidden={args.hidden}, "
          f"heads={args.heads}); batch {args.batch} x {args.seq_len} characters; "
          f"{args.steps} steps")

    if args.compare:
        curves = {}
        for method in ("newton", "sequential"):
            model = build(cell, args, len(chars), method)
            start = time.perf_counter()
            curves[method] = train(model, train_data, args, quiet=True)
            rate = args.steps * args.batch * args.seq_len / (time.perf_counter() - start)
            print(f"method={method:10s}: {rate:,.0f} tokens/s")
        print(f"{'step':>5}  {'newton':>10}  {'sequential':>10}  {'|difference|':>12}")
        worst = 0.0
        for step, (a, b) in enumerate(zip(curves["newton"], curves["sequential"], strict=True),
                                      start=1):
            worst = max(worst, abs(a - b))
            if step % args.log_every == 0 or step in (1, args.steps):
                print(f"{step:5d}  {a:10.6f}  {b:10.6f}  {abs(a - b):12.3e}")
        same = worst <= 1e-3
        print(f"max |loss difference| over {args.steps} steps: {worst:.3e} -> "
              f"{'the same loss curve' if same else 'DIFFERENT'}")
        if cell.stats.calls:
            print(f"newton: {cell.stats.calls} forward calls, {cell.stats.iterations} "
                  f"iterations, {cell.stats.fallback_sequences} sequences fell back to "
                  "the sequential kernel")
        if not same:
            raise SystemExit(1)
        return

    model = build(cell, args, len(chars), args.method)
    losses = train(model, train_data, args)
    print(f"loss: first step {losses[0]:.4f} -> last {args.log_every} steps "
          f"{sum(losses[-args.log_every:]) / len(losses[-args.log_every:]):.4f} "
          f"(uniform guess: {math.log(len(chars)):.4f})")
    print(f"validation loss {evaluate(model, val_data, args.seq_len):.4f} nats/char")
    if args.generate:
        prompt = torch.tensor([index.get(c, 0) for c in args.prompt])
        sample = generate(model, cell, prompt, args.generate, args.temperature, args.seed)
        print(f"sample (cell.step, temperature {args.temperature}):")
        print(args.prompt + "".join(chars[i] for i in sample))


if __name__ == "__main__":
    main()

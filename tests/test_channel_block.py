"""The CPU kernels' channel block: a run-time argument (CH) chosen per call by
`_defaults.cpu_channel_block`, the same for every kernel of the call.

Each (sequence, channel block) is one task of the per-channel kernels, and Newton's sequential
fallback reruns whole blocks: the launcher's mask must be laid out with the CH it passes, or
an unconverged channel keeps Newton's iterate (or the kernel reads past the mask). The results
must not depend on CH: forward (sequential and Newton with a partial fallback) and backward
are checked against the torch reference for blocks that divide D, that do not, and that
exceed it.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cast, leaves, make_case, rel_err, shipped

import paracompile
from paracompile import _cpu, _defaults

PACKAGE = Path(paracompile.__file__).parent
B, T, D = 3, 200, 70
# 16: five blocks, the last one short; 64: two, the second short; 128: one, beyond D
BLOCKS = (16, 64, 128)


def test_rule():
    rule = _defaults.cpu_channel_block
    # one thread: the longest block that covers the row (shorter blocks only add overhead)
    assert rule(4, 256, 1) == 256
    assert rule(4, 1024, 1) == 512
    assert rule(4, 70, 1) == 128  # not 512: one block of 70 channels either way
    # two threads at B=4: four tasks already make two per thread
    assert rule(4, 256, 2) == 256
    # 16 threads: as many tasks as possible, but never blocks shorter than 64
    assert rule(4, 256, 16) == 64
    assert rule(64, 1024, 16) == 512
    assert rule(1, 256, 2) == 64
    for b in (1, 2, 4, 64):
        for d in (1, 3, 70, 256, 1000, 4096):
            for threads in (1, 2, 16):
                ch = rule(b, d, threads)
                assert ch in _defaults.CPU_CHANNEL_BLOCKS
                tasks = b * math.ceil(d / ch)
                want = _defaults.CPU_TASKS_PER_THREAD * threads if threads > 1 else 1
                # enough tasks, unless even the shortest block cannot give them
                assert tasks >= want or ch == min(_defaults.CPU_CHANNEL_BLOCKS)
                # no longer than needed for that number of blocks per row
                shorter = [c for c in _defaults.CPU_CHANNEL_BLOCKS if c < ch]
                assert all(math.ceil(d / c) > math.ceil(d / ch) for c in shorter)


def test_the_rule_is_defined_once():
    """Like every default, only `_defaults` defines the channel block rule."""
    names = {"cpu_channel_block", "CPU_CHANNEL_BLOCKS", "CPU_TASKS_PER_THREAD",
             "CHANNEL_BLOCK"}
    for path in PACKAGE.glob("*.py"):
        if path.name == "_defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                assert node.name not in names, (path.name, node.lineno)
            elif isinstance(node, ast.Assign):
                targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
                assert not targets & names, (path.name, node.lineno)


class _Spy(SimpleNamespace):
    """A generated module whose kernels record the CH they were called with (and
    forward_sequential the length of its mask)."""

    def __init__(self, module) -> None:
        super().__init__(calls=[])
        for name in dir(module):
            if name.startswith("__"):
                continue
            value = getattr(module, name)
            if hasattr(value, "py_func"):  # a numba kernel
                value = self._wrap(name, value)
            setattr(self, name, value)

    def _wrap(self, name, kernel):
        params = list(inspect.signature(kernel.py_func).parameters)

        def run(*args):
            bound = dict(zip(params, args, strict=True))
            self.calls.append((name, bound.get("CH"), len(bound.get("mask", ()))))
            return kernel(*args)
        return run


@pytest.fixture
def channel_block(monkeypatch):
    """Set the launcher's channel block (the rule is looked up per call)."""
    def use(ch: int) -> None:
        monkeypatch.setattr(_defaults, "cpu_channel_block", lambda B, D, threads: ch)
    return use


def _args(cell, dtype, scale=1.0, seed=5):
    xs, ps, h0 = make_case(cell, B, T, D, dtype, seed=seed)
    return ([h0[n] for n in cell.states], [scale * xs[n] for n in cell.inputs],
            [scale * ps[n] if cell.params[n] != "matrix" else ps[n] for n in cell.params])


@pytest.mark.parametrize("ch", BLOCKS)
@pytest.mark.parametrize("name", ["paralstm", "elman"])  # per-channel and dense
def test_every_kernel_gets_the_chosen_block(name, ch, channel_block):
    cell = shipped(name)
    spy = _Spy(cell._module("cpu", torch.float64))
    h0s, xs, ps = _args(cell, torch.float64)
    channel_block(ch)
    _cpu.forward(spy, h0s, xs, ps, method="newton", iterations=0)
    states, _, _ = _cpu.forward(spy, h0s, xs, ps, method="newton", iterations=40, chunk=16)
    _cpu.backward(spy, [torch.ones_like(s) for s in states],
                  [None] * len(cell.outputs), h0s, xs, ps, states)
    called = {c[0] for c in spy.calls}
    assert {"forward_sequential", "newton_guess", "newton_linearise", "newton_carry",
            "newton_fixup", "backward_adjoint"} <= called
    assert {c[1] for c in spy.calls} == {ch}
    # per-channel: one mask entry per (sequence, channel block); dense: per sequence
    blocks = 1 if name == "elman" else math.ceil(D / ch)
    assert {c[2] for c in spy.calls if c[0] == "forward_sequential"} == {B * blocks}


def _run(cell, xs, ps, h0, cots, **kw):
    out = cell.apply(xs, ps, h0, **kw)
    loss = sum((out[n] * cots[n].to(out[n].dtype)).sum() for n in out)
    grads = torch.autograd.grad(loss, leaves(xs, ps, h0))
    return [out[n].detach() for n in out], list(grads)


@pytest.mark.parametrize("ch", BLOCKS)
@pytest.mark.parametrize("name", ["paragru", "paralstm", "elman"])
def test_results_match_the_reference_for_any_block(name, ch, channel_block):
    """Forward (sequential; Newton converged; Newton with a partial fallback) and backward
    against the float64 torch reference."""
    cell = shipped(name)
    # inputs and params scaled up: saturated gates, so that one Newton update (and the
    # damped ones) leaves channels unconverged
    xs, ps, h0 = make_case(cell, B, T, D, torch.float64, seed=5)
    scale = 1.0 if name == "elman" else 3.0
    xs = {n: scale * v for n, v in xs.items()}
    ps = {n: v if cell.params[n] == "matrix" else scale * v for n, v in ps.items()}
    g = torch.Generator().manual_seed(7)
    cots = {n: torch.randn(B, T, D, dtype=torch.float64, generator=g)
            for n in (*cell.states, *cell.outputs)}
    ref_out, ref_grads = _run(cell, cast(xs, torch.float64, True), cast(ps, torch.float64, True),
                              cast(h0, torch.float64, True), cots, method="sequential",
                              backend="torch")
    channel_block(ch)
    tol = 50 * torch.finfo(torch.float64).eps * math.sqrt(T)
    runs = {"sequential": dict(method="sequential"),
            "newton": dict(method="newton", iterations=40),
            "fallback": dict(method="newton", iterations=1)}
    for label, kw in runs.items():
        out, grads = _run(cell, cast(xs, torch.float64, True), cast(ps, torch.float64, True),
                          cast(h0, torch.float64, True), cots, backend="cpu", **kw)
        errs = [rel_err(a, b) for a, b in zip(out + grads, ref_out + ref_grads, strict=True)]
        assert max(errs) <= tol, (label, errs, tol)


@pytest.mark.parametrize("ch", BLOCKS)
def test_partial_fallback_reruns_the_right_blocks(ch, channel_block):
    """A few (sequence, channel) pairs do not converge: only their blocks rerun, and the
    result is still the reference's (a mask laid out with another CH would rerun the wrong
    blocks and leave Newton's unconverged iterate in place)."""
    cell = shipped("paralstm")
    module = cell._module("cpu", torch.float64)
    h0s, xs, ps = _args(cell, torch.float64, scale=3.0)
    channel_block(ch)
    states, _, stats = _cpu.forward(module, h0s, xs, ps, method="newton", iterations=3,
                                    chunk=16)
    assert 0 < stats.fallback < B * D / 10, stats  # a few channels, not whole sequences
    ref, _, _ = _cpu.forward(module, h0s, xs, ps, method="sequential")
    tol = 50 * torch.finfo(torch.float64).eps * math.sqrt(T)
    assert max(rel_err(a, b) for a, b in zip(states, ref, strict=True)) <= tol

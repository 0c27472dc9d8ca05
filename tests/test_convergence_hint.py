"""The convergence hint of `paracompile check`: a bound on |∂f/∂h| (the infinity norm of the
k×k block for k states) that must be a true upper bound, checked against the Jacobian that
torch autograd computes through the pure-torch reference at random states, inputs and
parameters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sympy as sp
import torch

import paracompile
from paracompile._analyse import analyse
from paracompile._cli import main
from paracompile._convergence import Hint, convergence_hint
from paracompile._parse import parse_cell

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {p.stem: p.read_text() for p in sorted((ROOT / "cells").glob("*.cell"))}

LEAKY = "cell Leaky\nstate h\ninput x\nh' = 0.5*h + tanh(x)\n"
SQUARE = "cell Square\nstate h\ninput x\nh' = h*h + x\n"
DECAY = ("cell Decay\nstate h\ninput x\nparam a\n"
         "h' = exp(-softplus(a)) * h + x\n")  # a decay in (0, 1) from an unbounded param
CLIPPED = ("cell Clipped\nstate h\ninput x, y\nparam p\n"
           "h' = min(max(p * h + x, -1), 1) + 0.25 * abs(sigmoid(y) * h) + relu(y)\n")
TWO = ("cell Two\nstate a, b\ninput x, y\nparam p, q\n"
       "g = sigmoid(p * b + x)\n"
       "a' = g * a + (1 - g) * tanh(q * a + y)\n"
       "b' = 0.5 * sin(a') + 0.25 * b\n")
SIGMOID = "cell Sig\nstate h\ninput x\nparam p\nh' = sigmoid(p * h + x)\n"  # tight: |p|/4
LOGCELL = "cell Log\nstate h\ninput x\nh' = log(1 + h*h) + x\n"
RECIP = "cell Recip\nstate h\ninput x\nparam p\nh' = h / (1 + p*p) + x\n"  # <= 1
DIVIDE = "cell Divide\nstate h\ninput x\nparam p\nh' = h / p + x\n"  # p may be 0
SMALL = {"recip": RECIP, "divide": DIVIDE, "sigmoid": SIGMOID, "leaky": LEAKY,
         "square": SQUARE, "decay": DECAY, "clipped": CLIPPED, "two": TWO, "log": LOGCELL}
CELLS = {**SHIPPED, **SMALL}


def hint_of(text: str) -> Hint:
    return convergence_hint(analyse(parse_cell(text)))


def mag(name: str) -> sp.Symbol:
    return sp.Symbol(f"|{name}|", nonnegative=True)


def test_numeric_bounds() -> None:
    assert hint_of(LEAKY).line() == "convergence: |dh'/dh| <= 1/2 (a number)"
    assert hint_of(SHIPPED["mingru"]).line() == "convergence: |dh'/dh| <= 1 (a number)"
    assert hint_of(RECIP).line() == "convergence: |dh'/dh| <= 1 (a number)"
    # 2*sqrt(2) is a Mul whose power form 2**(3/2) is that Mul again (once a recursion)
    root = "cell Root\nstate h\ninput x\nh' = 2 * sqrt(2) * tanh(x) + 0.5 * h\n"
    assert hint_of(root).line() == "convergence: |dh'/dh| <= 1/2 (a number)"


def test_bounds_in_terms_of_params() -> None:
    assert hint_of(SHIPPED["indrnn"]).line() == (
        "convergence: |dh'/dh| <= |u| (in terms of |params|)")
    gru = hint_of(SHIPPED["paragru"])
    a_z, a_r, a_h = mag("a_z"), mag("a_r"), mag("a_h")
    assert sp.expand(gru.bound - (1 + a_z / 2 + a_h * (1 + a_r / 4))) == 0
    # the bound needs the state bounded: h stays in [-1, 1] (a convex combination of h and
    # tanh), and the hint says so
    assert gru.box == {"h": (-1, 1)}
    assert gru.line().endswith(
        "(in terms of |params|, for h in [-1, 1]: a box every step maps into itself)")
    # sigmoid' <= 1/4, for any h: h in [0, 1] is invariant but not needed for the bound
    assert hint_of(SIGMOID).line() == "convergence: |dh'/dh| <= |p|/4 (in terms of |params|)"
    decay = hint_of(DECAY)
    assert decay.bound.free_symbols == {mag("a")}
    assert decay.evaluate({"a": 0.0}) == pytest.approx(0.5)
    assert decay.evaluate({"a": 50.0}) <= 1


def test_blocks_use_the_infinity_norm() -> None:
    for name, k in (("paralstm", 2), ("coupled3", 3)):
        line = hint_of(SHIPPED[name]).line()
        assert line.startswith(
            f"convergence: ||J||_inf (max row sum of |entries| of the {k}x{k} block) <= ")
        assert "unknown" not in line
    assert hint_of(SHIPPED["paralstm"]).box == {"c": (-1, 1), "h": (-1, 1)}
    # at zero parameters ParaLSTM's block is [[f, 0], [o*(1 - tanh(c')**2)*f, 0]]: norm <= 1
    assert hint_of(SHIPPED["paralstm"]).evaluate(dict.fromkeys(
        ["a_f", "a_c", "a_o", "c_f", "c_o"], 0.0)) == 1


def test_unknown() -> None:
    assert hint_of(SQUARE).line() == (
        "convergence: unknown (no bound found: the inputs range over all reals and the "
        "states h are not proven bounded)")
    assert hint_of(DIVIDE).bound is None  # 1/p: p ranges over [-|p|, |p|], which holds 0
    assert hint_of(LOGCELL).bound is None  # 2h/(1 + h²) is bounded, but not by these rules
    elman = hint_of(SHIPPED["elman"])
    assert elman.bound is None
    assert elman.line() == (
        "convergence: unknown (dense: the matrix mixes channels, so the Jacobian is not "
        "bounded per channel); its channel-diagonal entry (what quasi-Newton uses): "
        "|dh'/dh| <= |W[c,c]|")


def test_check_prints_the_hint_after_structure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "cells" / "mingru.cell")]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("structure: diagonal")
    assert lines[at + 1] == "convergence: |dh'/dh| <= 1 (a number)"
    assert lines[at + 2].startswith("kernels: ")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_fast_on_shipped_cells(name: str) -> None:
    analysis = analyse(parse_cell(SHIPPED[name]))
    start = time.perf_counter()
    convergence_hint(analysis)
    assert time.perf_counter() - start < 1.0


# -- soundness: the bound is never exceeded -----------------------------------------------------

def _sample(text: str, hint: Hint, d: int, seed: int) -> tuple[dict, dict, dict]:
    """Random parameters (per channel; scalars shared), inputs (wide, with extremes) and
    states (inside the hint's box where it has one, else wide)."""
    g = torch.Generator().manual_seed(seed)
    ir = parse_cell(text)
    params = {}
    for p in ir.params:
        shape = {"vector": (d,), "scalar": (), "matrix": (d, d)}[p.kind]
        params[p.name] = (torch.rand(shape, generator=g, dtype=torch.float64) * 3 - 1.5)
    inputs = {}
    for x in ir.inputs:
        v = torch.randn(1, 1, d, generator=g, dtype=torch.float64) * 4
        v[..., : d // 8] *= 10  # some extreme inputs (saturated gates)
        inputs[x] = v
    h0 = {}
    for s in ir.states:
        if s in hint.box:
            lo, hi = (float(e) for e in hint.box[s])
            h0[s] = lo + (hi - lo) * torch.rand(1, d, generator=g, dtype=torch.float64)
        else:
            h0[s] = torch.randn(1, d, generator=g, dtype=torch.float64) * 3
    return params, inputs, h0


def _jacobian(cell: paracompile.CompiledCell, params: dict, inputs: dict, h0: dict
              ) -> torch.Tensor:
    """(D, k, k): the per-channel block ∂s'_i/∂s_j[c, c], by autograd through one step."""
    states = list(h0)
    leaves = {s: v.clone().requires_grad_(True) for s, v in h0.items()}
    out = cell.apply(inputs, params, leaves, method="sequential", backend="torch")
    d = next(iter(h0.values())).shape[1]
    jac = torch.zeros(d, len(states), len(states), dtype=torch.float64)
    for i, si in enumerate(states):
        if cell.dense:
            for c in range(d):
                grads = torch.autograd.grad(out[si][0, 0, c], [leaves[s] for s in states],
                                            retain_graph=True)
                for j in range(len(states)):
                    jac[c, i, j] = grads[j][0, c]
        else:  # channels are independent: a channel's gradient is its own diagonal entry
            grads = torch.autograd.grad(out[si].sum(), [leaves[s] for s in states],
                                        retain_graph=True)
            for j in range(len(states)):
                jac[:, i, j] = grads[j][0]
    return jac


@pytest.mark.parametrize("name", sorted(CELLS))
def test_bound_is_sound(name: str) -> None:
    text = CELLS[name]
    hint = hint_of(text)
    cell = paracompile.load(text)
    d = 16 if cell.dense else 256
    expr = hint.bound if hint.bound is not None else hint.diagonal
    if expr is None:
        assert "unknown" in hint.line()
        return
    for seed in range(3):
        params, inputs, h0 = _sample(text, hint, d, seed)
        jac = _jacobian(cell, params, inputs, h0)
        # dense: the channel-diagonal entry only; else the infinity norm of the block
        norms = jac[:, 0, 0].abs() if cell.dense else jac.abs().sum(dim=2).amax(dim=1)
        names = sorted(hint.magnitudes)
        at = sp.lambdify([hint.magnitudes[n] for n in names], expr, "math")
        for c in range(d):
            values = {n: float(v if v.dim() == 0 else v[c] if v.dim() == 1 else v[c, c])
                      for n, v in params.items()}
            bound = at(*(abs(values[n]) for n in names))
            assert norms[c] <= bound * (1 + 1e-12) + 1e-12, (name, c, values, norms[c], bound)
        if hint.box:  # the box is invariant: one step from inside it stays inside
            out = cell.apply(inputs, params, h0, method="sequential", backend="torch")
            for s, (lo, hi) in hint.box.items():
                assert float(out[s].min()) >= float(lo) and float(out[s].max()) <= float(hi)

"""Regressions of the analysis and code generation (issue 8).

* user names equal to generated ones (``h_new`` beside a state ``h``, ``t0``, ``u0``, a state
  ``_u0`` in a dense cell, ``F``, ``ONE``, ``math``, ...) give the same answers as a
  hand-written torch loop on every backend and in ``cell.step``;
* a matrix product whose operand depends on another one is a positioned CellError;
* functions of numbers and consts (``max(x, 1)``, ``tanh(1)``) on the torch backend, in
  ``cell.step`` and ``Layer.step``;
* ``where``, ``greater``, ``ties``, ``logsigmoid`` in every backend, including a where()
  whose untaken branch is NaN or inf (no NaN may leak into values or gradients).

Run as a script (``python tests/test_regressions_codegen.py cudasim``, with
NUMBA_ENABLE_CUDASIM=1) it prints the simulated-CUDA errors of the new-function cell.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import sympy as sp
import torch
from conftest import max_rel_err

import paracompile
from paracompile._cli import main as cli_main
from paracompile._printers import KernelPrinter, TorchPrinter, known_functions
from paracompile.functions import (
    greater,
    log,
    logsigmoid,
    sigmoid,
    sqrt,
    tanh,
    ties,
    where,
)
from paracompile.functions import max as max_
from paracompile.functions import min as min_

Tensors = tuple[torch.Tensor, ...]
Step = Callable[[Tensors, Tensors, Tensors], tuple[Tensors, Tensors]]
B, T, D = 2, 5, 3


# -- helpers ----------------------------------------------------------------------------------

def make_data(cell, dtype: torch.dtype = torch.float64, seed: int = 0):
    """(inputs, params, h0) as leaves requiring grad: randn inputs, small params and states."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(shape, dtype=torch.float64, generator=g)).to(dtype)

    xs = {n: rnd(B, T, D).requires_grad_() for n in cell.inputs}
    shapes = {"vector": (D,), "scalar": (), "matrix": (D, D)}
    ps = {n: rnd(*shapes[k], scale=0.3 if k == "matrix" else 0.5).requires_grad_()
          for n, k in cell.params.items()}
    h0 = {n: rnd(B, D, scale=0.5).requires_grad_() for n in cell.states}
    return xs, ps, h0


def loop(step: Step, cell, xs, ps, h0) -> dict[str, torch.Tensor]:
    """Run `step` (tuples in the cell's declaration order) over time: name -> (B, T, D)."""
    s = tuple(h0[n] for n in cell.states)
    p = tuple(ps[n] for n in cell.params)
    hist: list[Tensors] = []
    for t in range(next(iter(xs.values())).shape[1]):
        s, y = step(s, tuple(xs[n][:, t] for n in cell.inputs), p)
        hist.append(tuple(s) + tuple(y))
    columns = zip(*hist, strict=True)
    return {n: torch.stack(seq, 1) for n, seq in zip(cell.states + cell.outputs, columns,
                                                      strict=True)}


def via_step(cell, xs, ps, h0) -> dict[str, torch.Tensor]:
    """`cell.step` called T times."""
    state = dict(h0)
    hist = []
    for t in range(T):
        state, outs = cell.step({n: x[:, t] for n, x in xs.items()}, ps, state)
        hist.append({**state, **outs})
    return {n: torch.stack([h[n] for h in hist], 1) for n in cell.states + cell.outputs}


def run(cell, way: str, xs, ps, h0, method: str = "sequential") -> dict[str, torch.Tensor]:
    if way == "step":
        return via_step(cell, xs, ps, h0)
    return cell.apply(xs, ps, h0, method=method, backend=way)


def values_and_grads(out: dict[str, torch.Tensor], leaves: list[torch.Tensor], seed: int = 5):
    """(outputs in name order, gradients of a random projection of them w.r.t. `leaves`)."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(out)
    loss = sum((out[n] * torch.randn(out[n].shape, dtype=torch.float64, generator=g)
                .to(out[n].dtype)).sum() for n in names)
    return [out[n] for n in names], list(torch.autograd.grad(loss, leaves))


def assert_close(out, ref, leaves, tol: float) -> None:
    assert sorted(out) == sorted(ref)
    v, gv = values_and_grads(out, leaves)
    r, gr = values_and_grads(ref, leaves)
    assert max_rel_err(v, r) <= tol, max_rel_err(v, r)
    assert max_rel_err(gv, gr) <= tol, max_rel_err(gv, gr)


# -- 1. names that collide with generated ones ------------------------------------------------

# every user name here is a name (or a pattern of names) the generators use themselves
COLLIDE = """cell Collide
state h, t0, _u0, F
input x, u0, math, step
param ct_h : scalar
param v_h, np, ONE, torch
h_new = tanh(v_h * h + x)
ZERO = sigmoid(ct_h * t0 + u0)
s_h = h_new * ONE + torch
n_h = ZERO * h
h' = n_h + (1 - ZERO) * s_h
i_h = tanh(h_new + _u0)
t0' = 0.5 * t0 + 0.3 * i_h
_u0' = 0.5 * _u0 + np * h' + 0.1 * step
F' = 0.9 * F + 0.1 * math
output y = h_new + h'
output md0 = F' * t0' + s_h
"""


def collide_ref(states: Tensors, inputs: Tensors, params: Tensors) -> tuple[Tensors, Tensors]:
    h, t0, u, f = states
    x, u0, math_, step = inputs
    ct_h, v_h, np_, one, torch_ = params
    h_new = torch.tanh(v_h * h + x)
    zero = torch.sigmoid(ct_h * t0 + u0)
    s_h = h_new * one + torch_
    h2 = zero * h + (1 - zero) * s_h
    t02 = 0.5 * t0 + 0.3 * torch.tanh(h_new + u)
    u2 = 0.5 * u + np_ * h2 + 0.1 * step
    f2 = 0.9 * f + 0.1 * math_
    return (h2, t02, u2, f2), (h_new + h2, f2 * t02 + s_h)


# a dense cell whose states are named like the analysis' matrix-product symbols
DENSE_COLLIDE = """cell DenseCollide
state _u0, _mdiag0
input x
param W : matrix
param u0
md0 = tanh(W @ _u0 + x)
_u0' = 0.5 * _u0 + 0.5 * md0
_mdiag0' = 0.8 * _mdiag0 + u0 * _u0'
output t0 = md0 * _mdiag0
"""


def dense_collide_ref(states: Tensors, inputs: Tensors, params: Tensors
                      ) -> tuple[Tensors, Tensors]:
    u, mdiag = states
    (x,) = inputs
    w, u0 = params
    md0 = torch.tanh(u @ w.T + x)
    u2 = 0.5 * u + 0.5 * md0
    return (u2, 0.8 * mdiag + u0 * u2), (md0 * mdiag,)


@pytest.mark.parametrize("way", ["cpu", "torch", "step"])
@pytest.mark.parametrize(("source", "ref"), [(COLLIDE, collide_ref),
                                             (DENSE_COLLIDE, dense_collide_ref)],
                         ids=["per-channel", "dense"])
def test_generated_names_never_collide_with_user_names(source: str, ref: Step, way: str) -> None:
    cell = paracompile.load(source)
    xs, ps, h0 = make_data(cell)
    leaves = [*xs.values(), *ps.values(), *h0.values()]
    assert_close(run(cell, way, xs, ps, h0), loop(ref, cell, xs, ps, h0), leaves, 1e-12)


def test_dense_cell_with_state_named_like_the_product_symbol_is_dense() -> None:
    assert paracompile.load(DENSE_COLLIDE).structure == "dense"


# -- 2. chained matrix products ---------------------------------------------------------------

CHAINED = """cell Chained
state h
input x
param W, V : matrix
u = tanh(W @ h + x)
h' = 0.5 * h + tanh(V @ u)
"""
LEM_LIKE = """cell LemLike
state z, h
input x
param Tz, Th : matrix
param a
z' = sigmoid(a * z + Th @ h + x)
h' = (1 - z') * h + z' * tanh(Tz @ z' + x)
"""
NESTED_THROUGH_STATE = """cell Nested
state h
input x
param W, V : matrix
hw = W @ h
g = 2 * hw
h' = tanh(V @ (g + x))
"""


@pytest.mark.parametrize(("source", "line", "message"), [
    (CHAINED, 6, "the operand of V @ ... depends on the matrix product W @ ... (through 'u'); "
                 "chained matrix products are not supported yet"),
    (LEM_LIKE, 7, "the operand of Tz @ ... depends on the matrix product Th @ ... (through "
                  "z'); chained matrix products are not supported yet"),
    (NESTED_THROUGH_STATE, 7, "the operand of V @ ... depends on the matrix product W @ ... "
                              "(through 'g'); chained matrix products are not supported yet"),
], ids=["intermediate", "primed-state", "two-intermediates"])
def test_chained_matrix_products_are_rejected(source: str, line: int, message: str,
                                              tmp_path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(paracompile.CellError) as err:
        paracompile.load(source)
    assert (err.value.line, err.value.column, err.value.message) == (line, 1, message)
    path = tmp_path / "chained.cell"
    path.write_text(source)
    assert cli_main(["check", str(path)]) == 1
    assert capsys.readouterr().err.strip() == f"{path}:{line}:1: error: {message}"


# a matrix product of a primed state that involves no product itself: fine, and dense
PRIMED_OPERAND = """cell PrimedOperand
state z, h
input x
param W : matrix
param a
z' = sigmoid(a * z + x)
h' = 0.5 * h + 0.5 * tanh(W @ z' + x)
"""


def primed_operand_ref(states: Tensors, inputs: Tensors, params: Tensors
                       ) -> tuple[Tensors, Tensors]:
    z, h = states
    (x,) = inputs
    w, a = params
    z2 = torch.sigmoid(a * z + x)
    return (z2, 0.5 * h + 0.5 * torch.tanh(z2 @ w.T + x)), ()


@pytest.mark.parametrize(("way", "method"), [("cpu", "sequential"), ("cpu", "newton"),
                                             ("torch", "sequential")])
def test_product_of_a_primed_state_without_products_is_dense(way: str, method: str) -> None:
    cell = paracompile.load(PRIMED_OPERAND)
    assert cell.structure == "dense"
    xs, ps, h0 = make_data(cell)
    leaves = [*xs.values(), *ps.values(), *h0.values()]
    assert_close(run(cell, way, xs, ps, h0, method), loop(primed_operand_ref, cell, xs, ps, h0),
                 leaves, 1e-10)


# -- 3. functions of numbers and consts in the torch step -------------------------------------

CONSTANTS = """cell Constants
state h
input f, i
param a
const one = 1
h' = max(f * h + i, one) - min(2, tanh(h)) + sigmoid(1) * a
output m = max(h', 0.1) * tanh(1)
output c = tanh(1) + exp(1) * sqrt(2)
output p = a
output q = max(min(0.5, one), relu(1))
"""


@pytest.mark.parametrize("way", ["torch", "step"])
def test_functions_of_numbers_match_the_cpu_backend(way: str) -> None:
    cell = paracompile.load(CONSTANTS)
    xs, ps, h0 = make_data(cell)
    leaves = [*xs.values(), *ps.values(), *h0.values()]
    assert_close(run(cell, way, xs, ps, h0), run(cell, "cpu", xs, ps, h0), leaves, 1e-12)


def test_layer_step_with_functions_of_numbers_matches_the_cpu_layer() -> None:
    cell = paracompile.load(CONSTANTS)
    torch.manual_seed(0)
    layer = cell.Layer(4, D, backend="cpu", dtype=torch.float64)
    x = torch.randn(B, 4, dtype=torch.float64)
    state = torch.randn(B, D, dtype=torch.float64)
    out, new = layer.step(x, state)
    seq_out, final = layer(x[:, None], state)
    params = list(layer.parameters())
    assert new.shape == (B, D) and out.shape == (B, D)
    assert_close({"y": out, "h": new}, {"y": seq_out[:, 0], "h": final}, params, 1e-12)


# -- 4. where, greater, ties, logsigmoid ------------------------------------------------------

def NewFunctions(h, g, x, y, a, b):  # noqa: ANN001, ANN201, N802 - a cell, named as a class
    # log(x) and sqrt(1 - x) are -inf/NaN in the branch where() does not take (x = 0, x > 1)
    up = where(greater(x, 0), log(x), -sqrt(1 - x))
    gate = where(ties(y, 0), 0.25, sigmoid(b * g + y))
    h_new = 0.6 * h + 0.2 * up + 0.1 * logsigmoid(a * h + y) + 0.1 * gate
    g_new = where(greater(h, g), tanh(g + x), 0.5 * g) + max_(min_(y, 1), -1) * greater(y, x)
    return h_new, g_new, where(greater(g, 0), sqrt(g), 0)


NEW_FUNCTIONS_KW = {"states": ("h", "g"), "inputs": ("x", "y"), "params": ("a", "b"),
                    "outputs": ("o",)}


def new_functions_data(dtype: torch.dtype):
    cell = paracompile.cell(**NEW_FUNCTIONS_KW)(NewFunctions)
    xs, ps, h0 = make_data(cell, dtype)
    with torch.no_grad():  # exact zeros: log(0) = -inf in the untaken branch; ties(y, 0) = 1
        xs["x"][:, ::2, 0] = 0.0
        xs["y"][:, 1::2, 1] = 0.0
    return cell, xs, ps, h0


def test_new_functions_structure() -> None:
    cell = paracompile.cell(**NEW_FUNCTIONS_KW)(NewFunctions)
    assert cell.structure == "block(2)"


@pytest.mark.parametrize(("way", "method", "dtype"), [
    ("cpu", "sequential", torch.float64), ("cpu", "newton", torch.float64),
    ("cpu", "sequential", torch.float32), ("step", "sequential", torch.float64),
    ("torch", "newton", torch.float64),
])
def test_new_functions_match_the_torch_reference(way: str, method: str,
                                                 dtype: torch.dtype) -> None:
    cell, xs, ps, h0 = new_functions_data(dtype)
    leaves = [*xs.values(), *ps.values(), *h0.values()]
    out = run(cell, way, xs, ps, h0, method)
    ref = run(cell, "torch", xs, ps, h0)
    v, gv = values_and_grads(out, leaves)
    r, gr = values_and_grads(ref, leaves)
    for t in (*v, *gv, *r, *gr):
        assert torch.isfinite(t).all(), "a NaN or inf leaked from an untaken branch"
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert max_rel_err(v, r) <= tol and max_rel_err(gv, gr) <= tol


def test_torch_reference_of_new_functions_matches_a_hand_written_loop() -> None:
    """The reference itself against plain torch, written with the "double where" (each
    branch evaluated only on safe values), so its gradients are those of the taken branch."""
    cell = paracompile.cell(**NEW_FUNCTIONS_KW)(NewFunctions)
    xs, ps, h0 = make_data(cell)

    def hand(states: Tensors, inputs: Tensors, params: Tensors) -> tuple[Tensors, Tensors]:
        h, g = states
        x, y = inputs
        a, b = params
        pos = x > 0
        up = torch.where(pos, torch.log(torch.where(pos, x, 1.0)),
                         -torch.sqrt(torch.where(pos, 1.0, 1 - x)))
        gate = torch.where(y == 0, 0.25, torch.sigmoid(b * g + y))
        h2 = 0.6 * h + 0.2 * up + 0.1 * torch.nn.functional.logsigmoid(a * h + y) + 0.1 * gate
        g2 = (torch.where(h > g, torch.tanh(g + x), 0.5 * g)
              + y.clamp(max=1).clamp(min=-1) * (y > x).double())
        gp = g > 0
        return (h2, g2), (torch.sqrt(torch.where(gp, g, 1.0)) * gp,)

    leaves = [*xs.values(), *ps.values(), *h0.values()]
    assert_close(run(cell, "torch", xs, ps, h0), loop(hand, cell, xs, ps, h0), leaves, 1e-12)


@pytest.mark.parametrize(("target", "dtype"), [("cpu", "float32"), ("cpu", "float64"),
                                               ("cuda", "float32")])
def test_kernel_printer_prints_new_functions_from_its_table(target: str, dtype: str) -> None:
    x, y, c = (sp.Symbol(n, real=True) for n in "xyc")
    printer = KernelPrinter({x: "s_x", y: "x_y", c: "p_c"}, known_functions(target, dtype))
    softplus = "softplus_f32" if (target, dtype) == ("cpu", "float32") else "softplus_"
    expected_logsigmoid = ("logsigmoid_f32(s_x + x_y)" if softplus == "softplus_f32"
                           else "(-softplus_(-(s_x + x_y)))")
    assert printer.doprint(logsigmoid(x + y)) == expected_logsigmoid
    assert printer.doprint(greater(x, y)) == "(ONE if s_x > x_y else ZERO)"
    assert printer.doprint(ties(x, y)) == "(ONE if s_x == x_y else ZERO)"
    assert printer.doprint(where(c, x, y)) == "(s_x if p_c != ZERO else x_y)"


def test_torch_printer_prints_a_gated_select_and_tensor_arguments() -> None:
    x, c = (sp.Symbol(n, real=True) for n in "xc")
    printer = TorchPrinter({"x": "s_x", "c": "p_c"})
    assert printer.doprint(where(c, log(x), 0)) == (
        "torch.where(_c0, torch.log(_gate(_c0, s_x)), _like.new_tensor(0.0))")
    assert printer.setup == ["_c0 = (p_c) != 0"]
    assert printer.doprint(max_(x, 1)) == "_max(s_x, _like.new_tensor(1.0))"
    assert printer.doprint(sp.sqrt(2) * sp.sqrt(x)) == "1.4142135623730951*torch.sqrt(s_x)"


def _cudasim_errors() -> dict[str, tuple[float, float]]:
    """In the simulator (this process): backend "cuda" vs "torch", per dtype and method."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        cell, xs, ps, h0 = new_functions_data(dtype)
        leaves = [*xs.values(), *ps.values(), *h0.values()]
        r, gr = values_and_grads(run(cell, "torch", xs, ps, h0), leaves)
        for method in ("sequential", "newton"):
            v, gv = values_and_grads(run(cell, "cuda", xs, ps, h0, method), leaves)
            finite = all(bool(torch.isfinite(t).all()) for t in (*v, *gv))
            err = max_rel_err(v, r) if finite else math.inf
            gerr = max_rel_err(gv, gr) if finite else math.inf
            out[f"{str(dtype).split('.')[1]}-{method}"] = (err, gerr)
    return out


@pytest.mark.cudasim
def test_new_functions_in_the_simulated_cuda_kernels(tmp_path) -> None:  # noqa: ANN001
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PARACOMPILE_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, __file__, "cudasim"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for line in proc.stdout.splitlines():
        case, err, gerr = line.split()
        results[case] = (float(err), float(gerr))
    assert len(results) == 4, proc.stdout
    for case, (err, gerr) in results.items():
        tol = 1e-12 if case.startswith("float64") else 2e-5
        assert err <= tol and gerr <= tol, (case, err, gerr)


if __name__ == "__main__" and sys.argv[1:] == ["cudasim"]:
    for name, (e, ge) in _cudasim_errors().items():
        print(name, f"{e:.3e}", f"{ge:.3e}", flush=True)

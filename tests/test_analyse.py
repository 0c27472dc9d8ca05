"""Structure detection (docs/structure.md) and the symbolic derivatives, checked numerically against
torch autograd of the lambdified step."""

from __future__ import annotations

from pathlib import Path

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from sympy.printing.lambdarepr import LambdaPrinter

from paracompile._analyse import Analysis, analyse, is_zero
from paracompile._ir import symbol
from paracompile._parse import parse_cell
from paracompile.functions import cell_functions, sigmoid

CELLS = Path(__file__).resolve().parent.parent / "cells"


def cell(text: str) -> Analysis:
    return analyse(parse_cell(text, "t.cell"))


def shipped(name: str) -> Analysis:
    path = CELLS / f"{name}.cell"
    return analyse(parse_cell(path.read_text(), str(path)))


# -- structure ---------------------------------------------------------------------------------

SHIPPED_STRUCTURES = {
    "paragru": "diagonal",
    "paralstm": "block(2)",
    "mingru": "diagonal",
    "indrnn": "diagonal",
    "elman": "dense",
    "coupled3": "block(3)",
}


def test_every_shipped_cell_is_listed() -> None:
    assert {p.stem for p in CELLS.glob("*.cell")} == set(SHIPPED_STRUCTURES)


@pytest.mark.parametrize(("name", "structure"), SHIPPED_STRUCTURES.items())
def test_structure_of_shipped_cells(name: str, structure: str) -> None:
    a = shipped(name)
    assert a.structure == structure
    assert a.dense == (structure == "dense")
    if structure != "dense":
        size = 1 if structure == "diagonal" else int(structure[6:-1])
        assert a.block_size == size


def test_paralstm_pattern_is_full() -> None:
    a = shipped("paralstm")
    assert a.pattern == ((True, True), (True, True))
    assert a.jac_entries == ((0, 0), (0, 1), (1, 0), (1, 1))


def test_coupled3_pattern_and_closure() -> None:
    a = shipped("coupled3")  # states p, v, m
    assert a.pattern == ((True, True, True), (True, True, True), (True, True, True))
    assert len(a.jac_entries) == 9


def test_mingru_jacobian_is_input_only() -> None:
    a = shipped("mingru")
    assert sp.simplify(a.jacobian[0, 0] - (1 - sigmoid(symbol("x_z")))) == 0


TRICKY = {
    # declared together, never interact
    "declared-together": ("state a, b\ninput x\na' = tanh(a + x)\nb' = sigmoid(b) * x\n",
                          "diagonal", ((True, False), (False, True))),
    # a dependence that cancels symbolically
    "cancels-trivially": ("state a, b\ninput x\na' = a + b - b + x\nb' = b * x\n",
                          "diagonal", ((True, False), (False, True))),
    "cancels-after-expand": ("state a, b\ninput x\na' = a + (b + x)**2 - b**2 - 2*b*x\n"
                             "b' = b * x\n", "diagonal", ((True, False), (False, True))),
    "cancels-trigonometric": ("state a, b\ninput x\na' = a + x * (sin(2*b) - 2*sin(b)*cos(b))\n"
                              "b' = b * x\n", "diagonal", ((True, False), (False, True))),
    "cancels-through-exp": ("state a, b\ninput x\n"
                            "a' = a + x * (tanh(b) - (exp(2*b) - 1) / (exp(2*b) + 1))\n"
                            "b' = b * x\n", "diagonal", ((True, False), (False, True))),
    "cancels-sigmoid": ("state a, b\ninput x\na' = a * x + sigmoid(b) + sigmoid(-b)\n"
                        "b' = b * x\n", "diagonal", ((True, False), (False, True))),
    "cancels-in-intermediate": ("state a, b\ninput x\nu = b * x\nv = u - b * x\n"
                                "a' = tanh(a + v)\nb' = b + x\n",
                                "diagonal", ((True, False), (False, True))),
    "times-zero": ("state a, b\ninput x\na' = a + 0 * b\nb' = b + x\n",
                   "diagonal", ((True, False), (False, True))),
    # coupling through an intermediate
    "through-intermediate": ("state a, b\ninput x\nz = tanh(b)\na' = a * z\nb' = b + x\n",
                             "block(2)", ((True, True), (False, True))),
    # coupling through a primed state
    "through-primed": ("state a, b\ninput x\nb' = b + x\na' = a * b'\n",
                       "block(2)", ((True, True), (False, True))),
    "through-primed-chain": ("state a, b, c\ninput x\nc' = c * x\nb' = b + c'\na' = a + b'\n",
                             "block(3)", ((True, True, True), (False, True, True),
                                          (False, False, True))),
    # a state that does not depend on itself
    "no-self-dependence": ("state a, b\ninput x\na' = x\nb' = b * x\n",
                           "diagonal", ((False, False), (False, True))),
    # two independent 2x2 blocks
    "two-blocks": ("state a, b, c, d\ninput x\na' = a + b\nb' = b * a\nc' = c * d\n"
                   "d' = d + c + x\n", "block(2)",
                   ((True, True, False, False), (True, True, False, False),
                    (False, False, True, True), (False, False, True, True))),
    # matrices: on an input only, cancelled on a state, or acting on a state
    "matrix-on-input": ("state h\ninput x\nparam W : matrix\nh' = tanh(h + W @ x)\n",
                        "diagonal", ((True,),)),
    "matrix-on-params": ("state h\ninput x\nparam W : matrix\nparam b\nh' = h * (W @ (b*b))"
                         " + x\n", "diagonal", ((True,),)),
    "matrix-state-cancels": ("state h\ninput x\nparam W : matrix\nh' = tanh(h + W @ (h - h + x))"
                             "\n", "diagonal", ((True,),)),
    "matrix-product-unused": ("state h\ninput x\nparam W : matrix\nu = W @ h\n"
                              "h' = tanh(h + u - u + x)\n", "diagonal", ((True,),)),
    "matrix-times-zero": ("state h\ninput x\nparam W : matrix\nh' = h + (W @ h) * (x - x)\n",
                          "diagonal", ((True,),)),
    "matrix-on-state": ("state h\ninput x\nparam W : matrix\nh' = tanh(W @ h + x)\n",
                        "dense", ((True,),)),
    "matrix-on-primed": ("state a, b\ninput x\nparam W : matrix\nb' = b + x\n"
                         "a' = a + W @ b'\n", "dense", ((True, True), (False, True))),
    "matrix-on-intermediate": ("state h\ninput x\nparam W : matrix\nz = sigmoid(h)\n"
                               "h' = h + W @ z + x\n", "dense", ((True,),)),
}


@pytest.mark.parametrize(("body", "structure", "pattern"), TRICKY.values(), ids=TRICKY.keys())
def test_structure_of_tricky_cases(
    body: str, structure: str, pattern: tuple[tuple[bool, ...], ...]
) -> None:
    a = cell("cell T\n" + body)
    assert a.structure == structure
    assert a.pattern == pattern


def test_jac_entries_is_the_closure_under_products() -> None:
    # a <- b <- c: one step couples (a, b) and (b, c); two steps also (a, c)
    a = cell("cell T\nstate a, b, c\ninput x\na' = x * b\nb' = c\nc' = c * x\n")
    assert a.pattern == ((False, True, False), (False, False, True), (False, False, True))
    assert a.jac_entries == ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # diagonal included
    assert a.structure == "block(3)"


def test_jac_entries_of_a_diagonal_cell() -> None:
    assert shipped("paragru").jac_entries == ((0, 0),)
    assert cell(TRICKY["no-self-dependence"][0].join(["cell T\n", ""])).jac_entries == (
        (0, 0), (1, 1))


def test_is_zero_is_sound() -> None:
    b = symbol("b")
    assert is_zero(sp.Integer(0))
    assert is_zero(sp.sin(b) ** 2 + sp.cos(b) ** 2 - 1)
    assert not is_zero(b)
    assert not is_zero(sp.sin(b) ** 2 - sp.cos(b) ** 2)
    assert not is_zero(cell_functions()["relu"].build(b) - b)  # zero only for b > 0


def test_new_states_and_outputs_resolve_intermediates_and_primes() -> None:
    a = cell("cell T\nstate c, h\ninput x\nz = sigmoid(x)\nc' = z * c\nh' = tanh(c')\n"
             "output y = h' + c'\n")
    c, x = symbol("c"), symbol("x")
    assert a.new_states == (sigmoid(x) * c, sp.tanh(sigmoid(x) * c))
    assert a.outputs == (sp.tanh(sigmoid(x) * c) + sigmoid(x) * c,)
    # readable folds intermediates and primed states back in, in order
    assert a.readable(a.new_states[1]) == symbol("h'")
    assert a.readable(a.jacobian[1, 0]) == (1 - symbol("h'") ** 2) * symbol("z")


def test_matvec_terms() -> None:
    a = shipped("elman")
    assert a.matrices == ("W",) and len(a.matvecs) == 1
    term = a.matvecs[0]
    assert term.matrix == "W" and term.operand == symbol("h")
    assert a.jacobian[0, 0].has(term.mdiag)


# -- numeric check of the symbolic derivatives against torch autograd --------------------------

def _t(value: object, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype).expand_as(like) if not isinstance(
        value, torch.Tensor) else value.expand_as(like)


def _binary(fn):  # noqa: ANN001, ANN202 - accept Python numbers on either side
    def wrapped(a, b):  # noqa: ANN001, ANN202
        like = a if isinstance(a, torch.Tensor) else b
        return fn(_t(a, like), _t(b, like))
    return wrapped


def _where(c, a, b):  # noqa: ANN001, ANN202 - any of them may be a Python number
    like = next(v for v in (c, a, b) if isinstance(v, torch.Tensor))
    return torch.where(_t(c, like) != 0, _t(a, like), _t(b, like))


TORCH = {
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "relu": torch.relu,
    "step": lambda v: (v > 0).to(v.dtype),
    "abs": torch.abs,
    "sign": torch.sign,
    "min": _binary(torch.minimum),
    "max": _binary(torch.maximum),
    "ties": _binary(lambda a, b: (a == b).to(a.dtype)),
    "greater": _binary(lambda a, b: (a > b).to(a.dtype)),
    "where": lambda c, a, b: _where(c, a, b),
    "logsigmoid": torch.nn.functional.logsigmoid,
    "log1p": torch.log1p,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sin": torch.sin,
    "cos": torch.cos,
}


class _TorchPrinter(LambdaPrinter):
    """Prints every function by name (SymPy would print our `sign` as math.copysign)."""

    def _print_sign(self, expr: sp.Expr) -> str:
        return f"sign({self._print(expr.args[0])})"


def lambdify(symbols: list[sp.Symbol], exprs: list[sp.Expr]):  # noqa: ANN201
    printer = _TorchPrinter({"fully_qualified_modules": False, "inline": True,
                             "allow_unknown_functions": True,
                             "user_functions": {name: name for name in TORCH}})
    fns = [sp.lambdify(symbols, e, modules=[TORCH], printer=printer) for e in exprs]

    def call(values: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_t(fn(*values), values[0]) for fn in fns]

    return call


def check_derivatives(a: Analysis, n: int = 64, seed: int = 0) -> None:
    """∂(new states, outputs)/∂(states, inputs, params) from SymPy == torch autograd."""
    assert not a.dense
    variables = list(a.states + a.inputs + a.params)
    gen = torch.Generator().manual_seed(seed)
    values = [(torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 1.5).requires_grad_()
              for _ in variables]
    results = list(a.new_states) + list(a.outputs)
    forward = lambdify(variables, results)(values)
    for i, (expr, out) in enumerate(zip(results, forward, strict=True)):
        assert torch.isfinite(out).all()
        if out.requires_grad:
            grads = torch.autograd.grad(out.sum(), values, allow_unused=True)
        else:
            grads = (None,) * len(values)
        symbolic = lambdify(variables, [sp.diff(expr, v) for v in variables])(values)
        for j, (v, auto, sym) in enumerate(zip(variables, grads, symbolic, strict=True)):
            auto = torch.zeros(n, dtype=torch.float64) if auto is None else auto
            torch.testing.assert_close(sym.detach(), auto, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, i=i, v=v: f"d result {i} / d {v}: {m}")
            if i < a.k and j < a.k:  # the Jacobian block itself
                jac = lambdify(variables, [a.jacobian[i, j]])(values)[0]
                torch.testing.assert_close(jac.detach(), auto, rtol=1e-10, atol=1e-12)
                if not a.pattern[i][j]:
                    assert (auto == 0).all(), "an entry proven zero is not zero"


@pytest.mark.parametrize("name", [n for n, s in SHIPPED_STRUCTURES.items() if s != "dense"])
def test_derivatives_of_shipped_cells(name: str) -> None:
    check_derivatives(shipped(name))


SYNTHETIC = {
    "every-function": """cell AllFunctions
state a, b
input x, y
param p, q
param s : scalar
const k = 0.5
u = sigmoid(p * a + x) * tanh(q * b - y)
v = exp(-a * a) + log(1 + b * b) + log1p(a * a) + softplus(x - a)
w = relu(a - 0.3 * b) + abs(b - x) + sqrt(1 + a * a * b * b) + sin(a * s) + cos(b * k)
m = min(a, b * y) + max(b, x * a) + silu(a + b)
n = logsigmoid(a - x) + clamp(b, -0.5, 0.5) + where(x > 0, a * b, b)
a' = u + 0.1 * v + 0.2 * w - m ** 2 / 5 + 0.1 * n
b' = b * sigmoid(u) + 0.1 * (a * a + 1) ** -2 + (1 + b * b) ** (3 / 2) / 10
output o = a' * b' + tanh(a' - y) + max(a', 0.25)
output r = relu(b') + abs(x * b')
""",
    "chain-through-primes": """cell Chain
state p, v, m
input x
param w, g
v' = v + 0.1 * (tanh(x - w * w * p - g * v) + 0.1 * m)
p' = p + 0.1 * v'
m' = 0.9 * m + 0.1 * softplus(p')
output e = p' * p' + v' * v'
""",
    "no-self-dependence": """cell Shift
state a, b
input x
param c : scalar
a' = sigmoid(c * b + x)
b' = relu(x) + min(x, 1)
""",
    "matrix-on-input": """cell MatIn
state h
input x
param W : matrix
param a
h' = tanh(a * h + x)
""",
}


@pytest.mark.parametrize("text", SYNTHETIC.values(), ids=SYNTHETIC.keys())
def test_derivatives_of_synthetic_cells(text: str) -> None:
    if "MatIn" in text:  # W unused would warn; the matrix acts on the input
        text = text.replace("tanh(a * h + x)", "tanh(a * h + W @ x)")
    a = cell(text)
    assert a.structure != "dense"
    if a.matvecs:  # u = W @ x is an independent per-channel value: treat it as an input
        a = Analysis(a.ir, a.states, a.inputs + tuple(t.u for t in a.matvecs), a.params,
                     a.matrices, a.matvecs, a.new_states, a.outputs, a.jacobian, a.pattern,
                     a.structure)
    check_derivatives(a, seed=len(text))


def test_every_known_function_is_exercised() -> None:
    text = SYNTHETIC["every-function"]
    assert all(f"{name}(" in text for name in cell_functions())


def test_dense_jacobian_is_the_exact_channel_diagonal() -> None:
    """Elman: the symbolic block with _mdiag = diag(W) equals the diagonal of the full D×D
    autograd Jacobian of h' = tanh(W h + x + b)."""
    a = shipped("elman")
    term = a.matvecs[0]
    gen = torch.Generator().manual_seed(1)
    d = 7
    w = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.5
    h, x, b = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(3))

    def step(hh: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ hh + x + b)

    full = torch.autograd.functional.jacobian(step, h)
    variables = [a.states[0], a.inputs[0], a.params[0], term.u, term.mdiag]
    sym = lambdify(variables, [a.jacobian[0, 0], a.new_states[0]])(
        [h, x, b, w @ h, torch.diagonal(w)])
    torch.testing.assert_close(sym[1], step(h), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sym[0], torch.diagonal(full), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(full, torch.diag(torch.diagonal(full)))  # really dense


def test_new_states_match_hand_written_steps() -> None:
    """The SymPy step of ParaLSTM and ParaGRU equals an independent torch transcription."""
    gen = torch.Generator().manual_seed(2)

    def r() -> torch.Tensor:
        return torch.rand(16, generator=gen, dtype=torch.float64) * 2 - 1

    lstm = shipped("paralstm")
    env = {str(s): r() for s in lstm.states + lstm.inputs + lstm.params}
    c, h = env["c"], env["h"]
    f = torch.sigmoid(env["a_f"] * h + env["c_f"] * c + env["x_f"])
    cn = torch.tanh(env["a_c"] * h + env["x_c"])
    c2 = f * c + (1 - f) * cn
    o = torch.sigmoid(env["a_o"] * h + env["c_o"] * c2 + env["x_o"])
    names = [symbol(n) for n in env]
    got = lambdify(names, list(lstm.new_states))(list(env.values()))
    torch.testing.assert_close(got[0], c2)
    torch.testing.assert_close(got[1], o * torch.tanh(c2))

    gru = shipped("paragru")
    env = {str(s): r() for s in gru.states + gru.inputs + gru.params}
    h = env["h"]
    z = torch.sigmoid(env["a_z"] * h + env["x_z"])
    rr = torch.sigmoid(env["a_r"] * h + env["x_r"])
    hc = torch.tanh(env["a_h"] * (rr * h) + env["x_h"])
    got = lambdify([symbol(n) for n in env], list(gru.new_states))(list(env.values()))
    torch.testing.assert_close(got[0], (1 - z) * h + z * hc)


def test_deep_expression_analyses_quickly() -> None:
    """A derivative that is tiny at every sample point (0.25**15) but too large to simplify is
    reported nonzero (unproven) at once, instead of SymPy simplifying it for minutes."""
    import time

    from paracompile._parse import parse_cell

    inner = "h"
    for _ in range(15):
        inner = f"sigmoid(x - {inner})"
    ir = parse_cell(f"cell Deep\nstate h\ninput x\nh' = x - {inner}\n")
    start = time.perf_counter()
    a = analyse(ir)
    assert time.perf_counter() - start < 20
    assert a.structure == "diagonal" and a.pattern == ((True,),)

"""The `.cell` front end: grammar, IR, every error class with its position, warnings, and
`CellIR.to_source` round trips."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import sympy as sp
from _cell_cases import ERROR_CASES

from paracompile import CellError, CellWarning
from paracompile._analyse import numeric_functions
from paracompile._ir import CellIR, Equation, Init, MatVec, Pos, symbol
from paracompile._parse import parse_cell
from paracompile.functions import cell_functions, log1p, sigmoid

CELLS = sorted((Path(__file__).resolve().parent.parent / "cells").glob("*.cell"))
S = symbol


def parse(text: str) -> CellIR:
    return parse_cell(text, "t.cell")


def eq_exprs(ir: CellIR) -> dict[str, sp.Expr]:
    return {eq.target: eq.expr for eq in ir.equations}


def same_expr(a: sp.Expr, b: sp.Expr) -> bool:
    return a == b or sp.simplify(a - b) == 0


def assert_same_ir(a: CellIR, b: CellIR) -> None:
    assert (a.name, a.states, a.inputs, a.consts) == (b.name, b.states, b.inputs, b.consts)
    assert a.const_values == b.const_values
    assert [(p.name, p.kind, p.init) for p in a.params] == [
        (p.name, p.kind, p.init) for p in b.params]
    assert [(e.target, e.kind) for e in a.equations] == [(e.target, e.kind) for e in b.equations]
    for ea, eb in zip(a.equations, b.equations, strict=True):
        assert same_expr(ea.expr, eb.expr), (ea.target, ea.expr, eb.expr)


# -- statements and IR -------------------------------------------------------------------------

FULL = """\
# a cell using every statement kind
cell FullCell

state c, h                     # two states
input x, y
param a, b                     # default kind: vector, no init
param s : scalar ~ constant(0.5)
param W : matrix ~ normal(0, 1e-2)
param g : vector ~ uniform(-1, .5)
const k = 2.5

z = sigmoid(a * h + x)
c' = z * c + (1 - z) * tanh(W @ h + y)
h' = s * tanh(c') + b * h + g * k
output o = h' * c'
"""


def test_every_statement_kind() -> None:
    ir = parse(FULL)
    assert ir.name == "FullCell" and ir.snake_name == "full_cell"
    assert ir.states == ("c", "h")
    assert ir.inputs == ("x", "y")
    assert [(p.name, p.kind, p.init) for p in ir.params] == [
        ("a", "vector", None),
        ("b", "vector", None),
        ("s", "scalar", Init("constant", (0.5,))),
        ("W", "matrix", Init("normal", (0.0, 0.01))),
        ("g", "vector", Init("uniform", (-1.0, 0.5))),
    ]
    assert ir.param_kinds["W"] == "matrix"
    assert ir.consts == {"k": 2.5}
    assert [(e.target, e.kind) for e in ir.equations] == [
        ("z", "intermediate"), ("c", "update"), ("h", "update"), ("o", "output")]
    assert ir.outputs == ("o",)
    exprs = eq_exprs(ir)
    x, y, a, b, c, h, z, s, g = map(S, ["x", "y", "a", "b", "c", "h", "z", "s", "g"])
    assert exprs["z"] == sigmoid(a * h + x)
    assert exprs["c"] == z * c + (1 - z) * sp.tanh(MatVec(S("W"), h) + y)
    assert exprs["h"] == s * sp.tanh(S("c'")) + b * h + g * sp.Rational(5, 2)  # const folded
    assert exprs["o"] == S("h'") * S("c'")  # outputs may use primed states
    assert ir.source == FULL and ir.filename == "t.cell"


def test_positions_are_kept() -> None:
    ir = parse(FULL)
    assert (ir.positions["c"].line, ir.positions["c"].column) == (4, 7)
    assert (ir.positions["h"].line, ir.positions["h"].column) == (4, 10)
    assert (ir.positions["k"].line, ir.positions["k"].column) == (10, 7)
    assert [(e.pos.line, e.pos.column) for e in ir.equations] == [(12, 1), (13, 1), (14, 1),
                                                                    (15, 8)]
    assert [(p.pos.line, p.pos.column) for p in ir.params][:2] == [(6, 7), (6, 10)]


def test_init_applies_to_every_name_in_the_list() -> None:
    ir = parse("cell A\nstate h\nparam p, q : scalar ~ uniform(-2, -1)\nh' = p * q * h\n")
    assert [(p.name, p.kind, p.init) for p in ir.params] == [
        ("p", "scalar", Init("uniform", (-2.0, -1.0))),
        ("q", "scalar", Init("uniform", (-2.0, -1.0))),
    ]


def test_init_without_kind_and_negative_constant() -> None:
    ir = parse("cell A\nstate h\nparam p ~ constant(-3e-1)\nh' = p * h\n")
    assert ir.params[0].kind == "vector" and ir.params[0].init == Init("constant", (-0.3,))


def test_comments_blank_lines_and_whitespace() -> None:
    text = (
        "\n\n   # leading comment\n"
        "cell   A   # trailing comment\n"
        "\n\t\n"
        "  state h\n"              # indentation is ignored
        "\tinput x # tabbed\n"
        "# between\n\n"
        "h' = h+x#no space before the comment\n"
        "# the end"                # no final newline
    )
    ir = parse(text)
    assert eq_exprs(ir) == {"h": S("h") + S("x")}
    assert (ir.positions["h"].line, ir.positions["h"].column) == (7, 9)


def test_line_continuation() -> None:
    text = "cell A\nstate h\ninput x, \\\n      y\nh' = h + \\\n     x \\   \n     * y\n"
    ir = parse(text)
    assert ir.inputs == ("x", "y")
    assert eq_exprs(ir) == {"h": S("h") + S("x") * S("y")}


def test_windows_line_endings() -> None:
    ir = parse("cell A\r\nstate h\r\ninput x\r\n\r\nh' = h + \\\r\n x\r\n")
    assert eq_exprs(ir) == {"h": S("h") + S("x")}


def test_no_trailing_newline_and_prime_spacing() -> None:
    ir = parse("cell A\nstate h\nh ' = h")
    assert eq_exprs(ir) == {"h": S("h")}


# -- expressions -------------------------------------------------------------------------------

def expr_of(rhs: str, decls: str = "input x, y, z\nparam W : matrix\n") -> sp.Expr:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        return eq_exprs(parse(f"cell A\nstate h\n{decls}h' = {rhs}\n"))["h"]


x, y, z, h = S("x"), S("y"), S("z"), S("h")


@pytest.mark.parametrize(("rhs", "expected"), [
    ("-x**2", -(x**2)),
    ("(-x)**2", x**2),
    ("-x*y", -(x * y)),
    ("x - y - z", x - y - z),
    ("x / y / z", x / (y * z)),
    ("x - -y", x + y),
    ("+x", x),
    ("x**2**3", x**8),  # right associative
    ("x**-1", 1 / x),
    ("x**(1/2)", sp.sqrt(x)),
    ("2*x/4", x / 2),
    ("W @ h + x", MatVec(S("W"), h) + x),
    ("x + W @ h", x + MatVec(S("W"), h)),
    ("W @ h * x", MatVec(S("W"), h) * x),  # '@' binds like '*', from the left
    ("x * (W @ h)", x * MatVec(S("W"), h)),
    ("-(W @ h)", -MatVec(S("W"), h)),
    ("(W) @ h", MatVec(S("W"), h)),
    ("W @ (h * x + y)", MatVec(S("W"), h * x + y)),
    ("tanh(W @ -h)", sp.tanh(MatVec(S("W"), -h))),
    ("max(x, y) - min(h, 1)", cell_functions()["max"].build(x, y)
     - cell_functions()["min"].build(h, 1)),
    ("silu(x)", x * sigmoid(x)),
    ("log1p(x)", log1p(x)),
    ("sqrt(x)", sp.sqrt(x)),
])
def test_precedence_and_calls(rhs: str, expected: sp.Expr) -> None:
    assert expr_of(rhs) == expected


@pytest.mark.parametrize(("number", "value"), [
    ("1e-3", sp.Rational(1, 1000)),
    (".5", sp.Rational(1, 2)),
    ("2.", sp.Integer(2)),
    ("0.1", sp.Rational(1, 10)),  # exact, not the binary float
    ("1E+2", sp.Integer(100)),
    ("2.5e1", sp.Integer(25)),
    ("007", sp.Integer(7)),
])
def test_numbers_are_exact(number: str, value: sp.Expr) -> None:
    assert expr_of(f"{number} * h", "") == value * h


def test_consts_fold_exactly_and_may_be_exponents() -> None:
    expr = expr_of("dt * h ** two", "const dt = 0.1\nconst two = 2\n")
    assert expr == sp.Rational(1, 10) * h**2


def test_every_known_function_parses() -> None:
    for name, f in cell_functions().items():
        args = ", ".join(["h", "x", "y"][:f.arity])
        expected = f.build(*[h, x, y][:f.arity])
        assert expr_of(f"{name}({args})", "input x, y\n") == expected, name


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "line", "column", "fragments"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_have_position_and_message(
    text: str, line: int, column: int, fragments: tuple[str, ...]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)  # only the error matters here
        with pytest.raises(CellError) as info:
            parse_cell(text, "bad.cell")
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)
    assert err.filename == "bad.cell"
    assert str(err) == f"bad.cell:{line}:{column}: error: {err.message}"
    assert "\n" not in str(err)


def test_cell_error_is_picklable() -> None:
    with pytest.raises(CellError) as info:
        parse("cell A\nstate h\nh' = hh\n")
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.line, again.column, again.message, again.filename) == (
        3, 6, info.value.message, "t.cell")


def test_error_is_reported_before_unused_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CellError):
            parse("cell A\nstate h\ninput x\n")
    assert not caught


# -- warnings ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("decl", "use", "where", "what"), [
    ("input u\n", "h", "3:7", "input 'u'"),
    ("param p\n", "h", "3:7", "param 'p'"),
    ("param M : matrix\n", "h", "3:7", "param 'M'"),
    ("const k = 1\n", "h", "3:7", "const 'k'"),
    ("z = h\n", "h", "3:1", "intermediate 'z'"),
])
def test_unused_declaration_warns(decl: str, use: str, where: str, what: str) -> None:
    with pytest.warns(CellWarning) as record:
        ir = parse(f"cell A\nstate h\n{decl}h' = {use}\n")
    assert ir.states == ("h",)
    messages = [str(w.message) for w in record]
    assert messages == [f"t.cell:{where}: warning: {what} is never used"]


def test_used_declarations_do_not_warn() -> None:
    # filterwarnings = error: any warning would fail this test
    parse("cell A\nstate h\ninput x\nparam M : matrix\nconst k = 1\nz = k * x\n"
          "h' = M @ h + z\noutput y = h'\n")


def test_several_unused_declarations_warn_in_order() -> None:
    with pytest.warns(CellWarning) as record:
        parse("cell A\nstate h\ninput u, v\nparam p\nh' = h\n")
    assert [str(w.message).split("warning: ")[1] for w in record] == [
        "input 'u' is never used", "input 'v' is never used", "param 'p' is never used"]


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CELLS, ids=[p.stem for p in CELLS])
def test_round_trip_of_shipped_cells(path: Path) -> None:
    ir = parse_cell(path.read_text(), str(path))
    text = ir.to_source()
    again = parse_cell(text, "round-trip.cell")
    assert_same_ir(ir, again)
    assert again.to_source() == text  # printing is a fixed point


ROUND_TRIP_CELLS = [
    FULL,
    # every function, negative and fractional numbers, powers, matrix products in context
    """cell Everything
state a, b
input x, y
param p : scalar ~ normal(-1, 0.25)
param W : matrix
param q
const half = 0.5
const neg = -0.125
u = sigmoid(p * a) + tanh(b) + exp(-a) + log(1 + b * b) + log1p(a * a) + softplus(x)
v = relu(a - b) + abs(b) + sqrt(1 + x * x) + sin(a) + cos(b) + min(a, x) + max(b, y)
w = silu(a) + a ** -2 + b ** (3 / 2) + x ** half + 1e-3 * y / 7 + neg * q
a' = u * v - w + 2 * (W @ (a * x)) - W @ b / 3 + (W @ a) ** 2 - (W @ a)
b' = -(W @ (b + y)) + half * b + exp(1) * a'
output o = a' / (1 + b' * b')
""",
    # const used only inside another number's neighbourhood
    "cell C\nstate h\nconst k = 3\nh' = -k * h + k\n",
    # comparisons, where, clamp, logsigmoid, constant expressions
    """cell Gates
state h, c
input x, y
param a
const third = 1/3
const e2 = 2 * exp(1) + third
const s = sigmoid(third)
g = where(x > 0, tanh(a * h), -h) + clamp(c, -1, third) + logsigmoid(y)
m = (x < y) + (x >= h) - (h <= c) + (x == y) * (x != c) + where(y, 1, 2) * third
h' = g * (h > c) + e2 * m + s
c' = where(c - h, c ** third, e2 * c) + clamp(x, y, 1.5)
output o = (h' > c') * h'
""",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CELLS)
def test_round_trip_of_synthetic_cells(text: str) -> None:
    ir = parse(text)
    printed = ir.to_source()
    assert_same_ir(ir, parse_cell(printed, "round-trip.cell"))


def test_to_source_format() -> None:
    ir = parse("cell Elm\nstate h\ninput x\nparam W : matrix ~ normal(0, 0.05)\nconst dt = 0.1\n"
               "z = -(W @ h)\nh' = h + dt * tanh(2 * (W @ h) + z + x)\noutput y = h'\n")
    text = ir.to_source()
    lines = [line for line in text.splitlines() if line]
    assert lines[:5] == ["cell Elm", "state h", "input x", "param W : matrix ~ normal(0.0, 0.05)",
                         "const dt = 0.1"]
    assert lines[5] == "z = -(W @ (h))"
    assert lines[6].startswith("h' = ") and "dt*" in lines[6] and "2*(W @ (h))" in lines[6]
    assert lines[7] == "output y = h'"
    assert text.endswith("\n")


def traced_ir(expr: sp.Expr) -> CellIR:
    """An IR as the Python frontend builds it (no source text, SymPy's own functions)."""
    return CellIR("T", ("h",), ("x",), (), {}, (Equation("h", "update", expr, Pos(1, 1)),))


def test_to_source_of_a_traced_ir_with_floats() -> None:
    ir = traced_ir(sp.Float(0.1) * h + sp.Abs(x) + sp.Max(x, 1) + sp.Min(x, h, 2))
    text = ir.to_source()
    assert "0.1*h" in text and "abs(x)" in text and "max(" in text
    assert "3.141592653589793*h" in traced_ir(sp.pi * h).to_source()  # as a float
    assert "exp(1)*h" in traced_ir(sp.E * h).to_source()
    again = parse_cell(text, "t.cell").equations[0].expr
    assert sp.Rational(1, 10) * h in again.args  # the float 0.1 read back as the decimal 0.1
    original = sp.lambdify([x, h], ir.equations[0].expr, "math")
    printed = sp.lambdify([x, h], again, [numeric_functions(), "math"])
    for point in [(0.3, -1.2), (-2.0, 5.0), (1.5, 0.25), (3.0, 2.5)]:
        assert printed(*point) == pytest.approx(original(*point), rel=1e-15)


def test_to_source_of_new_constructs() -> None:
    ir = parse("cell G\nstate h\ninput x\nconst k = 1/3\nconst c = 2 * k + exp(1)\n"
               "h' = where(x > k, h, c * h) + (x <= 0) + clamp(h, -1, 1)\n")
    text = ir.to_source()
    assert "const k = 1/3" in text and "const c = 2/3 + exp(1)" in text
    assert "(k > x)" not in text and "where((x > k), h, c*h)" in text
    assert "-(x > 0)" in text and "min(max(h, -1), 1)" in text
    again = parse_cell(text, "t.cell")  # filterwarnings = error: every const is used
    assert again.const_values == ir.const_values and again.consts == ir.consts
    assert again.equations[0].expr == ir.equations[0].expr
    assert again.to_source() == text


def test_to_source_refuses_what_the_language_cannot_say() -> None:
    from paracompile.functions import step

    with pytest.raises(ValueError, match="step"):
        traced_ir(step(h)).to_source()
    with pytest.raises(ValueError, match="infinity"):
        traced_ir(sp.oo * h).to_source()

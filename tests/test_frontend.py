"""The Python frontend (docs/api.md): `trace` gives the same IR meaning as the `.cell` text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sympy as sp

from paracompile import CellError
from paracompile._analyse import Analysis, analyse
from paracompile._frontend import trace
from paracompile._parse import parse_cell
from paracompile.functions import clamp, greater, logsigmoid, relu, sigmoid, tanh, where

CELLS = Path(__file__).resolve().parent.parent / "cells"


def from_file(name: str) -> Analysis:
    path = CELLS / f"{name}.cell"
    return analyse(parse_cell(path.read_text(), str(path)))


def assert_same_meaning(traced: Analysis, parsed: Analysis) -> None:
    assert traced.structure == parsed.structure
    assert traced.pattern == parsed.pattern
    assert traced.states == parsed.states and traced.inputs == parsed.inputs
    assert traced.params == parsed.params and traced.matrices == parsed.matrices
    for a, b in zip(traced.new_states + traced.outputs, parsed.new_states + parsed.outputs,
                    strict=True):
        assert sp.simplify(a - b) == 0, (a, b)
    assert sp.simplify(traced.jacobian - parsed.jacobian) == sp.zeros(*parsed.jacobian.shape)


def MinGRU(h, x_z, x_h):  # noqa: ANN001, ANN201, N802 - a cell, named as a class
    z = sigmoid(x_z)
    return (1 - z) * h + z * x_h


def ParaLSTM(c, h, x_f, x_c, x_o, a_f, a_c, a_o, c_f, c_o):  # noqa: ANN001, ANN201, N802
    f = sigmoid(a_f * h + c_f * c + x_f)
    cn = tanh(a_c * h + x_c)
    c_new = f * c + (1 - f) * cn
    o = sigmoid(a_o * h + c_o * c_new + x_o)
    return c_new, o * tanh(c_new)


def Elman(h, x, W, b):  # noqa: ANN001, ANN201, N802
    return tanh(W @ h + x + b)


def test_mingru_matches_the_cell_file() -> None:
    ir = trace(MinGRU, states="h", inputs=("x_z", "x_h"))
    assert ir.name == "MinGRU" and ir.states == ("h",) and ir.inputs == ("x_z", "x_h")
    assert ir.params == () and ir.source == "" and ir.filename == __file__
    assert [(e.target, e.kind) for e in ir.equations] == [("h", "update")]
    assert_same_meaning(analyse(ir), from_file("mingru"))


def test_lstm_like_cell_with_tuple_return() -> None:
    ir = trace(ParaLSTM, states=("c", "h"), inputs=("x_f", "x_c", "x_o"),
               params=("a_f", "a_c", "a_o", "c_f", "c_o"))
    a = analyse(ir)
    assert a.structure == "block(2)"
    assert_same_meaning(a, from_file("paralstm"))


def test_list_return_is_accepted() -> None:
    ir = trace(lambda c, h, x: [c * x, h + c], states=("c", "h"), inputs="x", name="L")
    assert ir.name == "L" and analyse(ir).structure == "block(2)"


def test_matrix_param_via_matmul() -> None:
    ir = trace(Elman, states="h", inputs="x", params={"W": "matrix", "b": "vector"})
    assert ir.param_kinds == {"W": "matrix", "b": "vector"}
    a = analyse(ir)
    assert a.structure == "dense"
    assert_same_meaning(a, from_file("elman"))


def test_scalar_param_and_outputs() -> None:
    def Leaky(h, x, lam):  # noqa: ANN001, ANN202, N802
        new = lam * h + (1 - lam) * relu(x)
        return new, new * new

    ir = trace(Leaky, states="h", inputs="x", params={"lam": "scalar"}, outputs="energy")
    assert ir.outputs == ("energy",)
    text = "cell Leaky\nstate h\ninput x\nparam lam : scalar\nh' = lam*h + (1 - lam)*relu(x)\n" \
           "output energy = h' * h'\n"
    assert_same_meaning(analyse(ir), analyse(parse_cell(text, "leaky.cell")))


def test_traced_ir_round_trips_through_cell_text() -> None:
    ir = trace(ParaLSTM, states=("c", "h"), inputs=("x_f", "x_c", "x_o"),
               params=("a_f", "a_c", "a_o", "c_f", "c_o"))
    again = parse_cell(ir.to_source(), "traced.cell")
    assert_same_meaning(analyse(again), analyse(ir))
    ir = trace(Elman, states="h", inputs="x", params={"W": "matrix", "b": "vector"})
    assert "W @ (h)" in ir.to_source()
    assert_same_meaning(analyse(parse_cell(ir.to_source(), "t.cell")), analyse(ir))


def Gated(h, x, a):  # noqa: ANN001, ANN201, N802
    g = where(x > 0, tanh(a * h), -h) + clamp(h, -1, 1) + logsigmoid(x) * greater(h, x)
    return g + where(sp.Eq(x, 1), 1, 0), x <= h


def test_comparisons_where_clamp_logsigmoid_match_the_cell_language() -> None:
    traced = trace(Gated, states="h", inputs="x", params="a", outputs="y")
    parsed = parse_cell("cell Gated\nstate h\ninput x\nparam a\n"
                        "g = where(x > 0, tanh(a * h), -h) + clamp(h, -1, 1) + logsigmoid(x) "
                        "* (h > x)\nh' = g + where(x == 1, 1, 0)\noutput y = x <= h\n")
    parsed_values = {e.target: e.expr for e in parsed.equations}
    g = parsed_values.pop("g")
    parsed_values["h"] = parsed_values["h"].subs(sp.Symbol("g", real=True), g)
    assert {e.target: e.expr for e in traced.equations} == parsed_values
    assert parse_cell(traced.to_source(), "t.cell").equations[1].expr == parsed_values["y"]


# -- errors ------------------------------------------------------------------------------------

def test_wrong_number_of_returned_values() -> None:
    with pytest.raises(CellError, match=r"returned 1 value\(s\); expected 2: the new c, h") as e:
        trace(lambda c, h, x: c * h, states=("c", "h"), inputs="x")
    assert e.value.line >= 1 and e.value.column == 1
    with pytest.raises(CellError, match=r"returned 3 value\(s\); expected 2.*outputs y"):
        trace(lambda h, x: (h, x, x), states="h", inputs="x", outputs="y")


def test_matrix_used_elementwise() -> None:
    with pytest.raises(CellError, match=r"matrix W cannot be used elementwise; only as 'W @ expr'"):
        trace(lambda h, W: tanh(W * h), states="h", params={"W": "matrix"})
    with pytest.raises(CellError, match="matrix W cannot be used elementwise"):
        trace(lambda h, W: h + W @ W, states="h", params={"W": "matrix"})


def test_matrix_product_from_the_right_is_an_error() -> None:
    with pytest.raises(CellError, match=r"cannot be traced.*'W @ expr'"):
        trace(lambda h, W: h @ W, states="h", params={"W": "matrix"})


def test_nested_matrix_products() -> None:
    with pytest.raises(CellError, match="nested matrix products"):
        trace(lambda h, W: W @ tanh(W @ h), states="h", params={"W": "matrix"})


def test_math_functions_on_symbols() -> None:
    with pytest.raises(CellError, match="paracompile.functions"):
        trace(lambda h: math.tanh(h), states="h")


def test_signature_must_match_the_declared_names() -> None:
    with pytest.raises(CellError, match=r"must take .* in this order: \(h, x, a\)"):
        trace(lambda h, x: h * x, states="h", inputs="x", params="a")


def test_returned_value_must_be_an_expression() -> None:
    with pytest.raises(CellError, match="'h' is not an expression"):
        trace(lambda h: "h + 1", states="h")
    with pytest.raises(CellError, match="'h' is not an expression"):
        trace(lambda h: None, states="h")


def test_foreign_symbols_are_rejected() -> None:
    with pytest.raises(CellError, match="uses q, which is not one of the traced arguments"):
        trace(lambda h: h + sp.Symbol("q", real=True), states="h")
    with pytest.raises(CellError, match="uses h, which is not"):  # same name, other assumptions
        trace(lambda h: sp.Symbol("h") * 2, states="h")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"params": {"W": "tensor"}}, ValueError, "kind must be one of"),
    ({"params": {"W": "Matrix"}}, ValueError, "'Matrix'"),
    ({"inputs": ("x", 3)}, TypeError, "inputs: expected names"),
    ({"inputs": "not a name"}, TypeError, "inputs: expected names"),
    ({"params": {"1a": "vector"}}, TypeError, "params: expected names"),
    ({"inputs": "tanh"}, ValueError, "'tanh' is a built-in function"),
    ({"params": "state"}, ValueError, "'state' is a built-in function or keyword"),
    ({"states": ()}, ValueError, "at least one state"),
    ({"inputs": "h"}, CellError, r"names declared twice: \['h'\]"),
])
def test_bad_declarations(kwargs: dict, error: type[Exception], message: str) -> None:
    def fn(*args):  # noqa: ANN001, ANN202
        return args[0]

    kwargs = {"states": "h", **kwargs}
    with pytest.raises(error, match=message):
        trace(fn, **kwargs)

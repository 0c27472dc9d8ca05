"""Regressions of the `.cell` front end: the new syntax (comparisons, where, clamp, logsigmoid,
const expressions), non-finite numbers refused at parse time, and the size limits (no hang,
no RecursionError, downstream included)."""

from __future__ import annotations

import gc
import time
import warnings

import pytest
import sympy as sp

import paracompile
from paracompile import CellError, CellWarning
from paracompile._analyse import analyse
from paracompile._ir import CellIR, symbol
from paracompile._parse import (
    MAX_CELL_OPS,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_OPS,
    MAX_PARENS,
    parse_cell,
)
from paracompile.functions import (
    clamp,
    greater,
    logsigmoid,
    relu,
    sigmoid,
    softplus,
    ties,
    where,
)
from paracompile.functions import max as max_
from paracompile.functions import min as min_

h, x, y = symbol("h"), symbol("x"), symbol("y")
HEAD = "cell A\nstate h\ninput x, y\n"


def parse(body: str) -> CellIR:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        return parse_cell(HEAD + body, "t.cell")


def update(rhs: str, decls: str = "") -> sp.Expr:
    return parse(f"{decls}h' = {rhs}\n").equations[-1].expr


def error(body: str, head: str = HEAD, limit_s: float = 1.0) -> CellError:
    """The CellError of `body`, which must come within `limit_s` seconds."""
    # a full collection now, so that the window times the parse and not a collection of the
    # test session's heap (a full suite once measured 1.2 s here for a 0.05 s parse)
    gc.collect()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellWarning)
        with pytest.raises(CellError) as info:
            parse_cell(head + body, "t.cell")
    elapsed = time.perf_counter() - start
    assert elapsed < limit_s, f"took {elapsed:.2f} s: {info.value}"
    return info.value


# -- comparisons, where, clamp, logsigmoid ----------------------------------------------------

@pytest.mark.parametrize(("rhs", "expected"), [
    ("x > y", greater(x, y)),
    ("x < y", greater(y, x)),
    ("x >= y", 1 - greater(y, x)),
    ("x <= y", 1 - greater(x, y)),
    ("x == y", ties(x, y)),
    ("x != y", 1 - ties(x, y)),
    ("x + 1 > y * 2", greater(x + 1, 2 * y)),  # comparisons bind loosest
    ("(x > 0) * h", greater(x, 0) * h),
    ("(x < y) < 1", greater(1, greater(y, x))),  # parenthesised, a comparison of a 0/1 value
    ("where(x > 0, h, -h)", where(greater(x, 0), h, -h)),
    ("where(x, h, y)", where(x, h, y)),
    ("clamp(h, -1, 1)", min_(max_(h, -1), 1)),
    ("logsigmoid(x)", logsigmoid(x)),
    ("where(1 > 0, h, x)", h),  # numbers compare when parsed
    ("where(x * 0, h, x)", x),
])
def test_new_syntax(rhs: str, expected: sp.Expr) -> None:
    assert update(rhs) == expected


def test_derivatives_of_the_new_functions() -> None:
    assert sp.diff(greater(x, h), h) == 0
    assert sp.diff(ties(x, h), h) == 0
    assert sp.diff(logsigmoid(h), h) == sigmoid(-h)
    d = sp.diff(where(greater(x, 0), h**2, 3 * h), h)  # the taken branch's derivative
    assert d == 2 * h * where(greater(x, 0), 1, 0) + 3 * where(greater(x, 0), 0, 1)
    assert sp.diff(where(h, x, y), h) == 0


def test_new_functions_evaluate_at_numbers() -> None:
    assert float(logsigmoid(2).evalf()) == pytest.approx(-float(softplus(-2).evalf()))
    assert logsigmoid(0) == -sp.log(2)
    assert greater(2, 1) == 1 and greater(1, 1) == 0 and greater(x, 1) != 0
    assert where(0, x, y) == y and where(3, x, y) == x
    assert float(clamp(5, 0, 1).evalf()) == 1.0


def test_chained_comparison_asks_for_parentheses() -> None:
    err = error("h' = x < h <= y\n")
    assert (err.line, err.column) == (4, 12)
    assert "comparisons do not chain" in err.message and "parentheses" in err.message


def test_greater_is_not_callable_from_a_cell() -> None:
    err = error("h' = greater(h, x)\n")
    assert "unknown function 'greater'" in err.message


def test_new_function_names_are_reserved() -> None:
    for name in ("where", "clamp", "logsigmoid"):
        assert "built-in function" in error(f"input {name}\nh' = h\n").message


def test_where_needs_three_arguments() -> None:
    assert "where() takes 3 arguments, got 2" in error("h' = where(x, h)\n").message


# -- const expressions ------------------------------------------------------------------------

def test_const_expressions_are_exact() -> None:
    ir = parse("const k = 1/3\nconst c = 2 * k + exp(1)\nconst n = -k ** 2\n"
               "h' = k * h + c * x + n\n")
    assert ir.consts == pytest.approx({"k": 1 / 3, "c": 2 / 3 + 2.718281828459045, "n": -1 / 9})
    assert ir.const_values == {"k": sp.Rational(1, 3), "c": sp.Rational(2, 3) + sp.E,
                               "n": -sp.Rational(1, 9)}
    assert ir.equations[0].expr == h / 3 + (sp.Rational(2, 3) + sp.E) * x - sp.Rational(1, 9)


def test_const_of_cell_functions_and_comparisons() -> None:
    ir = parse("const a = sigmoid(0)\nconst b = where(a > 0.25, 2, 3)\nconst c = relu(-1)\n"
               "h' = a * b * h + c * x\n")
    assert ir.consts == {"a": 0.5, "b": 2.0, "c": 0.0}  # relu(-1) evaluated as a float
    assert ir.equations[0].expr == h + relu(-1) * x  # ... and kept exact


@pytest.mark.parametrize(("body", "column", "fragment"), [
    ("const k = h\nh' = k * h\n", 11, "not a state 'h'"),
    ("const k = 2 * x\nh' = k * h\n", 15, "not an input 'x'"),
    ("param p\nconst k = p\nh' = k * h * p\n", 11, "not a param 'p'"),
    ("z = h\nconst k = z\nh' = k * z\n", 11, "not an intermediate 'z'"),
    ("h' = h\nconst k = h'\n", 11, "not h'"),
])
def test_const_uses_only_numbers_and_consts(body: str, column: int, fragment: str) -> None:
    err = error(body)
    assert err.column == column and fragment in err.message
    assert "can only use numbers and earlier consts" in err.message


def test_const_may_not_use_itself() -> None:
    assert "'k' is used before it is defined" in error("const k = k + 1\nh' = k * h\n").message


# -- non-finite numbers -----------------------------------------------------------------------

@pytest.mark.parametrize(("body", "line", "column", "fragment"), [
    ("h' = x / 0\n", 4, 10, "division by zero"),
    ("h' = 0 / 0 + h\n", 4, 10, "division by zero"),
    ("h' = x / (h - h)\n", 4, 11, "division by zero: 'h - h' is 0"),
    ("h' = x / (2 / (1 - 1))\n", 4, 16, "division by zero"),
    ("h' = log(0) * h\n", 4, 6, "'log(0)' is not a finite number"),
    ("h' = sqrt(-1) + h\n", 4, 6, "'sqrt(-1)' is complex"),
    ("h' = h + log(-2 * 3)\n", 4, 10, "complex"),
    ("h' = h * (-8) ** (1/3)\n", 4, 10, "complex"),
    ("h' = 1e400 * h\n", 4, 6, "too large"),
    ("const z = 0\nh' = h * z ** -1\n", 5, 10, "division by zero"),
    ("const z = 0\nh' = h / z\n", 5, 10, "division by zero: 'z' is 0"),
    ("const k = log(-1)\nh' = k * h\n", 4, 11, "'log(-1)' is complex"),
    ("const k = 1 / 0\nh' = k * h\n", 4, 15, "division by zero"),
    ("const a = 1e300\nconst b = a * a\nh' = b * h\n", 5, 11, "beyond the range of a float"),
    ("h' = exp(1000) * h\n", 4, 6, "'exp(1000)' is beyond the range of a float"),
    ("h' = tanh(exp(exp(exp(1000)))) * h\n", 4, 19, "'exp(1000)'"),
    ("h' = (h ** 40) ** 2\n", 4, 6, "power 80 of a variable"),
])
def test_non_finite_numbers_are_refused_where_they_arise(
        body: str, line: int, column: int, fragment: str) -> None:
    err = error(body)
    assert (err.line, err.column) == (line, column), err.message
    assert fragment in err.message, err.message


def test_non_finite_numbers_fail_load_before_any_code_generation() -> None:
    for body in ("h' = x / 0\n", "const k = log(0)\nh' = k * h\n"):
        start = time.perf_counter()
        with pytest.raises(CellError):
            paracompile.load(HEAD + body)
        assert time.perf_counter() - start < 1.0


# -- limits: no hang, no RecursionError -------------------------------------------------------

@pytest.mark.parametrize(("rhs", "fragment"), [
    ("1e99999999 * h", "too large for a float"),
    ("1e-99999999 * h", "too small for a float"),
    ("2 ** 3 ** 4 ** 5 * h", "number too large"),
    ("(2 * 3) ** 1e300 * h", "number too large"),
    ("(2 * h) ** 1e400", "too large for a float"),
    ("h ** 1e300", f"exponent too large: |1e300| > {MAX_EXPONENT}"),
    ("h ** -65", f"> {MAX_EXPONENT}"),
    ("(1 + 1e-300) ** 1e300 * h", "too large to compute exactly"),
    ("0.5 ** 5000 * h", "number too small"),
    ("1" * 5000 + " * h", "number too long: 5000 characters, limit 100"),
])
def test_huge_numbers_fail_fast(rhs: str, fragment: str) -> None:
    assert fragment in error(f"h' = {rhs}\n").message


def test_long_sum_is_flattened_and_analysed() -> None:
    start = time.perf_counter()
    ir = parse("h' = " + " + ".join(["x"] * 990) + " - h\n")
    assert ir.equations[0].expr == 990 * x - h
    right = parse("h' = " + "x + (" * 150 + "h" + ")" * 150 + "\n")  # parenthesised chain
    assert right.equations[0].expr == 150 * x + h
    products = parse("h' = " + " * ".join(["x"] * 60) + " / h / y\n")
    assert products.equations[0].expr == x**60 / (h * y)
    assert analyse(ir).structure == "diagonal"
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("n", [MAX_DEPTH + 1, 100, MAX_PARENS])
def test_deep_nesting_is_a_cell_error(n: int) -> None:
    err = error("h' = " + "tanh(" * n + "h" + ")" * n + "\n")
    assert f"expression nested too deeply: depth {MAX_DEPTH + 1}, limit {MAX_DEPTH}" in (
        err.message)
    assert err.line == 4


@pytest.mark.parametrize("n", [MAX_PARENS + 1, 1000, 100_000])
def test_deep_parentheses_fail_at_once(n: int) -> None:
    err = error("# (((\nh' = " + "(" * n + "h" + ")" * n + "\n", limit_s=0.5)
    assert err.message == f"parentheses nested too deeply: depth {MAX_PARENS + 1}, limit 200"
    assert (err.line, err.column) == (5, 6 + MAX_PARENS)
    assert "nested too deeply" in error("h' = " + "tanh(" * n + "h" + ")" * n + "\n").message
    redundant = "(" * MAX_PARENS + "h" + ")" * MAX_PARENS  # redundant: depth 1
    assert update(f"{redundant} + x") == h + x


def test_deep_parentheses_and_negations() -> None:
    assert "nested too deeply" in error("h' = " + "-" * 5000 + "h\n").message
    # a parenthesised '*' chain is one level, but each divisor is one deeper
    assert "nested too deeply" in error("h' = " + "x / (" * 150 + "h" + ")" * 150 + "\n").message
    assert update("x * (" * 30 + "h" + ")" * 30) == x**30 * h


def test_depth_counts_the_intermediates_used() -> None:
    lines = ["z0 = h"] + [f"z{i} = tanh(z{i - 1})" for i in range(1, MAX_DEPTH + 2)]
    err = error("\n".join(lines) + f"\nh' = z{MAX_DEPTH + 1}\n")
    assert err.line == 4 + MAX_DEPTH and "counting the intermediates" in err.message


def test_too_many_operations() -> None:
    terms = MAX_OPS // 3 + 2  # tanh(h * x) and its '+' are three operations (no last '+')
    err = error("h' = " + " + ".join(["tanh(h * x)"] * terms) + "\n")
    assert f"more than {MAX_OPS} operations" in err.message
    z = "z = " + " + ".join(f"{i} * h * y" for i in range(MAX_OPS // 4)) + "\n"
    err = error(z + "h' = z * z + z\n")  # z counted each time it is used
    assert err.line == 5 and "operations" in err.message


def test_too_many_operations_in_the_cell() -> None:
    per_state = MAX_OPS // 2
    n = MAX_CELL_OPS // per_state + 1
    head = f"cell A\nstate {', '.join(f's{i}' for i in range(n))}\n"
    body = "".join(f"s{i}' = " + " + ".join([f"s{i}"] * (per_state + 1)) + "\n"
                   for i in range(n))
    err = error(body, head=head, limit_s=10)  # the valid updates before it take their time
    assert f"cell too large: its updates and outputs have more than {MAX_CELL_OPS}" in (
        err.message)


def _deepest(opening: str, closing: str, inner: str = "h") -> str:
    """The update `opening * n + inner + closing * n` with the largest n that parses."""
    for n in range(1, 200):
        try:
            parse(f"h' = {opening * (n + 1)}{inner}{closing * (n + 1)}\n")
        except CellError:
            return f"h' = {opening * n}{inner}{closing * n}\n"
    raise AssertionError("no limit reached")  # pragma: no cover


@pytest.mark.parametrize(("opening", "closing"), [
    ("tanh(", ")"),
    ("tanh(x + h * ", ")"),
    ("x / (h + ", ")"),
    ("x - tanh(", ")"),
    ("(x + ", ") ** 2"),
    ("max(x, h * ", ")"),
])
def test_a_cell_at_the_depth_limit_is_analysed(opening: str, closing: str) -> None:
    ir = parse(_deepest(opening, closing))

    def at_depth(frames: int) -> object:  # as if loaded from deep inside a program
        return analyse(ir) if frames == 0 else at_depth(frames - 1)

    start = time.perf_counter()
    result = at_depth(200)
    assert result.structure == "diagonal"
    sp.cse(list(result.jacobian) + list(result.new_states))
    sp.sstr(result.jacobian)
    assert time.perf_counter() - start < 30

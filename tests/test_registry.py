"""The function registry (`paracompile.functions.FUNCTIONS`): every entry is complete and
spelled alike by every stage, and a function added in one place (a registry entry) parses,
analyses, and runs on the CPU kernels and the torch reference with the right values and
gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import sympy as sp
import torch
from conftest import max_rel_err

import paracompile
from paracompile import _fastmath
from paracompile._analyse import analyse, is_zero, numeric_functions
from paracompile._codegen import render
from paracompile._driver import metadata
from paracompile._errors import CellError
from paracompile._parse import parse_cell
from paracompile._printers import (
    KernelPrinter,
    TorchPrinter,
    fast_imports,
    known_functions,
    libm_helpers,
    torch_helpers,
)
from paracompile.functions import FUNCTIONS, CellFunction, cell_functions
from paracompile.functions import abs as abs_

KERNELS = [("cpu", "float32"), ("cpu", "float64"), ("cuda", "float32"), ("cuda", "float64")]
POINTS = (-1.5, -0.5, 0.0, 0.5, 1.25)
PRINTED = [f for f in FUNCTIONS.values() if not f.expands]


def _numeric(f: CellFunction, args: tuple[float, ...]) -> float | None:
    try:
        return float(f.numeric(*args))  # type: ignore[misc]
    except (ValueError, OverflowError):  # out of the domain (log of a negative number)
        return None


def _kernel_namespace(target: str, dtype: str) -> dict:
    """What a generated module defines for its scalar code, as plain Python."""
    F = np.float32 if dtype == "float32" else np.float64  # noqa: N806 - the module's name
    namespace = {"math": math, "F": F, "ONE": F(1.0), "ZERO": F(0.0)}
    namespace.update({name: getattr(_fastmath, name) for name in fast_imports(target, dtype)})
    for helper in libm_helpers(target, dtype):
        exec(helper, namespace)  # noqa: S102 - the registry's own helper definitions
    return namespace


@pytest.mark.parametrize(("target", "dtype"), KERNELS)
def test_kernel_code_of_every_function_computes_its_numeric_value(target: str,
                                                                   dtype: str) -> None:
    code = known_functions(target, dtype)
    assert set(code) == {f.name for f in PRINTED}
    namespace = _kernel_namespace(target, dtype)
    F = namespace["F"]  # noqa: N806
    tol = 1e-6 if dtype == "float32" else 1e-13
    for f in PRINTED:
        for args in itertools.product(POINTS, repeat=f.arity):
            expected = _numeric(f, args)
            if expected is None:
                continue
            scope = {**namespace, **{f"a{i}": F(v) for i, v in enumerate(args)}}
            value = eval(code[f.name].format(*(f"a{i}" for i in range(f.arity))), scope)  # noqa: S307
            assert abs(float(value) - expected) <= tol * (1 + abs(expected)), (f.name, args)


def test_torch_code_of_every_function_computes_its_numeric_value() -> None:
    namespace = {"torch": torch}
    exec(torch_helpers(), namespace)  # noqa: S102
    for f in PRINTED:
        for args in itertools.product(POINTS, repeat=f.arity):
            expected = _numeric(f, args)
            if expected is None:
                continue
            scope = {**namespace, **{f"a{i}": torch.tensor(v, dtype=torch.float64)
                                     for i, v in enumerate(args)}}
            names = [f"a{i}" for i in range(f.arity)]
            if f.name == "where":  # the printer passes the condition as a boolean tensor
                names[0] = "(a0 != 0)"
            value = eval(f.torch.format(*names), scope)  # type: ignore[union-attr]  # noqa: S307
            assert abs(float(value) - expected) <= 1e-13 * (1 + abs(expected)), (f.name, args)


@pytest.mark.parametrize(("target", "dtype"), KERNELS)
def test_every_printer_prints_every_function_from_the_registry(target: str,
                                                               dtype: str) -> None:
    x, y, z = (sp.Symbol(n, real=True) for n in "xyz")
    names = {x: "s_x", y: "x_y", z: "p_z"}
    kernel = KernelPrinter(names, known_functions(target, dtype))
    for f in PRINTED:
        call = f.build(*(x, y, z)[:f.arity])
        assert isinstance(call, sp.Function) and type(call).__name__ == f.name
        printed = [names[s] for s in (x, y, z)[:f.arity]]
        expected = (f"{f.fast}({', '.join(printed)})"
                    if f.fast and (target, dtype) == ("cpu", "float32")
                    else f.libm.format(*printed))  # type: ignore[union-attr]
        assert kernel.doprint(call) == expected
        torch_printer = TorchPrinter({"x": "s_x", "y": "x_y", "z": "p_z"})
        text = torch_printer.doprint(call)
        if f.name == "where":
            assert text == "torch.where(_c0, _gate(_c0, x_y), _gate(~_c0, p_z))"
        else:
            assert text == f.torch.format(*printed)  # type: ignore[union-attr]


def test_the_fast_versions_exist_with_documented_errors() -> None:
    for f in FUNCTIONS.values():
        if f.fast:
            assert f.fast in _fastmath.__all__ and f.fast in _fastmath.MAX_ERROR
            assert f.fast in _fastmath.ERROR_KIND
    assert fast_imports("cpu", "float32") == sorted({f.fast for f in PRINTED if f.fast})
    assert fast_imports("cpu", "float64") == fast_imports("cuda", "float32") == []


def test_an_incomplete_entry_is_refused() -> None:
    class half(sp.Function):  # noqa: N801
        nargs = 1

    with pytest.raises(ValueError, match="needs numeric, torch and libm"):
        CellFunction("half", 1, half, numeric=lambda x: x / 2, torch="({0} / 2)")
    with pytest.raises(ValueError, match="class named like the function"):
        CellFunction("halve", 1, half, numeric=lambda x: x / 2, torch="({0} / 2)",
                     libm="({0} * F(0.5))")
    with pytest.raises(ValueError, match="no code of its own"):
        CellFunction("twice", 1, lambda x: 2 * x, torch="(2 * {0})")


def test_internal_functions_cannot_be_called_from_a_cell() -> None:
    internal = {n for n, f in FUNCTIONS.items() if not f.in_language}
    assert internal == {"step", "sign", "ties", "greater"}
    assert not internal & set(cell_functions())
    with pytest.raises(CellError, match="unknown function 'sign'"):
        parse_cell("cell A\nstate h\nh' = sign(h)\n")


# -- a new function, added by one registry entry ----------------------------------------------

class softsign(sp.Function):  # noqa: N801 - named as users write it
    """x / (1 + |x|); derivative 1 / (1 + |x|)^2."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return 1 / (1 + abs_(self.args[0])) ** 2


SOFTSIGN = CellFunction(
    "softsign", 1, softsign, numeric=lambda x: x / (1.0 + abs(x)),
    torch="torch.nn.functional.softsign({0})",
    libm="softsign_({0})", libm_helper="def softsign_(x):\n    return x / (ONE + abs(x))",
)

SOFT = """cell Soft
state h
input x
param a
h' = 0.5 * h + softsign(a * h + x)
output y = 2 * softsign(h')
"""


@pytest.fixture
def with_softsign(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FUNCTIONS, "softsign", SOFTSIGN)


def test_a_new_function_parses_and_analyses(with_softsign: None) -> None:
    ir = parse_cell(SOFT)
    again = parse_cell(ir.to_source())
    assert [e.expr for e in again.equations] == [e.expr for e in ir.equations]
    a = analyse(ir)
    assert a.structure == "diagonal"
    h, x, p = a.states[0], a.inputs[0], a.params[0]
    assert a.jacobian[0, 0] == sp.Rational(1, 2) + p / (1 + abs_(p * h + x)) ** 2
    assert "softsign" in numeric_functions()
    assert not is_zero(softsign(h) - h)  # disproved by its numeric value
    with pytest.raises(CellError, match="did you mean 'softsign'"):
        parse_cell(SOFT.replace("softsign(a", "sofsign(a"))


def test_a_new_function_needs_no_fast_version(with_softsign: None) -> None:
    """Without a `fast` version the float32 CPU module calls its libm helper, and every
    kernel module defines that helper; the fast-math imports are unchanged."""
    a = analyse(parse_cell(SOFT))
    meta = metadata(a, "test")
    for target, dtype in KERNELS:
        source = render(a, target, dtype, meta)
        assert "def softsign_(x):" in source and "softsign_(" in source.split("def step")[1]
    assert "def sigmoid_(x):" not in render(a, "cpu", "float32", meta)


def _loop(xs: torch.Tensor, a: torch.Tensor, h0: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cell by hand, in torch."""
    h, hs, ys = h0, [], []
    for t in range(xs.shape[1]):
        h = 0.5 * h + torch.nn.functional.softsign(a * h + xs[:, t])
        hs.append(h)
        ys.append(2 * torch.nn.functional.softsign(h))
    return {"h": torch.stack(hs, 1), "y": torch.stack(ys, 1)}


@pytest.mark.parametrize(("backend", "method", "dtype"), [
    ("cpu", "sequential", torch.float64), ("cpu", "newton", torch.float64),
    ("cpu", "sequential", torch.float32), ("torch", "sequential", torch.float64),
])
def test_a_new_function_runs_with_the_right_values_and_gradients(
    with_softsign: None, backend: str, method: str, dtype: torch.dtype,
) -> None:
    cell = paracompile.load(SOFT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, dtype=torch.float64, generator=g).to(dtype).requires_grad_()
    a = (0.5 * torch.randn(3, dtype=torch.float64, generator=g)).to(dtype).requires_grad_()
    h0 = (0.5 * torch.randn(2, 3, dtype=torch.float64, generator=g)).to(dtype).requires_grad_()
    out = cell.apply({"x": x}, {"a": a}, {"h": h0}, method=method, backend=backend)
    ref = _loop(x, a, h0)
    weights = {n: torch.randn(ref[n].shape, dtype=torch.float64, generator=g).to(dtype)
               for n in ref}
    leaves = [x, a, h0]
    grads = torch.autograd.grad(sum((out[n] * weights[n]).sum() for n in ref), leaves)
    ref_grads = torch.autograd.grad(sum((ref[n] * weights[n]).sum() for n in ref), leaves)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_rel_err([out["h"], out["y"]], [ref["h"], ref["y"]]) <= tol
    assert max_rel_err(grads, ref_grads) <= tol

"""Regression tests of the rendering layer (issue 9, item 4): templates inside the package, a
typed render context, the affine-map algebra emitted from Python, temporaries named after the
user's intermediates, and a legend of the kernel arguments."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import random
from pathlib import Path

import numpy as np
import pytest

import paracompile
from paracompile import _codegen
from paracompile._analyse import analyse
from paracompile._driver import metadata
from paracompile._parse import parse_cell

ROOT = Path(__file__).resolve().parents[1]

GATED = """cell Gated
state h
input x_z, x_h
param a_z, a_h
z = sigmoid(a_z * h + x_z)
i_z = tanh(a_h * h + x_h)
h' = (1 - z) * h + z * i_z
output y = i_z - z
"""


def _source(text: str, target: str = "cpu", dtype: str = "float64") -> str:
    analysis = analyse(parse_cell(text, "<test>"))
    return _codegen.render(analysis, target, dtype, metadata(analysis, "test"))


def test_templates_are_package_data() -> None:
    package = Path(paracompile.__file__).resolve().parent
    assert _codegen.templates_dir().resolve() == package / "templates"
    names = {p.name for p in _codegen.templates_dir().glob("*.jinja")}
    assert {"module.py.jinja", "cpu.py.jinja", "cpu_dense.py.jinja", "cuda.py.jinja",
            "_cpu_common.jinja", "_device.jinja"} <= names
    assert not (ROOT / "templates").exists()


def test_the_cache_fingerprint_covers_every_template() -> None:
    covered = _codegen.template_sources("cpu") + _codegen.template_sources("cuda")
    for path in _codegen.templates_dir().glob("*.jinja"):
        assert path.read_text() in covered, path.name


def test_render_context_is_frozen_and_documented() -> None:
    analysis = analyse(parse_cell(GATED, "<test>"))
    ctx = _codegen.render_context(analysis, "cpu", "float32", metadata(analysis, "test"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.k = 2  # type: ignore[misc]
    tree = ast.parse(inspect.getsource(_codegen.RenderContext))
    body = tree.body[0].body
    documented = {node.target.id for node, after in zip(body, body[1:], strict=False)
                  if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                  and isinstance(after.value, ast.Constant)}
    assert documented == {f.name for f in dataclasses.fields(ctx)}
    assert ctx.kernel_args["newton_fixup"][:3] == ("fval0", "jac0_0", "carry0")


def _run(fn: _codegen.ScalarFunction, *values: float) -> tuple[float, ...]:
    namespace: dict = {}
    body = "".join(f"    {name} = {code}\n" for name, code in fn.body)
    exec(f"def {fn.name}({', '.join(fn.args)}):\n{body}    return ({', '.join(fn.results)},)",
         namespace)
    return namespace[fn.name](*values)


@pytest.mark.parametrize("entries", [((0, 0),), ((0, 0), (0, 1), (1, 0), (1, 1)),
                                     ((0, 0), (0, 1), (1, 1), (2, 2))])
def test_affine_functions_are_the_affine_map_algebra(entries) -> None:  # noqa: ANN001
    k = max(i for e in entries for i in e) + 1
    fns = {f.name: f for f in _codegen.affine_functions(k, entries)}
    rng = random.Random(0)

    def draw() -> tuple[np.ndarray, np.ndarray, list[float]]:
        a = np.zeros((k, k))
        for i, j in entries:
            a[i, j] = rng.uniform(-1, 1)
        v = np.array([rng.uniform(-1, 1) for _ in range(k)])
        return a, v, [a[i, j] for i, j in entries] + list(v)

    (a1, v1, flat1), (a2, v2, flat2), (_, x, _) = draw(), draw(), draw()
    n = len(entries)

    def split(result: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        a = np.zeros((k, k))
        for (i, j), value in zip(entries, result[:n], strict=True):
            a[i, j] = value
        return a, np.array(result[n:])

    a, v = split(_run(fns["affine_compose"], *flat1, *flat2))
    np.testing.assert_allclose(a, a2 @ a1, atol=1e-15)
    np.testing.assert_allclose(v, a2 @ v1 + v2, atol=1e-15)
    np.testing.assert_allclose(_run(fns["affine_apply"], *flat1, *x), a1 @ x + v1, atol=1e-15)
    a, v = split(_run(fns["affine_compose_transposed"], *flat1, *flat2))
    np.testing.assert_allclose(a.T, (a1 @ a2).T, atol=1e-15)  # l -> A2^T (A1^T l + v1) + v2
    np.testing.assert_allclose(v, a2.T @ v1 + v2, atol=1e-15)
    np.testing.assert_allclose(_run(fns["affine_apply_transposed"], *flat1, *x),
                               a1.T @ x + v1, atol=1e-15)


@pytest.mark.parametrize("target", ["cpu", "cudasim"])
def test_kernels_call_the_generated_affine_functions(target: str) -> None:
    source = _source(paracompile.load(ROOT / "cells" / "paralstm.cell").meta.source, target)
    for name in ("affine_compose", "affine_apply"):
        assert f"def {name}(" in source and f"= {name}(" in source
    if target == "cudasim":
        assert "= affine_compose_transposed(" in source
        assert "= affine_apply_transposed(" in source
    assert "_compose_f" not in source and "nA0_0" not in source


def test_temporaries_are_named_after_the_intermediates() -> None:
    source = _source(GATED)
    step = source[source.index("def step("):source.index("def step_jac(")]
    # z is named i_z; the user's own i_z gets i_i_z: collision-free
    assert "    i_z = " in step and "    i_i_z = " in step
    assert "    n_h = " in step and "    o_y = " in step
    assert step.count("    i_z = ") == 1


def test_legend_maps_kernel_arguments_to_the_users_names() -> None:
    source = _source(GATED)
    legend = source[:source.index("import math")]
    for item in ("s0 = state h", "x0 = input x_z", "x1 = input x_h", "p0 = param a_z (vector)",
                 "y0 = output y", "jac0_0 = dh'/dh", "h0_0 = initial state h"):
        assert item in legend

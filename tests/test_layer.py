"""`cell.Layer` (the nn.Module) and `cell.step` (decoding), see docs/api.md."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from conftest import CELLS_DIR, SHIPPED, shipped, warm_kernels

import paracompile
from paracompile import _runtime
from paracompile._layer import CellLayer

CELL_FILES = {name: CELLS_DIR / f"{name}.cell" for name in SHIPPED}


@pytest.fixture(scope="module")
def cells() -> dict[str, paracompile.CompiledCell]:
    """The shipped cells, their CPU kernels compiled in parallel first (a cold cache)."""
    jobs = [(str(path), "float32") for path in CELL_FILES.values()]
    warm_kernels(jobs + [(str(CELL_FILES[n]), "float64") for n in ("paragru", "paralstm")])
    return {name: shipped(name) for name in SHIPPED}


def make(cell, input_size=6, hidden=4, **kw):
    torch.manual_seed(0)
    kw.setdefault("backend", "cpu")
    return cell.Layer(input_size, hidden, **kw)


def random_h0(cell, B, H, dtype=torch.float32):
    return {n: 0.5 * torch.randn(B, H, dtype=dtype) for n in cell.states}


# -- shapes, forms, conventions ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CELL_FILES))
def test_shapes_and_final_state(cells, name) -> None:
    cell = cells[name]
    layer = make(cell, 6, 4)
    x = torch.randn(3, 5, 6)
    y, final = layer(x)
    assert y.shape == (3, 5, 4)
    assert y.dtype == torch.float32
    out = cell.apply(layer.project(x), layer.cell_parameters(), backend="cpu")
    expect_output = cell.outputs[0] if cell.outputs else cell.states[-1]
    torch.testing.assert_close(y, out[expect_output])
    if len(cell.states) == 1:
        assert isinstance(final, torch.Tensor) and final.shape == (3, 4)
        final = {cell.states[0]: final}
    else:
        assert isinstance(final, dict) and set(final) == set(cell.states)
    for n in cell.states:  # the final state is the state after the last step
        assert final[n].shape == (3, 4)
        torch.testing.assert_close(final[n], out[n][:, -1])


def test_paralstm_output_is_h(cells) -> None:
    cell = cells["paralstm"]
    assert cell.states == ("c", "h") and not cell.outputs
    y, final = make(cell)(torch.randn(2, 4, 6))
    torch.testing.assert_close(y[:, -1], final["h"])
    assert not torch.allclose(y[:, -1], final["c"])


def test_first_declared_output_is_the_output() -> None:
    cell = paracompile.load("cell WithOut\nstate h\ninput x\nparam a\n"
                            "h' = tanh(a * h + x)\noutput y = 2 * h'\noutput z = h' + 1\n")
    layer = make(cell, backend="torch")
    y, h = layer(torch.randn(2, 3, 6))
    torch.testing.assert_close(y[:, -1], 2 * h)


def test_parameters_and_names(cells) -> None:
    cell = cells["paralstm"]
    layer = cell.Layer(8, 6, num_heads=2)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"weight": (2, 9, 4), "bias": (3, 6), "cell_params.a_f": (6,),
                      "cell_params.a_c": (6,), "cell_params.a_o": (6,),
                      "cell_params.c_f": (6,), "cell_params.c_o": (6,)}
    assert list(layer.cell_parameters()) == list(cell.params)
    assert layer.cell_params["a_f"] is layer.cell_params.a_f
    dense = cell.Layer(8, 6, projection="dense", bias=False)
    assert {n: tuple(p.shape) for n, p in dense.named_parameters()}["weight"] == (18, 8)
    assert dense.bias is None
    elman = cells["elman"].Layer(3, 5)
    assert elman.cell_params["W"].shape == (5, 5) and elman.cell_params["b"].shape == (5,)
    coupled = cells["coupled3"].Layer(3, 5)
    assert coupled.cell_params["lam"].shape == ()


def test_layer_class_is_cached_and_named(cells) -> None:
    cell = cells["paragru"]
    assert cell.Layer is cell.Layer
    assert cell.Layer.__name__ == "ParaGRULayer"
    assert issubclass(cell.Layer, CellLayer) and cell.Layer.cell.key == cell.key
    assert cells["mingru"].Layer is not cell.Layer
    text = repr(cell.Layer(8, 4, num_heads=2, method="newton"))
    assert "ParaGRULayer(" in text and "8, 4, num_heads=2" in text
    assert "cell=ParaGRU" in text and "method='newton'" in text
    assert "projection='dense'" in repr(cell.Layer(8, 4, projection="dense", bias=False))
    text = "cell Twice\nstate h\ninput x\nh' = 0.5 * h + x\n"
    assert paracompile.load(text).Layer is paracompile.load(text).Layer  # one class per key


def test_param_names_that_clash_with_module_attributes() -> None:
    cell = paracompile.load("cell Clash\nstate h\ninput x\nparam bias, type, weight\n"
                            "h' = tanh(bias * h + type * x + weight)\n")
    layer = make(cell, backend="torch")
    names = [n for n, _ in layer.named_parameters()]
    assert "cell_params.type" in names and "cell_params.bias" in names
    assert layer.cell_params["type"].shape == (4,)
    y, _ = layer(torch.randn(2, 3, 6))
    y.sum().backward()
    assert layer.cell_params["type"].grad is not None


# -- projection ------------------------------------------------------------------------------


def manual_inputs(layer, x):
    """The projection written out: one block-diagonal (or full) matrix per cell input."""
    m, H, nh = len(layer.cell.inputs), layer.hidden_size, layer.num_heads
    out = {}
    for i, name in enumerate(layer.cell.inputs):
        if layer.projection == "heads":
            dh = H // nh
            blocks = [layer.weight[n, i * dh:(i + 1) * dh] for n in range(nh)]
            matrix = torch.block_diag(*blocks)  # (H, input_size)
        else:
            matrix = layer.weight[i * H:(i + 1) * H]
        y = x @ matrix.T
        out[name] = y + layer.bias[i] if layer.bias is not None else y
    assert m == len(out)
    return out


@pytest.mark.parametrize(("heads", "projection", "bias"),
                         [(1, "heads", True), (2, "heads", True), (3, "heads", False),
                          (1, "dense", True), (1, "dense", False)])
def test_layer_equals_manual_projection_and_apply(cells, heads, projection, bias) -> None:
    cell = cells["paragru"]
    layer = make(cell, 6, 6, num_heads=heads, projection=projection, bias=bias,
                 dtype=torch.float64)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    h0 = torch.randn(2, 6, dtype=torch.float64)
    inputs = manual_inputs(layer, x)
    for n, v in layer.project(x).items():
        torch.testing.assert_close(v, inputs[n])
    expect = cell.apply(inputs, layer.cell_parameters(), {"h": h0})["h"]
    y, h = layer(x, h0)
    torch.testing.assert_close(y, expect)
    torch.testing.assert_close(h, expect[:, -1])


def test_heads_are_block_diagonal(cells) -> None:
    layer = make(cells["paragru"], 6, 9, num_heads=3)
    x = torch.randn(2, 4, 6)
    x2 = x.clone()
    x2[..., 2:4] += 1.0  # the features of head 1 only
    a, b = layer.project(x), layer.project(x2)
    for name in cells["paragru"].inputs:
        changed = (a[name] - b[name]).abs().amax(dim=(0, 1)) > 0
        assert changed.tolist() == [False] * 3 + [True] * 3 + [False] * 3


# -- initial state -----------------------------------------------------------------------------


def test_h0_forms_single_state(cells) -> None:
    layer = make(cells["paragru"])
    x = torch.randn(2, 5, 6)
    h0 = torch.randn(2, 4)
    y1, h1 = layer(x, h0)
    y2, h2 = layer(x, {"h": h0})
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(h1, h2)
    y0, _ = layer(x)
    y3, _ = layer(x, torch.zeros(2, 4))
    torch.testing.assert_close(y0, y3)
    assert not torch.allclose(y0, y1)
    # continuing from the final state equals running the concatenated sequence
    ya, ha = layer(x[:, :3])
    yb, hb = layer(x[:, 3:], ha)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y0)
    torch.testing.assert_close(hb, y0[:, -1])


def test_h0_forms_multi_state(cells) -> None:
    cell = cells["paralstm"]
    layer = make(cell)
    x = torch.randn(2, 5, 6)
    h0 = random_h0(cell, 2, 4)
    y, final = layer(x, h0)
    ya, sa = layer(x[:, :2], h0)
    yb, sb = layer(x[:, 2:], sa)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y)
    torch.testing.assert_close(sb["c"], final["c"])
    # a dict may leave states out: they start at zero
    y_part, _ = layer(x, {"h": h0["h"]})
    y_full, _ = layer(x, {"h": h0["h"], "c": torch.zeros(2, 4)})
    torch.testing.assert_close(y_part, y_full)


def test_empty_sequence_returns_h0(cells) -> None:
    cell = cells["paralstm"]
    layer = make(cell)
    h0 = random_h0(cell, 2, 4)
    y, final = layer(torch.randn(2, 0, 6), h0)
    assert y.shape == (2, 0, 4)
    torch.testing.assert_close(final["c"], h0["c"])
    y, final = layer(torch.randn(2, 0, 6))
    assert final["h"].shape == (2, 4) and not final["h"].any()


# -- gradients, methods, dtypes ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["paragru", "paralstm", "coupled3", "elman"])
def test_gradients_reach_every_parameter(cells, name) -> None:
    cell = cells[name]
    layer = make(cell, 6, 4, num_heads=2)
    x = torch.randn(2, 5, 6, requires_grad=True)
    h0 = {n: v.requires_grad_() for n, v in random_h0(cell, 2, 4).items()}
    y, final = layer(x, h0)
    final = final if isinstance(final, dict) else {cell.states[0]: final}
    (y.sin().sum() + sum(v.sum() for v in final.values())).backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, v in h0.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, n


def test_gradients_match_the_torch_reference(cells) -> None:
    cell = cells["paralstm"]
    grads = {}
    for backend in ("cpu", "torch"):
        layer = make(cell, 6, 4, num_heads=2, backend=backend, dtype=torch.float64)
        x = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y, final = layer(x)
        (y.sum() + final["c"].sum()).backward()
        grads[backend] = {n: p.grad for n, p in layer.named_parameters()}
    for n, g in grads["cpu"].items():
        torch.testing.assert_close(g, grads["torch"][n], msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_equals_sequential(cells, dtype) -> None:
    cell = cells["paragru"]
    results = {}
    for method in ("sequential", "newton"):
        layer = make(cell, 8, 16, num_heads=4, method=method, dtype=dtype)
        x = torch.randn(3, 40, 8, dtype=dtype, generator=torch.Generator().manual_seed(2))
        y, h = layer(x)
        (y ** 2).mean().backward()
        results[method] = (y, h, {n: p.grad for n, p in layer.named_parameters()})
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    ys, hs, gs = results["sequential"]
    yn, hn, gn = results["newton"]
    torch.testing.assert_close(yn, ys, **tol)
    torch.testing.assert_close(hn, hs, **tol)
    for n in gs:
        torch.testing.assert_close(gn[n], gs[n], **tol, msg=n)


def test_float64_layer_and_half_precision_autocast(cells) -> None:
    cell = cells["paragru"]
    layer = make(cell, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    y, h = layer(torch.randn(2, 3, 6, dtype=torch.float64))
    assert y.dtype == h.dtype == torch.float64
    layer32 = make(cell)
    x = torch.randn(2, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = layer32(x)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer32(x)[0], atol=0.05, rtol=0.05)


def test_state_dict_round_trip(cells) -> None:
    cell = cells["coupled3"]
    a = make(cell)
    torch.manual_seed(5)
    b = cell.Layer(6, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_pickle_and_deepcopy(cells) -> None:
    import copy
    import io
    import pickle

    from paracompile import _runtime

    layer = make(cells["paralstm"], num_heads=2, method="newton")
    serving = _runtime._CELLS[layer.cell.key]  # the CompiledCell behind the torch ops
    x = torch.randn(2, 4, 6)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # by the cell's source: unpickling finds the class again
    assert layer.cell.meta.source.encode() in buffer.getvalue()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(layer)
    assert _runtime._CELLS[layer.cell.key] is serving  # no second CompiledCell was loaded
    for other in (loaded, twin):
        assert type(other) is type(layer) and other.method == "newton"
        torch.testing.assert_close(other(x)[0], layer(x)[0])
    traced = paracompile.cell(states="h", inputs="x", params="a", name="Traced")(
        lambda h, x, a: a * h + x)
    copy.deepcopy(traced.Layer(3, 4))  # a cell from a Python function has no source text
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(traced.Layer(3, 4))


# -- initialisation ----------------------------------------------------------------------------


def test_initialisation_follows_the_hints(cells) -> None:
    torch.manual_seed(0)
    def params(layer):
        return {n: v.detach() for n, v in layer.cell_parameters().items()}

    p = params(cells["coupled3"].Layer(4, 64))
    assert torch.all(p["lam"] == 0.9)
    assert p["w"].min() >= 0.1 and p["w"].max() <= 0.5 and p["w"].std() > 0
    assert p["gamma"].min() >= 0.05 and p["gamma"].max() <= 0.2
    gru = params(cells["paragru"].Layer(4, 64))
    assert all(v.abs().max() <= 0.5 and v.abs().max() > 0.3 for v in gru.values())
    elman = params(cells["elman"].Layer(4, 64))
    assert torch.all(elman["b"] == 0)
    assert 0.04 < float(elman["W"].std()) < 0.06 and abs(float(elman["W"].mean())) < 0.01
    # the projection: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
    heads = cells["paragru"].Layer(16, 64, num_heads=4)
    bound = 1 / math.sqrt(4)
    assert heads.weight.abs().max() <= bound and heads.weight.abs().max() > 0.9 * bound
    assert heads.bias.abs().max() <= bound


def test_default_initialisation_without_hints() -> None:
    cell = paracompile.load("cell NoHints\nstate h\ninput x\nparam a\nparam s : scalar\n"
                            "param W : matrix\nh' = tanh(W @ h + a * x + s)\n")
    torch.manual_seed(0)
    layer = cell.Layer(3, 100)
    bound = 1 / math.sqrt(100)
    for n, p in layer.cell_parameters().items():
        assert p.abs().max() <= bound, n
    assert layer.cell_params["W"].abs().max() > 0.9 * bound
    layer.reset_parameters()  # again, with another draw
    assert layer.cell_params["a"].abs().max() <= bound


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    ({"input_size": 6, "hidden_size": 4, "num_heads": 4}, ValueError,
     "input_size=6 is not divisible by num_heads=4"),
    ({"input_size": 6, "hidden_size": 4, "num_heads": 3}, ValueError,
     "hidden_size=4 is not divisible by num_heads=3"),
    ({"input_size": 0, "hidden_size": 4}, ValueError, "input_size must be a positive int"),
    ({"input_size": 6, "hidden_size": 2.5}, ValueError, "hidden_size must be a positive int"),
    ({"input_size": 6, "hidden_size": 4, "num_heads": 0}, ValueError, "num_heads"),
    ({"input_size": 6, "hidden_size": 4, "num_heads": 2, "projection": "dense"}, ValueError,
     "projection='dense' is one full matrix"),
    ({"input_size": 6, "hidden_size": 4, "projection": "diag"}, ValueError,
     "projection must be one of"),
    ({"input_size": 6, "hidden_size": 4, "method": "fast"}, ValueError, "method must be one of"),
    ({"input_size": 6, "hidden_size": 4, "backend": "gpu"}, ValueError, "backend must be one of"),
    ({"input_size": 6, "hidden_size": 4, "dtype": torch.int32}, TypeError, "dtype must be"),
])
def test_constructor_errors(cells, kwargs, error, fragment) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        cells["paragru"].Layer(**kwargs)


def test_forward_errors(cells) -> None:
    gru = make(cells["paragru"], 6, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, input_size\) with "
                                         r"input_size=6, got \(5, 6\)"):
        gru(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"input_size=6, got \(2, 5, 7\)"):
        gru(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        gru([[1.0] * 6])
    with pytest.raises(TypeError, match="floating-point"):
        gru(torch.ones(2, 5, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64, but the layer's parameters"):
        gru(torch.randn(2, 5, 6, dtype=torch.float64))
    x = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, hidden_size\) = \(2, 4\), "
                                         r"got \(2, 5\)"):
        gru(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="h0: unknown state"):
        gru(x, {"c": torch.zeros(2, 4)})
    with pytest.raises(TypeError, match="h0 must be a"):
        gru(x, [torch.zeros(2, 4)])
    lstm = make(cells["paralstm"], 6, 4)
    with pytest.raises(TypeError, match="has states c, h: pass h0 as a dict"):
        lstm(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"h0\['c'\] must have shape"):
        lstm(x, {"c": torch.zeros(3, 4)})
    with pytest.raises(TypeError, match=r"h0\['h'\] must be a torch.Tensor"):
        lstm(x, {"h": 0.0})


def test_cell_without_inputs_has_no_layer() -> None:
    cell = paracompile.load("cell Free\nstate h\nparam a\nh' = a * h\n")
    with pytest.raises(ValueError, match="has no inputs"):
        cell.Layer(3, 4)


# -- single steps ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CELL_FILES))
def test_step_iterated_equals_apply(cells, name) -> None:
    cell = cells[name]
    B, T, D = 2, 6, 5
    gen = torch.Generator().manual_seed(3)
    xs = {n: torch.randn(B, T, D, generator=gen) for n in cell.inputs}
    layer = cell.Layer(3, D)
    params = {n: p.detach() for n, p in layer.cell_parameters().items()}
    h0 = random_h0(cell, B, D)
    out = cell.apply(xs, params, h0, backend="cpu")
    state = h0
    for t in range(T):
        state, outputs = cell.step({n: x[:, t] for n, x in xs.items()}, params, state)
        assert set(state) == set(cell.states) and set(outputs) == set(cell.outputs)
        for n in cell.states:
            torch.testing.assert_close(state[n], out[n][:, t])
        for n in cell.outputs:
            torch.testing.assert_close(outputs[n], out[n][:, t])


def test_step_with_outputs_and_default_state() -> None:
    cell = paracompile.load("cell Outs\nstate h\ninput x\nh' = 0.5 * h + x\n"
                            "output y = 3 * h'\noutput one = 1\n")
    x = torch.randn(2, 4)
    state, outputs = cell.step({"x": x}, {})  # state defaults to zeros
    torch.testing.assert_close(state["h"], x)
    torch.testing.assert_close(outputs["y"], 3 * x)
    torch.testing.assert_close(outputs["one"], torch.ones(2, 4))  # a constant, still (B, D)


def test_layer_calls_take_the_eager_path(cells, monkeypatch) -> None:
    """A layer passes its nn.Parameters to apply: they are plain tensors for
    `_runtime._plain_eager`, so training in eager mode skips the custom ops' wrappers."""
    decisions: list[bool] = []
    plain_eager = _runtime._plain_eager
    monkeypatch.setattr(_runtime, "_plain_eager",
                        lambda tensors: decisions.append(plain_eager(tensors)) or decisions[-1])
    layer = make(cells["paragru"], 6, 4, backend="cpu")
    y, _ = layer(torch.randn(2, 5, 6))
    y.sum().backward()
    assert decisions == [True]


def test_layer_step_equals_forward(cells) -> None:
    for name in ("paragru", "paralstm"):
        cell = cells[name]
        layer = make(cell, 6, 4, num_heads=2)
        x = torch.randn(2, 5, 6)
        h0 = random_h0(cell, 2, 4)
        if len(cell.states) == 1:
            h0 = h0[cell.states[0]]
        y, final = layer(x, h0)
        state = h0
        for t in range(5):
            out, state = layer.step(x[:, t], state)
            torch.testing.assert_close(out, y[:, t])
        if isinstance(final, dict):
            for n in final:
                torch.testing.assert_close(state[n], final[n])
        else:
            torch.testing.assert_close(state, final)


def test_step_is_differentiable(cells) -> None:
    cell = cells["paralstm"]
    params = {n: torch.randn(4, requires_grad=True) for n in cell.params}
    xs = {n: torch.randn(3, 4, requires_grad=True) for n in cell.inputs}
    state, _ = cell.step(xs, params, {"c": torch.randn(3, 4)})
    state["h"].sum().backward()
    assert all(p.grad is not None for p in params.values())
    assert all(x.grad is not None for x in xs.values())


def test_step_half_precision(cells) -> None:
    cell = cells["paragru"]
    params = {n: torch.randn(4, dtype=torch.bfloat16) for n in cell.params}
    xs = {n: torch.randn(3, 4, dtype=torch.bfloat16) for n in cell.inputs}
    state, _ = cell.step(xs, params)
    assert state["h"].dtype == torch.bfloat16
    ref, _ = cell.step({n: v.float() for n, v in xs.items()},
                       {n: v.float() for n, v in params.items()})
    torch.testing.assert_close(state["h"].float(), ref["h"], atol=1e-2, rtol=1e-2)


def test_step_errors(cells) -> None:
    cell = cells["paralstm"]
    params = {n: torch.randn(4) for n in cell.params}
    xs = {n: torch.randn(3, 4) for n in cell.inputs}
    with pytest.raises(ValueError, match=r"must have shape \(B, D\) \(one time step; use "
                                         r"apply\(\) for \(B, T, D\) sequences\)"):
        cell.step({n: torch.randn(3, 2, 4) for n in cell.inputs}, params)
    with pytest.raises(ValueError, match=r"inputs: missing 'x_o'"):
        cell.step({"x_f": xs["x_f"], "x_c": xs["x_c"]}, params)
    with pytest.raises(ValueError, match=r"params\['a_f'\] \(vector\) must have shape \(D,\)"):
        cell.step(xs, {**params, "a_f": torch.randn(5)})
    with pytest.raises(ValueError, match=r"state: unknown name\(s\) 'q'"):
        cell.step(xs, params, {"q": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"state\['c'\] must have shape \(B, D\)"):
        cell.step(xs, params, {"c": torch.zeros(2, 4)})
    with pytest.raises(TypeError, match=r"state\['c'\] must be a torch.Tensor"):
        cell.step(xs, params, {"c": 1.0})
    with pytest.raises(TypeError, match=r"inputs\['x_c'\] has dtype torch.float64"):
        cell.step({**xs, "x_c": xs["x_c"].double()}, params)
    with pytest.raises(TypeError, match="params must be a dict"):
        cell.step(xs, [params])
    free = paracompile.load("cell Free2\nstate h\nparam a\nh' = a * h\n")
    with pytest.raises(ValueError, match="has no inputs"):
        free.step({}, {"a": torch.ones(4)})
    state, _ = free.step({}, {"a": torch.full((4,), 0.5)}, {"h": torch.ones(2, 4)})
    torch.testing.assert_close(state["h"], torch.full((2, 4), 0.5))


# -- torch.compile -----------------------------------------------------------------------------


def _compiled_matches_eager(layer, shapes, **compile_kwargs) -> None:
    """Compile once; for each (B, T): the loss and the parameter gradients equal eager mode
    (with dynamic=True, later shapes must not recompile)."""
    import contextlib

    def loss_fn(module, x):
        y, final = module(x)
        final = final if isinstance(final, dict) else {"s": final}
        return (y ** 2).mean() + sum(v.sum() for v in final.values())

    compiled = torch.compile(layer, **compile_kwargs)
    gen = torch.Generator().manual_seed(4)
    for i, (B, T) in enumerate(shapes):
        x = torch.randn(B, T, layer.input_size, generator=gen)
        layer.zero_grad()
        eager = loss_fn(layer, x)
        eager.backward()
        expect = {n: p.grad.clone() for n, p in layer.named_parameters()}
        layer.zero_grad()
        stance = (torch.compiler.set_stance("fail_on_recompile")
                  if i and compile_kwargs.get("dynamic") else contextlib.nullcontext())
        with stance:
            loss = loss_fn(compiled, x)
            loss.backward()
        torch.testing.assert_close(loss, eager)
        for n, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, expect[n], msg=n)


# importing inductor runs torch.jit.script_method, deprecated (torch 2.10+)
INDUCTOR_IMPORT = pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning")


@INDUCTOR_IMPORT
def test_torch_compile_cpu_backend(cells) -> None:
    """The numba kernels are torch custom ops: one graph (no breaks), dynamic shapes, forward
    and backward."""
    torch._dynamo.reset()
    layer = make(cells["paralstm"], 6, 4, num_heads=2, backend="cpu", method="newton")
    _compiled_matches_eager(layer, [(2, 5), (3, 7)], fullgraph=True, dynamic=True)


def test_torch_compile_torch_backend(cells) -> None:
    """The pure-torch sequential reference traces into one graph (the loop unrolled)."""
    torch._dynamo.reset()
    layer = make(cells["paragru"], 6, 4, backend="torch", method="sequential")
    _compiled_matches_eager(layer, [(2, 4)], fullgraph=True, backend="aot_eager")


@pytest.mark.slow
@INDUCTOR_IMPORT
def test_torch_compile_inductor_torch_backend(cells) -> None:
    torch._dynamo.reset()
    layer = make(cells["paragru"], 6, 4, backend="torch", method="sequential")
    _compiled_matches_eager(layer, [(2, 4)], fullgraph=True)


# -- DistributedDataParallel -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_data_parallel_gradients(tmp_path) -> None:
    """Two CPU processes (gloo), half the batch each: after one backward the gradients equal
    those of one process on the whole batch."""
    import _ddp_worker as w
    import torch.multiprocessing as mp

    mp.spawn(w.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp_grads.pt")
    layer, x, target = w.build()
    w.loss_of(layer, x, target).backward()
    assert set(ddp) == {n for n, _ in layer.named_parameters()}
    for n, p in layer.named_parameters():
        torch.testing.assert_close(ddp[n], p.grad, msg=n)

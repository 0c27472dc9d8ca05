"""The public API (docs/api.md): `paracompile.load`, the attributes of a compiled cell, and
argument validation of `cell.apply` (every bad argument raises ValueError/TypeError naming
the argument; nothing reaches a kernel). Validation runs before any kernel is compiled, so
these tests are fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import CELLS_DIR, make_case, shipped

import paracompile
from paracompile import CellError, CompiledCell

B, T, D = 2, 5, 3

EXPECTED = {
    "paragru": ("ParaGRU", ("h",), ("x_z", "x_r", "x_h"),
                {"a_z": "vector", "a_r": "vector", "a_h": "vector"}, "diagonal"),
    "paralstm": ("ParaLSTM", ("c", "h"), ("x_f", "x_c", "x_o"),
                 {"a_f": "vector", "a_c": "vector", "a_o": "vector", "c_f": "vector",
                  "c_o": "vector"}, "block(2)"),
    "mingru": ("MinGRU", ("h",), ("x_z", "x_h"), {}, "diagonal"),
    "indrnn": ("IndRNN", ("h",), ("x",), {"u": "vector"}, "diagonal"),
    "elman": ("Elman", ("h",), ("x",), {"W": "matrix", "b": "vector"}, "dense"),
    "coupled3": ("Coupled3", ("p", "v", "m"), ("x",),
                 {"w": "vector", "gamma": "vector", "lam": "scalar"}, "block(3)"),
}


# -- load and attributes -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(EXPECTED))
def test_attributes(name):
    cell = shipped(name)
    assert isinstance(cell, CompiledCell)
    assert (cell.name, cell.states, cell.inputs, cell.params, cell.structure) == EXPECTED[name]
    assert type(cell.states) is tuple and type(cell.inputs) is tuple
    assert type(cell.params) is dict
    assert cell.outputs == ()


def test_load_from_text_and_path_agree():
    path = CELLS_DIR / "paragru.cell"
    by_text = paracompile.load(path.read_text())
    by_str = paracompile.load(str(path))
    by_path = paracompile.load(path)
    for other in (by_str, by_path):
        assert other.key == by_text.key
        assert (other.name, other.states, other.inputs, other.params, other.structure) == (
            by_text.name, by_text.states, by_text.inputs, by_text.params, by_text.structure)


@pytest.mark.parametrize("kind", ["str", "path"])
def test_load_missing_file(tmp_path, kind):
    missing = tmp_path / "nowhere" / "missing.cell"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        paracompile.load(str(missing) if kind == "str" else missing)


def test_load_rejects_non_text():
    with pytest.raises(TypeError, match="path or .cell source"):
        paracompile.load(42)


@pytest.mark.parametrize("text,line,column", [
    ("cell A\nstate h\nh' = h + * 2\n", 3, 10),
    ("cell A\nstate h\nh' = tahn(h)\n", 3, 6),
    ("cell A\nstate h, c\nh' = h\n", 2, 10),
])
def test_load_bad_source(text, line, column):
    with pytest.raises(CellError) as info:
        paracompile.load(text)
    assert (info.value.line, info.value.column) == (line, column)
    assert f":{line}:{column}: error:" in str(info.value)


def test_load_bad_file_reports_its_name(tmp_path):
    path = tmp_path / "bad.cell"
    path.write_text("cell A\nstate h\nh' = h $ 2\n")
    with pytest.raises(CellError) as info:
        paracompile.load(path)
    assert info.value.filename == str(path)
    assert (info.value.line, info.value.column) == (3, 8)


# -- apply: argument validation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def gru():
    return shipped("paragru")


@pytest.fixture(scope="module")
def coupled():
    return shipped("coupled3")


@pytest.fixture(scope="module")
def elman():
    return shipped("elman")


def args(cell, dtype=torch.float32):
    return make_case(cell, B, T, D, dtype)


def raises(exc, *fragments):
    """pytest.raises(exc) whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def test_valid_call_works(gru):
    xs, ps, h0 = args(gru)
    out = gru.apply(xs, ps, h0, backend="torch")
    assert out["h"].shape == (B, T, D)


@pytest.mark.parametrize("which", ["inputs", "params", "h0"])
def test_not_a_dict(gru, which):
    xs, ps, h0 = args(gru)
    call = {"inputs": xs, "params": ps, "h0": h0}
    call[which] = list(call[which].values())
    with raises(TypeError, which, "dict"):
        gru.apply(call["inputs"], call["params"], call["h0"])


def test_missing_input(gru):
    xs, ps, _ = args(gru)
    del xs["x_r"]
    with raises(ValueError, "inputs", "missing", "'x_r'"):
        gru.apply(xs, ps)


def test_unknown_input(gru):
    xs, ps, _ = args(gru)
    xs["x_q"] = xs["x_r"]
    with raises(ValueError, "inputs", "unknown", "'x_q'"):
        gru.apply(xs, ps)


def test_missing_param(gru):
    xs, ps, _ = args(gru)
    del ps["a_h"]
    with raises(ValueError, "params", "missing", "'a_h'"):
        gru.apply(xs, ps)


def test_unknown_param(gru):
    xs, ps, _ = args(gru)
    ps["bias"] = ps["a_h"]
    with raises(ValueError, "params", "unknown", "'bias'"):
        gru.apply(xs, ps)


@pytest.mark.parametrize("which", ["x_z", "x_h"])
def test_input_not_a_tensor(gru, which):
    xs, ps, _ = args(gru)
    xs[which] = xs[which].tolist()
    with raises(TypeError, f"inputs['{which}']", "Tensor", "list"):
        gru.apply(xs, ps)


def test_param_not_a_tensor(gru):
    xs, ps, _ = args(gru)
    ps["a_z"] = 0.5
    with raises(TypeError, "params['a_z']", "Tensor", "float"):
        gru.apply(xs, ps)


def test_h0_not_a_tensor(gru):
    xs, ps, _ = args(gru)
    with raises(TypeError, "h0['h']", "Tensor", "ndarray"):
        gru.apply(xs, ps, {"h": torch.zeros(B, D).numpy()})


@pytest.mark.parametrize("which", ["x_z", "x_r"])
@pytest.mark.parametrize("shape", [(T, D), (B, T, D, 1)], ids=["2d", "4d"])
def test_input_wrong_ndim(gru, which, shape):
    xs, ps, _ = args(gru)
    xs[which] = torch.zeros(shape)
    with raises(ValueError, f"inputs['{which}']", "(B, T, D)", str(shape)):
        gru.apply(xs, ps)


@pytest.mark.parametrize("dim,label", [(0, "B"), (1, "T"), (2, "D")])
def test_input_mismatched_sizes(gru, dim, label):
    xs, ps, _ = args(gru)
    shape = [B, T, D]
    shape[dim] += 1
    xs["x_h"] = torch.zeros(shape)
    with raises(ValueError, "inputs['x_h']", "(B, T, D)", f"{label}=", str(tuple(shape))):
        gru.apply(xs, ps)


def test_zero_channels(gru):
    xs = {n: torch.zeros(B, T, 0) for n in gru.inputs}
    ps = {n: torch.zeros(0) for n in gru.params}
    with raises(ValueError, "inputs['x_z']", "D = 0"):
        gru.apply(xs, ps)


@pytest.mark.parametrize("shape", [(D + 1,), (), (D, D), (1, D)], ids=str)
def test_vector_param_wrong_shape(gru, shape):
    xs, ps, _ = args(gru)
    ps["a_r"] = torch.zeros(shape)
    with raises(ValueError, "params['a_r']", "vector", "(D,)", str(shape)):
        gru.apply(xs, ps)


@pytest.mark.parametrize("shape", [(D,), (1,), (D, D)], ids=str)
def test_scalar_param_wrong_shape(coupled, shape):
    xs, ps, _ = args(coupled)
    ps["lam"] = torch.zeros(shape)
    with raises(ValueError, "params['lam']", "scalar", "()", str(shape)):
        coupled.apply(xs, ps)


def test_vector_param_of_scalar_cell_wrong_shape(coupled):
    xs, ps, _ = args(coupled)
    ps["w"] = torch.tensor(0.5)
    with raises(ValueError, "params['w']", "vector", "(D,)"):
        coupled.apply(xs, ps)


@pytest.mark.parametrize("shape", [(D,), (D, D + 1), (D + 1, D), (), (1, D, D)], ids=str)
def test_matrix_param_wrong_shape(elman, shape):
    xs, ps, _ = args(elman)
    ps["W"] = torch.zeros(shape)
    with raises(ValueError, "params['W']", "matrix", "(D, D)", str(shape)):
        elman.apply(xs, ps)


@pytest.mark.parametrize("which", ["input", "param", "h0"])
def test_dtype_mismatch(gru, which):
    xs, ps, h0 = args(gru, torch.float32)
    if which == "input":
        xs["x_r"] = xs["x_r"].double()
        arg = "inputs['x_r']"
    elif which == "param":
        ps["a_h"] = ps["a_h"].double()
        arg = "params['a_h']"
    else:
        h0["h"] = h0["h"].half()
        arg = "h0['h']"
    with raises(TypeError, arg, "dtype", "inputs['x_z']"):
        gru.apply(xs, ps, h0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64],
                         ids=str)
def test_unsupported_dtype(gru, dtype):
    xs, ps, _ = args(gru)
    xs = {n: x.to(dtype) for n, x in xs.items()}
    ps = {n: p.to(dtype) for n, p in ps.items()}
    with raises(TypeError, "inputs['x_z']", "dtype", "float32"):
        gru.apply(xs, ps)


@pytest.mark.parametrize("which", ["input", "param", "h0"])
def test_device_mismatch(gru, which):
    """No GPU here: the "meta" device stands in for a second device."""
    xs, ps, h0 = args(gru)
    if which == "input":
        xs["x_h"] = xs["x_h"].to("meta")
        arg = "inputs['x_h']"
    elif which == "param":
        ps["a_z"] = ps["a_z"].to("meta")
        arg = "params['a_z']"
    else:
        h0["h"] = h0["h"].to("meta")
        arg = "h0['h']"
    with raises(ValueError, arg, "meta", "device"):
        gru.apply(xs, ps, h0)


def test_h0_unknown_name(gru):
    xs, ps, _ = args(gru)
    with raises(ValueError, "h0", "unknown", "'c'"):
        gru.apply(xs, ps, {"c": torch.zeros(B, D)})


@pytest.mark.parametrize("shape", [(B, D + 1), (B + 1, D), (B, T, D), (D,)], ids=str)
def test_h0_wrong_shape(coupled, shape):
    xs, ps, _ = args(coupled)
    with raises(ValueError, "h0['v']", "(B, D)", str(shape)):
        coupled.apply(xs, ps, {"v": torch.zeros(shape)})


@pytest.mark.parametrize("method", ["Newton", "parallel", "", None])
def test_bad_method(gru, method):
    xs, ps, _ = args(gru)
    with raises(ValueError, "method", repr(method)):
        gru.apply(xs, ps, method=method)


@pytest.mark.parametrize("backend", ["gpu", "CPU", "numba", None])
def test_bad_backend(gru, backend):
    xs, ps, _ = args(gru)
    with raises(ValueError, "backend", repr(backend)):
        gru.apply(xs, ps, backend=backend)


def test_cuda_backend_without_cuda_or_simulator(gru, monkeypatch):
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: CPU tensors with backend='cuda' are then a device "
                    "question, tested elsewhere")
    xs, ps, _ = args(gru)
    with raises(ValueError, "backend='cuda'", "NUMBA_ENABLE_CUDASIM"):
        gru.apply(xs, ps, backend="cuda")


def test_newton_on_cuda_for_dense_cell_is_refused_clearly(elman, monkeypatch):
    # dense cells have sequential CUDA kernels (tests/test_cuda_dense_sim.py), no Newton one
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # only the check reads it here
    xs, ps, _ = args(elman)
    with pytest.raises(ValueError, match="method='newton'.*method='sequential'"):
        elman.apply(xs, ps, method="newton", backend="cuda")


@pytest.mark.parametrize("iterations", [-1, -100])
def test_bad_iterations(gru, iterations):
    xs, ps, _ = args(gru)
    with raises(ValueError, "iterations", repr(iterations)):
        gru.apply(xs, ps, method="newton", backend="torch", iterations=iterations)


@pytest.mark.parametrize("iterations", [1.5, "3", True])
def test_iterations_of_the_wrong_type(gru, iterations):
    xs, ps, _ = args(gru)
    with raises(TypeError, "iterations", repr(iterations)):
        gru.apply(xs, ps, method="newton", backend="torch", iterations=iterations)


@pytest.mark.parametrize("tol", [0.0, -1e-6, float("nan")])
def test_bad_tol(gru, tol):
    xs, ps, _ = args(gru)
    with raises(ValueError, "tol"):
        gru.apply(xs, ps, method="newton", backend="torch", tol=tol)


def test_errors_do_not_depend_on_the_backend(gru):
    """Validation happens before the backend is chosen: the torch reference backend rejects
    the same arguments with the same message as the CPU backend."""
    xs, ps, _ = args(gru)
    ps["a_r"] = torch.zeros(D + 1)
    messages = []
    for backend in ("cpu", "torch", "auto"):
        with pytest.raises(ValueError) as info:
            gru.apply(xs, ps, backend=backend)
        messages.append(str(info.value))
    assert len(set(messages)) == 1


def test_meta_tensors_give_shapes_without_running(gru):
    """All tensors on the meta device: the op's fake implementation answers with shapes."""
    xs, ps, h0 = args(gru)
    meta = [{n: t.to("meta") for n, t in d.items()} for d in (xs, ps, h0)]
    out = gru.apply(*meta, backend="cpu")
    assert out["h"].device.type == "meta" and out["h"].shape == (B, T, D)


def test_path_object_of_a_shipped_cell_loads():
    cell = paracompile.load(Path(CELLS_DIR / "mingru.cell"))
    assert cell.name == "MinGRU"

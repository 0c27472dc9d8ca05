"""The kernel launchers `_cpu` and `_cuda`: one interface (the runtime only picks one), the
CPU host driver written once (generated modules hold kernels only), stats returned rather than
kept in a global, and every run-time default defined once in `_defaults`."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import make_case, shipped

import paracompile
from paracompile import _cpu, _cuda, _defaults
from paracompile._backend import ForwardStats

PACKAGE = Path(paracompile.__file__).parent


def shared_parameters(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) of `fn`'s parameters, without `_cuda`'s extra launch knobs and
    `_cpu`'s `damping` (the CUDA kernels have no damped phase: they fall back directly)."""
    extras = {"threads", "damping"} | ({"method", "chunk"} if fn.__name__ == "backward"
                                       else set())
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
            if p.name not in extras]


@pytest.mark.parametrize("name", ["forward", "backward"])
def test_cpu_and_cuda_launchers_share_one_interface(name):
    assert shared_parameters(getattr(_cpu, name)) == shared_parameters(getattr(_cuda, name))


@pytest.mark.parametrize("name", ["paragru", "elman"])  # per-channel and dense kernels
def test_generated_cpu_modules_hold_kernels_only(name):
    module = shipped(name)._module("cpu", torch.float64)
    for host in ("forward", "backward", "unconverged"):
        assert not hasattr(module, host), host
    assert len(shipped(name).outputs) == module.N_OUTPUTS
    assert hasattr(module, "forward_outputs") == module.OUTPUTS_KERNEL


def args(cell, B=2, T=40, D=3, dtype=torch.float64):
    xs, ps, h0 = make_case(cell, B, T, D, dtype)
    return ([h0[n] for n in cell.states], [xs[n] for n in cell.inputs],
            [ps[n] for n in cell.params])


@pytest.mark.parametrize("name", ["paragru", "elman"])
def test_cpu_forward_returns_its_stats(name):
    cell = shipped(name)
    module = cell._module("cpu", torch.float64)
    h0s, xs, ps = args(cell)
    seq_states, seq_outputs, stats = _cpu.forward(module, h0s, xs, ps, method="sequential")
    assert stats == ForwardStats("sequential")
    # "auto" on the CPU is the sequential kernel, as for cell.apply
    assert _cpu.forward(module, h0s, xs, ps)[2] == ForwardStats("sequential")

    # no Newton update allowed: the initial guess is not converged, every sequence falls back;
    # fallbacks count (b, channel) pairs, batch entries for the dense elman (coupled channels)
    states, outputs, stats = _cpu.forward(module, h0s, xs, ps, method="newton", iterations=0)
    B, _, D = xs[0].shape
    expected = B if name == "elman" else B * D
    assert (stats.method, stats.iterations, stats.fallback) == ("newton", 0, expected)
    assert stats.residual > _defaults.default_tol("float64")
    assert stats.chunk == _defaults.CPU_TIME_CHUNK
    for a, b in zip(states + outputs, seq_states + seq_outputs, strict=True):
        assert torch.equal(a, b)

    # enough iterations (chunk 8: five time chunks): converged, no fallback
    states, outputs, stats = _cpu.forward(module, h0s, xs, ps, method="newton",
                                          iterations=40, chunk=8)
    assert (stats.fallback, stats.chunk) == (0, 8) and 0 < stats.iterations <= 40
    assert stats.residual <= _defaults.default_tol("float64")
    for a, b in zip(states + outputs, seq_states + seq_outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_stats_reach_the_cell_through_the_op():
    cell = shipped("paragru")
    h0s, xs, ps = args(cell)
    inputs = dict(zip(cell.inputs, xs, strict=True))
    params = dict(zip(cell.params, ps, strict=True))
    calls = cell.stats.calls
    cell.apply(inputs, params, method="newton", backend="cpu", iterations=0)
    assert cell.stats.calls == calls + 1
    B, D = xs[0].shape[0], xs[0].shape[2]  # every (sequence, channel) pair falls back
    assert cell.stats.last == {"iterations": 0, "fallback_sequences": B * D, "histogram": []}


def test_defaults():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        assert _defaults.default_tol(dtype) == _defaults.default_tol(name) == (
            _defaults.TOL_FACTOR * torch.finfo(dtype).eps)
    assert _defaults.default_iterations(torch.float64) == 10
    assert _defaults.default_iterations("float32") == 8
    with pytest.raises(ValueError, match="dtype"):
        _defaults.default_tol(torch.int32)
    assert _defaults.auto_backend(on_cuda=False, dense=True) == "cpu"
    assert _defaults.auto_backend(on_cuda=True, dense=False) == "cuda"
    assert _defaults.auto_backend(on_cuda=True, dense=True) == "cuda"
    assert _defaults.resolve_method("auto", "cuda", dense=False) == "newton"
    assert _defaults.resolve_method("auto", "cuda", dense=True) == "sequential"
    assert _defaults.resolve_method("auto", "cpu", dense=False) == "sequential"
    assert _defaults.resolve_method("newton", "cpu", dense=True) == "newton"
    with pytest.raises(ValueError, match="method"):
        _defaults.resolve_method("fast", "cpu", dense=False)


def test_simulator_switch_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    assert not _defaults.simulator_enabled()
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert _defaults.simulator_enabled()


DEFAULT_NAMES = {"METHODS", "BACKENDS", "DEFAULT_ITERATIONS", "DEFAULT_TOL", "TOL_FACTOR",
                 "DEFAULT_TIME_CHUNK", "CPU_TIME_CHUNK", "default_tol", "default_iterations",
                 "simulator_enabled", "auto_backend", "auto_method", "resolve_method",
                 "DAMPED_STEPS", "DAMPINGS", "LM_LAMBDA_INIT", "LM_LAMBDA_DOWN", "LM_LAMBDA_UP",
                 "CPU_CHANNEL_BLOCKS", "CPU_TASKS_PER_THREAD", "cpu_channel_block"}


def test_each_default_is_defined_once():
    """No module but `_defaults` assigns or defines a default's name."""
    for path in PACKAGE.glob("*.py"):
        if path.name == "_defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = {node.name}
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
            else:
                continue
            assert not names & DEFAULT_NAMES, (path.name, node.lineno, names & DEFAULT_NAMES)

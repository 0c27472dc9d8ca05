"""Newton's iteration control: the per-(sequence, channel) fallback on the CPU, the
iteration histogram in the stats, and the damped updates tried before the fallback."""

from __future__ import annotations

import pytest
import torch

import paracompile
from paracompile import _defaults, _reference

SHARP = "cell Sharp\nstate h\ninput x\nparam a\nh' = tanh(a * h + x)\n"


@pytest.fixture(scope="module")
def sharp():
    return paracompile.load(SHARP)


def _sharp_data():
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(2, 200, 4, generator=g, dtype=torch.float64)
    return {"x": x}, {"a": torch.full((4,), 4.0, dtype=torch.float64)}


def test_defaults_iterate_past_three():
    assert _defaults.default_iterations("float32") == 8
    assert _defaults.default_iterations("float64") == 10
    assert _defaults.DAMPED_STEPS > 0


def test_damping_cuts_fallbacks_and_matches_sequential(sharp, monkeypatch):
    inputs, params = _sharp_data()
    ref = sharp.apply(inputs, params, method="sequential", backend="cpu")["h"]
    monkeypatch.setattr(_defaults, "DAMPED_STEPS", 0)
    plain = sharp.apply(inputs, params, method="newton", backend="cpu", iterations=4)["h"]
    plain_fb = sharp.stats.last["fallback_sequences"]
    monkeypatch.setattr(_defaults, "DAMPED_STEPS", 8)
    damped = sharp.apply(inputs, params, method="newton", backend="cpu", iterations=4)["h"]
    damped_fb = sharp.stats.last["fallback_sequences"]
    assert 0 < damped_fb < plain_fb
    assert torch.equal(plain, ref)
    assert torch.allclose(damped, ref, rtol=0, atol=1e-12)


def test_fallback_counts_channels_and_histogram_sums(monkeypatch):
    sharp = paracompile.load(SHARP)  # fresh counters
    inputs, params = _sharp_data()
    monkeypatch.setattr(_defaults, "DAMPED_STEPS", 0)
    sharp.apply(inputs, params, method="newton", backend="cpu", iterations=4)
    last = sharp.stats.last
    # (b, channel) pairs, not batch entries: more than B = 2 fall back
    assert last["fallback_sequences"] > 2
    assert sum(last["histogram"]) + last["fallback_sequences"] == 2 * 4
    assert sharp.stats.histogram == last["histogram"]


def test_per_channel_fallback_keeps_converged_channels(monkeypatch):
    # channel 0 is easy (converges), channel 1 sharp: only channel 1's block is rerun
    cell = paracompile.load(SHARP)
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(1, 200, 2, generator=g, dtype=torch.float64)
    a = torch.tensor([0.1, 4.0], dtype=torch.float64)
    monkeypatch.setattr(_defaults, "DAMPED_STEPS", 0)
    out = cell.apply({"x": x}, {"a": a}, method="newton", backend="cpu", iterations=3)["h"]
    ref = cell.apply({"x": x}, {"a": a}, method="sequential", backend="cpu")["h"]
    assert cell.stats.last["fallback_sequences"] == 1
    assert cell.stats.last["histogram"][-1] == 1
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_histogram_of_easy_cell():
    cell = paracompile.load("cells/paragru.cell")
    g = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(2, 64, 3, generator=g) for n in cell.inputs}
    params = {n: torch.empty(3).uniform_(-0.5, 0.5, generator=g) for n in cell.params}
    cell.apply(inputs, params, method="newton", backend="cpu")
    last = cell.stats.last
    assert last["fallback_sequences"] == 0
    assert sum(last["histogram"]) == 2 * 3
    assert len(last["histogram"]) - 1 == last["iterations"]


def test_reference_damping(sharp):
    inputs, params = _sharp_data()
    step = sharp._torch_step
    args = ((torch.zeros(2, 4, dtype=torch.float64),), (inputs["x"],), (params["a"],))
    _, _, plain = _reference.newton(step, *args, dense=False, iterations=4, max_iterations=4)
    h, _, damped = _reference.newton(step, *args, dense=False, iterations=4, max_iterations=4,
                                     damped=8)
    ref, _ = _reference.sequential(step, *args)
    assert damped.iterations > 4
    assert damped.fallback_sequences <= plain.fallback_sequences
    assert sum(damped.histogram) + damped.fallback_sequences == 2
    assert torch.allclose(h[0], ref[0], rtol=0, atol=1e-12)

"""The printed vector-Jacobian product `step_vjp` (`_codegen._vjp_function`): reverse mode
over the CSE'd step, with each transcendental evaluated once, and forward mode where the step
selects. Its values are checked against torch for every cell and backend elsewhere
(test_cpu_backend, test_cuda_sim, test_regressions_codegen)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from paracompile._analyse import analyse
from paracompile._codegen import ScalarFunction, scalar_functions
from paracompile._parse import parse_cell

CELLS = Path(__file__).resolve().parent.parent / "cells"
CALL = re.compile(r"\b([a-z]+)_f32\(")


def _functions(text: str, filename: str = "t.cell") -> dict[str, ScalarFunction]:
    analysis = analyse(parse_cell(text, filename))
    return {f.name: f for f in scalar_functions(analysis, "cpu", "float32")}


def _calls(f: ScalarFunction) -> list[str]:
    return sorted(CALL.findall(" ".join([code for _, code in f.body] + list(f.results))))


@pytest.mark.parametrize("name", sorted(p.stem for p in CELLS.glob("*.cell")))
def test_shipped_cells_backpropagate_and_reuse_the_forward_values(name: str) -> None:
    path = CELLS / f"{name}.cell"
    fns = _functions(path.read_text(), str(path))
    vjp = fns["step_vjp"]
    # sigmoid' = sigmoid (1 - sigmoid), tanh' = 1 - tanh^2: no transcendental is evaluated
    # again for its derivative, so the vjp calls no more of them than the step does
    step_calls, vjp_calls = _calls(fns["step"]), _calls(vjp)
    for function in set(vjp_calls):
        assert vjp_calls.count(function) <= step_calls.count(function), (function, vjp)


def test_each_temporary_is_assigned_once_after_what_it_reads() -> None:
    vjp = _functions((CELLS / "paralstm.cell").read_text())["step_vjp"]
    assert any(target.startswith("adj") for target, _ in vjp.body), vjp  # reverse mode
    targets = [target for target, _ in vjp.body]
    assert len(targets) == len(set(targets))
    defined = set(vjp.args)
    for target, code in vjp.body:
        names = set(re.findall(r"\b(?:t|adj)\d+\b|\bi_\w+\b", code))
        assert names <= defined, (target, code)
        defined.add(target)
    assert not any(code in vjp.args for _, code in vjp.body)  # no alias of an argument


def test_a_step_with_a_select_keeps_forward_mode() -> None:
    # forward mode applies `_selects` to each whole derivative, so the untaken side's
    # -inf (log 0) cannot reach the gradient through a shared adjoint
    fns = _functions("cell Sel\nstate h\ninput x\nh' = where(x > 0, log(x), 0) + tanh(h)\n")
    assert not any(target.startswith("adj") for target, _ in fns["step_vjp"].body)

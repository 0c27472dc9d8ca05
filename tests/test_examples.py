"""The examples run from the repository root, briefly (tiny --steps), in subprocesses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CELLS_DIR, warm_kernels

ROOT = Path(__file__).resolve().parent.parent
MYCELL = ROOT / "examples" / "mycell.cell"

RUNS = {
    "char_lm": ["examples/char_lm.py", "--steps", "4", "--log-every", "2", "--batch", "4",
                "--seq-len", "32", "--generate", "20", "--method", "newton", "--threads", "1"],
    "char_lm_compare": ["examples/char_lm.py", "--compare", "--steps", "4", "--log-every", "2",
                        "--batch", "4", "--seq-len", "32", "--threads", "1"],
    "new_cell": ["examples/new_cell.py", "--steps", "3"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every example run of this module, the processes started together (start-up, i.e.
    importing torch and numba, dominates their time) after the kernels they use are compiled
    (in parallel, once: the examples would otherwise all compile the same ones)."""
    warm_kernels([(str(CELLS_DIR / "paragru.cell"), "float32"), (str(MYCELL), "float32"),
                  (str(MYCELL), "float64")])
    procs = {key: subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for key, args in RUNS.items()}
    out = {}
    for key, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[key] = subprocess.CompletedProcess(RUNS[key], proc.returncode, stdout, stderr)
    return out


def _ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, f"{' '.join(run.args)} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


LOSS_LINE = re.compile(r"step +(\d+) +loss (\d+\.\d+) +\(([\d,]+) tokens/s\)")


def test_char_lm_trains_and_generates(runs) -> None:
    out = _ok(runs["char_lm"])
    assert "cell ParaGRU (diagonal)" in out
    steps = [int(m.group(1)) for m in LOSS_LINE.finditer(out)]
    assert steps == [2, 4]
    assert all(float(m.group(2)) > 0 for m in LOSS_LINE.finditer(out))
    assert "validation loss" in out
    sample = out.split("sample (cell.step, temperature 0.7):\n", 1)[1]
    assert sample.startswith("def ") and len(sample.rstrip("\n")) >= len("def ") + 1


def test_char_lm_compare_shows_the_same_curve(runs) -> None:
    out = _ok(runs["char_lm_compare"])
    assert "method=newton" in out and "method=sequential" in out
    rows = re.findall(r"^ +(\d+) +(\d+\.\d+) +(\d+\.\d+) +(\S+)$", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1, 2, 4]
    for _, a, b, _ in rows:
        assert abs(float(a) - float(b)) < 1e-3
    match = re.search(r"max \|loss difference\| over 4 steps: (\S+) -> the same loss curve", out)
    assert match and float(match.group(1)) < 1e-3


def test_new_cell(runs) -> None:
    out = _ok(runs["new_cell"])
    assert "cell GatedLeaky" in out and "structure: diagonal" in out
    assert "tau ~ constant(0.95)" in out
    assert "unknown function 'tahn'" in out
    assert "newton == sequential: yes" in out
    assert re.search(r"step +3 +loss \d", out)

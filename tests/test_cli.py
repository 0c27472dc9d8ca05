"""`paracompile check FILE.cell`: structure on stdout, exit 0; or one positioned error line
on stderr, exit 1, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _cell_cases import ERROR_CASES

from paracompile._cli import main

ROOT = Path(__file__).resolve().parent.parent
CELLS = sorted((ROOT / "cells").glob("*.cell"))
STRUCTURES = {"paragru": "diagonal", "paralstm": "block(2)", "mingru": "diagonal",
              "indrnn": "diagonal", "elman": "dense", "coupled3": "block(3)"}


BAD_SUBPROCESS_CASES = ["syntax-operator"]  # the others run in-process (start-up is slow)
WARN_TEXT = "cell A\nstate h\ninput x, y\nparam p : scalar\nh' = h + x\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every `python -m paracompile check` of this module, the processes started together
    (interpreter and package start-up dominate their time)."""
    tmp = tmp_path_factory.mktemp("cli")
    files = {p.stem: str(p.relative_to(ROOT)) for p in CELLS}
    for case, text, *_ in ERROR_CASES:
        if case in BAD_SUBPROCESS_CASES:
            (tmp / f"{case}.cell").write_text(text)
            files[case] = str(tmp / f"{case}.cell")
    (tmp / "unused.cell").write_text(WARN_TEXT)
    files["unused"] = str(tmp / "unused.cell")
    files["missing"] = str(tmp / "missing.cell")
    procs = {
        key: subprocess.Popen([sys.executable, "-m", "paracompile", "check", path], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for key, path in files.items()
    }
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[key] = subprocess.CompletedProcess([files[key]], proc.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", [p.stem for p in CELLS])
def test_check_shipped_cell(runs: dict, name: str) -> None:
    run = runs[name]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no warnings for the shipped cells
    assert f"structure: {STRUCTURES[name]}\n" in run.stdout
    assert run.stdout.startswith("cell ")
    assert "states:" in run.stdout and "jacobian" in run.stdout and "kernels:" in run.stdout


def test_check_paralstm_prints_block2(runs: dict) -> None:
    out = runs["paralstm"].stdout
    assert "block(2)" in out
    assert "states:  c, h" in out
    assert "dc'/dh = " in out and "dh'/dc = " in out  # the coupling entries are listed


def test_check_mingru_lists_only_proven_nonzero_entries(runs: dict) -> None:
    out = runs["mingru"].stdout
    assert "dh'/dh = 1 - z" in out


LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.+)$")


def test_every_bad_input_gives_one_positioned_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    for case, text, line, column, fragments in ERROR_CASES:
        path = tmp_path / f"{case}.cell"
        path.write_text(text)
        code = main(["check", str(path)])
        out, err = capsys.readouterr()
        assert code == 1, case
        assert out == "", case
        lines = err.splitlines()
        assert len(lines) == 1 and err.endswith("\n"), (case, err)
        match = LINE.match(lines[0])
        assert match, (case, err)
        assert match["file"] == str(path)
        assert (int(match["line"]), int(match["col"])) == (line, column), (case, err)
        assert all(f in match["msg"] for f in fragments), (case, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("case", BAD_SUBPROCESS_CASES)
def test_bad_file_in_a_subprocess(runs: dict, case: str) -> None:
    _, _, line, column, _ = next(c for c in ERROR_CASES if c[0] == case)
    run = runs[case]
    assert run.returncode == 1
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"{run.args[0]}:{line}:{column}: error: ")


def test_unreadable_file(runs: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run = runs["missing"]
    assert run.returncode == 1
    assert run.stderr == f"paracompile: error: cannot read {run.args[0]}: No such file or " \
        "directory\n"
    with pytest.raises(SystemExit, match="cannot read .*: Is a directory"):  # printed, exit 1
        main(["check", str(tmp_path)])


def test_non_utf8_file(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "latin1.cell"
    path.write_bytes("cell A\nstate h\n# é ".encode() + b"caf\xe9\nh' = h\n")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"{path}:3:8: error: byte 0xe9 is not UTF-8 text; save the file as UTF-8\n"


def test_warnings_go_to_stderr(runs: dict) -> None:
    run = runs["unused"]
    path = run.args[0]
    assert run.returncode == 0
    assert "structure: diagonal" in run.stdout
    assert run.stderr.splitlines() == [
        f"{path}:3:10: warning: input 'y' is never used",
        f"{path}:4:7: warning: param 'p' is never used",
    ]


def test_warnings_in_process(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "unused.cell"
    path.write_text("cell A\nstate h\nconst k = 2\nz = h\nh' = h\n")
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "structure: diagonal" in out and "consts:  k = 2" in out
    assert err.splitlines() == [f"{path}:3:7: warning: const 'k' is never used",
                                f"{path}:4:1: warning: intermediate 'z' is never used"]


def test_dense_cell_mentions_the_matrix_diagonal(runs: dict) -> None:
    out = runs["elman"].stdout
    assert "params:  W (matrix), b (vector)" in out
    assert "_mdiag" in out and "diagonal of W" in out

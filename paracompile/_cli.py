"""Command line: ``paracompile check FILE.cell`` and ``paracompile build FILE.cell [-o DIR]``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import sympy as sp

from ._errors import CellError, CellWarning


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SystemExit(f"paracompile: error: cannot read {path}: {err.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[:err.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise CellError(line, column, f"byte 0x{data[err.start]:02x} is not UTF-8 text; "
                        "save the file as UTF-8", path) from None


def _check(args: argparse.Namespace) -> int:
    from ._analyse import analyse
    from ._parse import parse_cell

    ir = parse_cell(_read(args.file), filename=args.file)
    analysis = analyse(ir)
    print(f"cell {ir.name}")
    print(f"  states:  {', '.join(ir.states)}")
    print(f"  inputs:  {', '.join(ir.inputs) or '-'}")
    params = ", ".join(f"{p.name} ({p.kind})" for p in ir.params)
    print(f"  params:  {params or '-'}")
    if ir.consts:
        print(f"  consts:  {', '.join(f'{k} = {v:g}' for k, v in ir.consts.items())}")
    if ir.outputs:
        print(f"  outputs: {', '.join(ir.outputs)}")
    print("jacobian (per channel, d new / d old; entries not listed are proven zero):")
    for i, si in enumerate(ir.states):
        for j, sj in enumerate(ir.states):
            if analysis.pattern[i][j]:
                print(f"  d{si}'/d{sj} = {sp.sstr(analysis.readable(analysis.jacobian[i, j]))}")
    if analysis.matvecs:
        names = ", ".join(t.matrix for t in analysis.matvecs)
        print(f"  (_mdiag* is the diagonal of {names}; the other entries of the matrix couple "
              "channels)")
    print(f"structure: {analysis.structure}")
    print(f"kernels: {_kernels(analysis.structure)}")
    return 0


def _kernels(structure: str) -> str:
    if structure == "dense":
        return ("sequential (channel-mixing matvec per step); newton with quasi-Newton "
                "(exact channel-diagonal of J) + sequential fallback; adjoint backward")
    return ("sequential; fused newton + chunked parallel reduction over "
            f"{structure} affine maps; fused adjoint backward")


def _build(args: argparse.Namespace) -> int:
    from ._driver import build

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"paracompile: error: -o {out_dir}: not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = build(args.file, out_dir)
    print(f"wrote {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paracompile",
        description="Compile the recurrence of an RNN cell into PyTorch ops.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="parse and analyse a .cell file; print its structure")
    check.add_argument("file", help="the .cell file")
    check.set_defaults(run=_check)
    build = sub.add_parser(
        "build", help="write DIR/<snake_name>.py: the cell's ops as an importable module")
    build.add_argument("file", help="the .cell file")
    build.add_argument("-o", "--output", default=".", metavar="DIR",
                       help="directory to write into (default: the current directory)")
    build.set_defaults(run=_build)
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CellWarning)
            code = args.run(args)
        for w in caught:
            print(w.message, file=sys.stderr)
        return code
    except CellError as err:
        print(err.format(), file=sys.stderr)
        return 1

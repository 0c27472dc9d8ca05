"""Command line: ``paracompile check FILE.cell`` and ``paracompile build FILE.cell [-o DIR]``.

Every outcome is a message, never a traceback: mistakes in the cell are positioned errors
and other user errors ``paracompile: error: ...`` (exit 1); an unexpected exception is
reported as an internal error (exit 2; ``PARACOMPILE_TRACEBACK=1`` shows its traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import sympy as sp

from ._driver import ShadowingError, check_name, decode_cell
from ._errors import CellError, CellWarning
from ._version import __version__


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SystemExit(f"paracompile: error: cannot read {path}: {err.strerror}") from None
    return decode_cell(data, path)


def _check(args: argparse.Namespace) -> int:
    from ._analyse import analyse
    from ._convergence import convergence_hint
    from ._parse import parse_cell

    ir = parse_cell(_read(args.file), filename=args.file)
    check_name(ir)  # what `load` and `build` would reject
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
    print(convergence_hint(analysis).line())
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

    _read(args.file)  # an unreadable FILE: the same message as `check`
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"paracompile: error: -o {out_dir}: not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = build(args.file, out_dir, force=args.force)
    except (FileExistsError, ShadowingError) as err:
        raise SystemExit(f"paracompile: error: {err}") from None
    except OSError as err:
        where = err.filename if err.filename is not None else out_dir
        raise SystemExit(f"paracompile: error: cannot write {where}: {err.strerror or err}"
                         ) from None
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
    build.add_argument("-f", "--force", action="store_true",
                       help="overwrite DIR/<snake_name>.py even if it is not an unedited "
                       "module built by paracompile, and even if its name shadows another "
                       "module")
    build.set_defaults(run=_build)
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CellWarning)
        try:
            return args.run(args)
        except CellError as err:
            print(err.format(), file=sys.stderr)
            return 1
        except RecursionError:
            print(f"paracompile: error: {args.file}: an expression is too long or too deeply "
                  "nested to compile (Python's recursion limit); split it into intermediates",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except Exception as err:  # noqa: BLE001 - the last resort: never a bare traceback
            if os.environ.get("PARACOMPILE_TRACEBACK"):
                raise
            print(f"paracompile: internal error: {type(err).__name__}: {err}\n"
                  f"This is a bug in paracompile {__version__}: please report it with the "
                  "command and the .cell file (PARACOMPILE_TRACEBACK=1 shows the traceback).",
                  file=sys.stderr)
            return 2
        finally:
            for w in caught:
                prefix = "" if issubclass(w.category, CellWarning) else "paracompile: warning: "
                print(f"{prefix}{w.message}", file=sys.stderr)

"""paracompile: compile the recurrence of an RNN cell into PyTorch ops (see docs/api.md).

    cell = paracompile.load("cells/paragru.cell")
    out = cell.apply(inputs, params)          # dict of (B, T, D) tensors

Importing the package does not import SymPy, Lark or Jinja: they load only when a cell has
to be parsed or rendered, so modules written by `paracompile build` run without them.
"""

from typing import Any

from ._driver import load
from ._errors import CellError, CellWarning
from ._runtime import CompiledCell
from ._version import __version__

__all__ = ["CellError", "CellWarning", "CompiledCell", "cell", "load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "cell":  # the Python frontend needs SymPy
        from ._driver import cell

        return cell
    raise AttributeError(f"module 'paracompile' has no attribute {name!r}")

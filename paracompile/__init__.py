"""paracompile: compile the recurrence of an RNN cell into PyTorch ops (see SPEC §4).

    cell = paracompile.load("cells/paragru.cell")
    out = cell.apply(inputs, params)          # dict of (B, T, D) tensors
"""

from ._driver import load
from ._errors import CellError, CellWarning
from ._frontend import cell
from ._runtime import CompiledCell
from ._version import __version__

__all__ = ["CellError", "CellWarning", "CompiledCell", "cell", "load", "__version__"]

"""paracompile: compile the recurrence of an RNN cell into PyTorch ops (see SPEC §4)."""

from ._errors import CellError, CellWarning
from ._frontend import cell

__version__ = "0.1.0"
__all__ = ["CellError", "CellWarning", "cell", "__version__"]

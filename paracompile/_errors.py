"""User-facing errors: every mistake in a cell definition carries a position."""

from __future__ import annotations


class CellError(Exception):
    """A mistake in a cell definition, at ``line``:``column`` (1-based) of ``filename``.

    ``str(err)`` is the one-line form ``FILE:LINE:COL: error: MESSAGE`` printed by the CLI.
    """

    def __init__(
        self, line: int, column: int, message: str, filename: str = "<cell>"
    ) -> None:
        self.line = line
        self.column = column
        self.message = message
        self.filename = filename
        super().__init__(self.format())

    def format(self) -> str:
        return f"{self.filename}:{self.line}:{self.column}: error: {self.message}"

    def __reduce__(self):  # keep the exception picklable (multiprocessing, DDP)
        return (type(self), (self.line, self.column, self.message, self.filename))


class CellWarning(UserWarning):
    """A suspicious but valid cell definition (for example an unused declaration)."""

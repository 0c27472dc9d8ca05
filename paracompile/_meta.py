"""`CellMeta`: what the runtime needs to know about a compiled cell, as a typed record.

Written by the driver (the analysis' summary) into the cache as JSON and, as a dict literal,
into modules written by `paracompile build`; read back by `CompiledCell`. Imports neither
SymPy nor torch: built modules and cache hits use it without the compiler.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# a parameter's initialisation hint: (distribution, its arguments), e.g. ("normal", (0.0, 0.1))
Init = tuple[str, tuple[float, ...]]


@dataclass(frozen=True)
class CellMeta:
    """The metadata of one compiled cell (the analysis' result minus SymPy)."""

    name: str  # the cell's name, as declared
    version: str  # the paracompile version that analysed it
    key: str  # its cache key (see `_cache.key`): names its ops and cache files
    states: tuple[str, ...]  # state names, in declaration order
    inputs: tuple[str, ...]  # input names, in declaration order
    params: dict[str, str]  # param name -> "vector" | "scalar" | "matrix", in declaration order
    inits: dict[str, Init | None]  # param name -> its `~` hint, None without one
    outputs: tuple[str, ...]  # output names, in declaration order
    structure: str  # "diagonal", "block(K)" or "dense"
    jac_entries: tuple[tuple[int, int], ...]  # nonzero (i, j) of the per-channel Jacobian
    source: str  # the `.cell` text ("" for a cell traced from a Python function)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible values (lists for tuples): `from_dict` reads them back."""
        return {
            "name": self.name,
            "version": self.version,
            "key": self.key,
            "states": list(self.states),
            "inputs": list(self.inputs),
            "params": dict(self.params),
            "inits": {n: None if i is None else [i[0], list(i[1])] for n, i in self.inits.items()},
            "outputs": list(self.outputs),
            "structure": self.structure,
            "jac_entries": [list(e) for e in self.jac_entries],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellMeta:
        """The metadata from `to_dict`'s form; ValueError when a field is missing."""
        missing = [f for f in field_names() if f not in data]
        if missing:
            raise ValueError(f"cell metadata without {', '.join(missing)}")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            key=str(data["key"]),
            states=tuple(data["states"]),
            inputs=tuple(data["inputs"]),
            params=dict(data["params"]),
            inits={n: None if i is None else (i[0], tuple(i[1]))
                   for n, i in data["inits"].items()},
            outputs=tuple(data["outputs"]),
            structure=str(data["structure"]),
            jac_entries=tuple((int(i), int(j)) for i, j in data["jac_entries"]),
            source=str(data["source"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CellMeta:
        """ValueError when `text` is not the JSON of a `to_dict` (e.g. a damaged file)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("cell metadata is not a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, AttributeError) as err:  # a field of the wrong shape
            raise ValueError(f"malformed cell metadata: {err}") from None


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CellMeta))

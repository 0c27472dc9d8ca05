"""The `nn.Module` layer of a compiled cell (`cell.Layer`, see docs/api.md).

Imports only torch and `_checks`: the layer reaches its cell through the `CompiledCell` it
is given (``cls.cell``), and pickles by the cell's `loader`, so it needs neither `_runtime`
nor the driver (the runtime imports this module for `cell.Layer`, not the reverse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._checks import check_choice, check_layer_dtype, check_layer_x, positive_int
from ._defaults import BACKENDS, METHODS

if TYPE_CHECKING:
    from ._runtime import CompiledCell

PROJECTIONS = ("heads", "dense")

__all__ = ["CellLayer", "CellParameters", "layer_class"]


# -- the layer ---------------------------------------------------------------------------------


class CellParameters(nn.Module):
    """The learnable parameters of a cell, under the cell's own names (``layer.cell_params``).

    ``cell_params["a_z"]`` always works; ``cell_params.a_z`` works unless the name is also an
    attribute of `nn.Module` (e.g. a parameter called ``type``). Iterating gives the names.
    """

    def add(self, name: str, value: nn.Parameter) -> None:
        if hasattr(self, name) and name not in self._parameters:
            self._parameters[name] = value  # shadowed by a Module attribute: item access only
        else:
            self.register_parameter(name, value)

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[name]  # type: ignore[return-value]

    def __iter__(self):
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(p.shape)}" for n, p in self._parameters.items())

    def as_dict(self) -> dict[str, Tensor]:
        """name -> parameter, in the cell's declaration order (the `params` of `apply`)."""
        return dict(self._parameters)  # type: ignore[arg-type]


class CellLayer(nn.Module):
    """A recurrent layer running a compiled cell; subclassed per cell by `cell.Layer`.

    ``cell.Layer(input_size, hidden_size, num_heads=1, bias=True, projection="heads",
    method="auto", backend="auto", dtype=None, device=None)``

    The layer projects ``x`` (B, T, input_size) to every input of the cell, each
    (B, T, hidden_size), runs the cell over the sequence with `CompiledCell.apply`, and
    returns ``(output, final_state)`` with the conventions of
    ``torch.nn.GRU(batch_first=True)``:

    * ``output`` (B, T, hidden_size): the cell's first declared ``output`` if it has any,
      else its last declared state (``h`` for ParaLSTM, whose states are ``c, h``);
    * ``final_state``: the states after the last step: a (B, hidden_size) tensor when the
      cell has one state, else a dict state name -> (B, hidden_size). ``h0`` takes the same
      forms (a dict may leave states out: they start at zero; for T = 0 the final state is
      ``h0``).

    Projection (``len(cell.inputs)`` = m projected inputs; parameters ``weight``, ``bias``):

    * ``projection="heads"`` (default): multi-head block-diagonal, as in ParaRNN: x is split
      into ``num_heads`` groups of ``input_size / num_heads`` features; head n maps its group
      to channels ``[n*dh, (n+1)*dh)`` (``dh = hidden_size / num_heads``) of every cell input.
      ``weight`` has shape (num_heads, m * dh, input_size / num_heads): rows ``i*dh .. (i+1)*dh``
      of ``weight[n]`` give input i. With ``num_heads=1`` this is a full linear map.
    * ``projection="dense"``: one full linear map, ``weight`` (m * hidden_size, input_size) as
      in `nn.Linear`; rows ``i*H .. (i+1)*H`` give input i. ``num_heads`` must be 1.
    * ``bias`` (m, hidden_size): ``bias[i]`` is added to input i (absent with ``bias=False``).

    Initialisation (`reset_parameters`):

    * ``weight`` and ``bias``: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in `nn.Linear`,
      ``fan_in = input_size / num_heads`` (heads) or ``input_size`` (dense).
    * the cell's parameters (``cell_params``, named as in the cell, shapes (H,) vector, ()
      scalar, (H, H) matrix): from the ``.cell`` hint (``param a ~ uniform(lo, hi)``,
      ``normal(mean, std)`` or ``constant(v)``); without a hint uniform(-1/sqrt(H), 1/sqrt(H)),
      H = hidden_size, the default of every weight of `nn.GRU` / `nn.RNN`.

    ``method`` and ``backend`` are passed to `apply` (attributes; change them at any time).
    Works under `torch.compile` and `DistributedDataParallel`; `layer.step` decodes one step
    at a time. Save with ``state_dict()``; deepcopy works, and so does pickling for cells
    loaded from ``.cell`` text (by their source).
    """

    cell: CompiledCell  # set on each subclass by `layer_class`

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_heads: int = 1,
        bias: bool = True,
        projection: str = "heads",
        method: str = "auto",
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        cell = self.cell
        if not cell.inputs:
            raise ValueError(f"cell {cell.name} has no inputs, so a Layer has nothing to project "
                             "x to; declare an input")
        self.input_size = positive_int("input_size", input_size)
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.num_heads = positive_int("num_heads", num_heads)
        check_choice("projection", projection, PROJECTIONS)
        if projection == "dense" and num_heads != 1:
            raise ValueError(f"num_heads={num_heads} needs projection='heads' (block-diagonal); "
                             "projection='dense' is one full matrix: leave num_heads=1")
        for arg, size in (("input_size", input_size), ("hidden_size", hidden_size)):
            if size % num_heads:
                raise ValueError(f"{arg}={size} is not divisible by num_heads={num_heads}; "
                                 "each head takes an equal share of the input and hidden "
                                 "features")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        check_choice("method", method, METHODS)
        check_choice("backend", backend, BACKENDS)
        check_layer_dtype(dtype)
        factory = {"dtype": dtype, "device": device}
        self.projection = projection
        self.method = method
        self.backend = backend
        m, H, nh = len(cell.inputs), hidden_size, num_heads
        if projection == "heads":
            shape: tuple[int, ...] = (nh, m * (H // nh), input_size // nh)
        else:
            shape = (m * H, input_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(m, H, **factory)) if bias else None
        self.cell_params = CellParameters()
        for name, kind in cell.params.items():
            pshape = {"vector": (H,), "scalar": (), "matrix": (H, H)}[kind]
            self.cell_params.add(name, nn.Parameter(torch.empty(pshape, **factory)))
        self.reset_parameters()

    # -- parameters ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter (see the class docstring)."""
        fan_in = self.weight.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        default = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.cell_params.as_dict().items():
            hint = self.cell.inits.get(name)
            dist, args = (hint[0], tuple(hint[1])) if hint else ("uniform", (-default, default))
            if dist == "uniform":
                nn.init.uniform_(p, args[0], args[1])
            elif dist == "normal":
                nn.init.normal_(p, args[0], args[1])
            elif dist == "constant":
                nn.init.constant_(p, args[0])
            else:  # pragma: no cover - the parser only accepts the three above
                raise ValueError(f"unknown initialisation {dist!r} for parameter {name!r}")

    def cell_parameters(self) -> dict[str, Tensor]:
        """The cell's parameters as the ``params`` dict of `CompiledCell.apply`."""
        return self.cell_params.as_dict()

    # -- computation ---------------------------------------------------------------------------
    def project(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, T, input_size) -> cell input name -> (B, T, hidden_size)."""
        self._check_x(x, "(B, T, input_size)", 3)
        B, T, _ = x.shape
        m, H, nh = len(self.cell.inputs), self.hidden_size, self.num_heads
        if self.projection == "heads":
            xh = x.reshape(B, T, nh, self.input_size // nh)
            y = torch.einsum("btni,noi->btno", xh, self.weight)
            y = y.reshape(B, T, nh, m, H // nh).permute(3, 0, 1, 2, 4).reshape(m, B, T, H)
        else:
            y = F.linear(x, self.weight).reshape(B, T, m, H).permute(2, 0, 1, 3)
        if self.bias is not None:
            y = y + self.bias[:, None, None, :].to(y.dtype)
        y = y.contiguous()
        return dict(zip(self.cell.inputs, y.unbind(0), strict=True))

    def forward(self, x: Tensor, h0: Tensor | Mapping[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
        """x (B, T, input_size), h0 (see the class docstring) -> (output (B, T, hidden_size),
        final_state)."""
        inputs = self.project(x)
        first = inputs[self.cell.inputs[0]]
        B, T = first.shape[:2]
        start = self._h0(h0, B, first)
        params = {n: p.to(first.dtype) for n, p in self.cell_params.as_dict().items()}
        out = self.cell.apply(inputs, params, start, method=self.method, backend=self.backend)
        cell = self.cell
        output = out[cell.outputs[0] if cell.outputs else cell.states[-1]]
        if T == 0:
            final = {n: start[n] if start and n in start else first.new_zeros(B, self.hidden_size)
                     for n in cell.states}
        else:
            final = {n: out[n][:, -1] for n in cell.states}
        return output, self._state_form(final)

    def step(self, x: Tensor, state: Tensor | Mapping[str, Tensor] | None = None
             ) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
        """One step for decoding, with `CompiledCell.step`: x (B, input_size) and a state in
        the form of ``final_state`` -> (output (B, hidden_size), new state)."""
        self._check_x(x, "(B, input_size)", 2)
        inputs = {n: v[:, 0] for n, v in self.project(x[:, None]).items()}
        first = inputs[self.cell.inputs[0]]
        start = self._h0(state, x.shape[0], first, arg="state")
        params = {n: p.to(first.dtype) for n, p in self.cell_params.as_dict().items()}
        new, outputs = self.cell.step(inputs, params, start)
        cell = self.cell
        output = outputs[cell.outputs[0]] if cell.outputs else new[cell.states[-1]]
        return output, self._state_form(new)

    # -- helpers -------------------------------------------------------------------------------
    def _check_x(self, x: Any, shape_text: str, dim: int) -> None:
        check_layer_x(x, shape_text, dim, self.input_size, self.weight.dtype)

    def _h0(self, h0: Any, B: int, like: Tensor, arg: str = "h0") -> dict[str, Tensor] | None:
        """h0 as the dict `apply` takes (cast to the computation's dtype), or None."""
        if h0 is None:
            return None
        states = self.cell.states
        if isinstance(h0, Tensor):
            if len(states) != 1:
                raise TypeError(f"cell {self.cell.name} has states {', '.join(states)}: pass "
                                f"{arg} as a dict state name -> (B, hidden_size) tensor")
            h0 = {states[0]: h0}
        elif not isinstance(h0, Mapping):
            form = ("a (B, hidden_size) tensor or a dict" if len(states) == 1
                    else "a dict state name -> (B, hidden_size) tensor")
            raise TypeError(f"{arg} must be {form}, got {type(h0).__name__}")
        unknown = [n for n in h0 if n not in states]
        if unknown:
            raise ValueError(f"{arg}: unknown state(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(states)}")
        result = {}
        for n, h in h0.items():
            where = f"{arg}[{n!r}]" if len(states) > 1 else arg
            if not isinstance(h, Tensor):
                raise TypeError(f"{where} must be a torch.Tensor of shape (B, hidden_size), "
                                f"got {type(h).__name__}")
            if tuple(h.shape) != (B, self.hidden_size):
                raise ValueError(f"{where} must have shape (B, hidden_size) = "
                                 f"{(B, self.hidden_size)}, got {tuple(h.shape)}")
            if not h.is_floating_point():
                raise TypeError(f"{where} has dtype {h.dtype}; expected a floating-point tensor")
            result[n] = h.to(like.dtype)
        return result

    def _state_form(self, states: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        return states[self.cell.states[0]] if len(self.cell.states) == 1 else states

    def __reduce_ex__(self, protocol):  # noqa: ANN001, ANN204
        """Pickle (torch.save(layer), multiprocessing) by the cell's `loader` (for a cell
        loaded from `.cell` text: its source): unpickling finds the layer class again."""
        loader = self.cell.loader
        if loader is None:  # a cell traced from a Python function: deepcopy works, pickle doesn't
            return super().__reduce_ex__(protocol)
        return (_layer_of_cell, (self.cell.key, loader), self.__dict__.copy())

    def extra_repr(self) -> str:
        cell = self.cell
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.projection == "heads":
            parts.append(f"num_heads={self.num_heads}")
        else:
            parts.append("projection='dense'")
        if self.bias is None:
            parts.append("bias=False")
        parts += [f"cell={cell.name}", f"structure={cell.structure!r}",
                  f"method={self.method!r}", f"backend={self.backend!r}"]
        return ", ".join(parts)


_CLASSES: dict[str, type] = {}


def _layer_of_cell(key: str, loader: Callable[[], CompiledCell]) -> CellLayer:
    """An uninitialised layer of the cell with this key (for unpickling and deepcopy): the
    class already made for it in this process, else the one of the cell `loader()` makes."""
    cls = _CLASSES.get(key)
    if cls is None:
        cls = loader().Layer
    return cls.__new__(cls)


def layer_class(cell: CompiledCell) -> type:
    """The `CellLayer` subclass bound to `cell` (one class per cell key), named
    ``<CellName>Layer``."""
    cls = _CLASSES.get(cell.key)
    if cls is None:
        name = f"{cell.name}Layer"
        doc = (f"A recurrent layer running cell {cell.name} (states {', '.join(cell.states)}; "
               f"inputs {', '.join(cell.inputs) or '-'}; structure {cell.structure}).\n\n"
               + (CellLayer.__doc__ or ""))
        cls = type(name, (CellLayer,), {"cell": cell, "__doc__": doc,
                                        "__module__": __name__, "__qualname__": name})
        _CLASSES[cell.key] = cls
    return cls

"""Checks of the arguments of `CompiledCell.apply`/`step` and of `cell.Layer`: each raises a
TypeError or ValueError naming the argument, before any kernel runs.

Imports only torch (no other paracompile module): `_runtime` and `_layer` both use it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

# the dtypes kernels compute in; float16/bfloat16 are accepted and computed in float32
COMPUTE_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACCEPTED_TEXT = "float32, float64, float16 or bfloat16"

# same(arg, tensor, shape, shape_text): see `consistency_check`
Check = Callable[[str, torch.Tensor, tuple[int, ...], str], None]


def check_names(arg: str, given: Any, expected: tuple[str, ...], required: bool) -> None:
    """`given` is a mapping whose keys are among `expected` (all of them when `required`)."""
    if not isinstance(given, Mapping):
        raise TypeError(f"{arg} must be a dict of name -> tensor "
                        f"({', '.join(expected) or 'none'}), got {type(given).__name__}")
    unknown = [n for n in given if n not in expected]
    if unknown:
        raise ValueError(f"{arg}: unknown name(s) {', '.join(map(repr, unknown))}; expected "
                         f"{', '.join(expected) or 'none'}")
    missing = [n for n in expected if n not in given]
    if required and missing:
        raise ValueError(f"{arg}: missing {', '.join(map(repr, missing))} (expected "
                         f"{', '.join(expected)})")


def tensor(arg: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dtype(arg: str, dtype: torch.dtype) -> None:
    """A TypeError unless `dtype` is one that `apply`/`step` accept."""
    if dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"{arg} has dtype {dtype}; expected {_ACCEPTED_TEXT}")


def check_layer_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"dtype must be {_ACCEPTED_TEXT}, got {dtype}")


def consistency_check(ref_arg: str, ref: torch.Tensor, **dims: int) -> Check:
    """`same(arg, t, shape, shape_text)`: t has `shape` and the dtype and device of `ref`.

    `dims` (B=..., D=...) are formatted only for an error message: formatting symbolic sizes
    eagerly would make torch.compile guard on their values."""

    def same(arg: str, t: torch.Tensor, shape: tuple[int, ...], shape_text: str) -> None:
        if tuple(t.shape) != shape:
            sizes = ", ".join(f"{k}={v}" for k, v in dims.items())
            raise ValueError(f"{arg} must have shape {shape_text} = {shape} ({sizes} from "
                             f"{ref_arg}), got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{arg} has dtype {t.dtype}, but {ref_arg} has {ref.dtype}; use "
                            "one dtype for all tensors")
        if t.device != ref.device:
            raise ValueError(f"{arg} is on {t.device}, but {ref_arg} is on {ref.device}; put "
                             "all tensors on one device")

    return same


def param_tensors(params: Mapping[str, Any], kinds: Mapping[str, str], D: int,
                  same: Check) -> list[torch.Tensor]:
    """The params in declaration order, each checked: (D,) vector, () scalar, (D, D) matrix."""
    ps = []
    for n, kind in kinds.items():
        p = tensor(f"params[{n!r}]", params[n])
        shape, text = {"vector": ((D,), "(D,)"), "scalar": ((), "()"),
                       "matrix": ((D, D), "(D, D)")}[kind]
        same(f"params[{n!r}] ({kind})", p, shape, text)
        ps.append(p)
    return ps


def check_iterations(value: Any) -> int:
    # bool is an int subclass: iterations=True is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"iterations must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"iterations must be >= 0, got {value!r}")
    return int(value)


def check_tol(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"tol must be a float, got {type(value).__name__} {value!r}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"tol must be positive, got {value!r}")
    return float(value)


def check_choice(arg: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` is one of `choices` (method=, backend=, projection=)."""
    if value not in choices:
        raise ValueError(f"{arg} must be one of {choices}, got {value!r}")
    return value


def positive_int(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return value


def check_layer_x(x: Any, shape_text: str, dim: int, input_size: int,
                  param_dtype: torch.dtype) -> None:
    """x of a layer: a floating tensor of `dim` dims ending in `input_size`, in the dtype of
    the layer's parameters (unless autocast is on)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape {shape_text}, got "
                        f"{type(x).__name__}")
    if x.dim() != dim or x.shape[-1] != input_size:
        raise ValueError(f"x must have shape {shape_text} with input_size="
                         f"{input_size}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype}; expected a floating-point tensor")
    if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x has dtype {x.dtype}, but the layer's parameters are "
                        f"{param_dtype}; convert one of them (e.g. layer.to(x.dtype))")

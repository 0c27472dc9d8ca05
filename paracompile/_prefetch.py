"""A software prefetch for generated numba CPU kernels.

The CPU backward walks time backwards, so it reads and writes every (B, T, D) array at
descending addresses, one row of channels after another. The hardware prefetchers follow
such streams poorly: measured on ParaGRU (B=4, T=1024, D=256, float32, one thread), the
adjoint kernel took 4.8-6.0 ms walking backwards and 3.3-3.7 ms doing the same work forwards.
Fetching each stream a few rows ahead into L2 closes most of the gap: docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["prefetch"]

_READ = 0  # llvm.prefetch's rw argument: 0 = for reading
_LOCALITY = 2  # 0-3; 2 is prefetcht1 on x86 (the hint measured in docs/benchmarks.md)
_DATA = 1  # the data cache, not the instruction cache


def prefetch(array: np.ndarray, index: int) -> None:
    """Hint that ``array[index]``'s cache line will be needed soon (``llvm.prefetch``).

    No bounds check and no effect on results: an address outside the array is harmless to
    prefetch, but callers keep `index` inside it anyway. `array` is a 1-d C-contiguous array
    and `index` an integer. Called from Python (numba's NUMBA_DISABLE_JIT=1, as the fuzz
    tests run generated code) it does nothing."""


# no annotations on the parameters: numba requires them to match the implementation's
@overload(prefetch, inline="always")
def _prefetch_compiled(array, index) -> Callable[..., None] | None:
    if (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and isinstance(index, types.Integer)):
        return lambda array, index: _llvm_prefetch(array, index)
    return None


@intrinsic
def _llvm_prefetch(typingctx: Any, array: types.Array, index: types.Integer
                   ) -> tuple[types.Type, Callable[..., Any]]:
    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: list[ir.Value]
                ) -> ir.Value:
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        # as numba's own llvm.memset: an i8* argument, the name mangled by llvmlite (LLVM
        # upgrades the typed-pointer name where pointers are opaque)
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [address.type],
            ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        builder.call(function, [address, i32(_READ), i32(_LOCALITY), i32(_DATA)])
        return context.get_dummy_value()

    return types.void(array, index), codegen

"""A software prefetch for generated numba CPU kernels.

The CPU backward walks time backwards, so it reads and writes every (B, T, D) array at
descending addresses, one row of channels after another. The hardware prefetchers follow
such streams poorly: measured on ParaGRU (B=4, T=1024, D=256, float32, one thread), the
adjoint kernel took 5.0 ms walking backwards and 3.3 ms doing the same work forwards.
Fetching each stream a few rows ahead into L2 closes the gap (3.6 ms): docs/benchmarks.md.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["prefetch"]

_READ = 0  # llvm.prefetch's rw argument: 0 = for reading
_L2 = 2  # locality 2 (prefetcht1 on x86): into L2 and outwards, not L1, which the loop uses
_DATA = 1  # the data cache, not the instruction cache


def prefetch(array, index) -> None:
    """Hint that ``array[index]``'s cache line will be needed soon (``llvm.prefetch``, into
    L2). No bounds check and no effect on results: an address outside the array is harmless
    to prefetch, but callers keep `index` inside it anyway. `array` is a 1-d contiguous array
    and `index` an integer. Called from Python (numba's NUMBA_DISABLE_JIT=1, as the fuzz
    tests run generated code) it does nothing."""


@overload(prefetch, inline="always")
def _prefetch_compiled(array, index):
    if isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer):
        return lambda array, index: _llvm_prefetch(array, index)
    return None


@intrinsic
def _llvm_prefetch(typingctx, array, index):
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0]).data
        address = builder.gep(data, [args[1]])
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(function, [address, i32(_READ), i32(_L2), i32(_DATA)])
        return context.get_dummy_value()

    return types.void(array, index), codegen

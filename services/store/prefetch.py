"""A cache-line prefetch usable inside numba-compiled loops (LLVM's ``llvm.prefetch``).

Hash-table probes are bound by memory latency: a probe's row address is known only after its
index slot has been read. Lookups therefore run as a small pipeline — prefetch the index slot of
key ``i + 2D``, then the row of key ``i + D`` — so that the reads for key ``i`` hit the cache.
A prefetch never faults, so a stale or out-of-range hint only wastes a little bandwidth.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _emit_prefetch(builder, ptr) -> None:
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    # read (0), high temporal locality (3), data cache (1)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


@intrinsic
def prefetch1(typingctx, arr, i):
    """Prefetches ``&arr[i]`` of a 1-D array."""
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        _emit_prefetch(builder, cgutils.get_item_pointer(context, builder, aryty, ary, [idx], wraparound=False))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch2(typingctx, arr, i, j):
    """Prefetches ``&arr[i, j]`` of a 2-D array."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ii = context.cast(builder, args[1], signature.args[1], types.intp)
        jj = context.cast(builder, args[2], signature.args[2], types.intp)
        _emit_prefetch(builder, cgutils.get_item_pointer(context, builder, aryty, ary, [ii, jj], wraparound=False))
        return context.get_dummy_value()

    return sig, codegen

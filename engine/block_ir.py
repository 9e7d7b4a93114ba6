"""The IR building blocks shared by the block dot kernels (engine.block_dots): a block body's context, the loop
over a row's blocks, and the per-group accumulation of code dots into each token's accumulator.

Legend: a block holds QK values, a sub-block shares one scale, a group is 16 values (the activations' scale
unit, engine.q8_activations). A block body unpacks its codes to unsigned bytes in value order, 64 at a time,
and hands them to _accumulate with one float scale per group; the offsets (mins, code zero points, book halves)
go to the bias accumulators as offset * the group's activation sum.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from engine.ik_types import quant_type
from engine.simd import _arg_i64
from engine.simd_int8 import _data, _fma, _hsum, codes_dot

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V8I, _V8F, _V16F = (ir.VectorType(t, n) for t, n in ((_I32, 8), (_F32, 8), (_F32, 16)))
_V32I8 = ir.VectorType(_I8, 32)
_V16I = ir.VectorType(_I32, 16)
_V64I8 = ir.VectorType(_I8, 64)

# Tokens per call at most: 8 accumulators and their scales stay in registers next to the unpacked weights.
TOKENS = 8


def _const(vty: ir.VectorType, values: list) -> ir.Constant:
    return ir.Constant(vty, values)


def _idx(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


class _Ctx:
    """Pointers and loads shared by the kernels' IR."""

    def __init__(self, context, builder, sig, args):
        self.b = builder
        self.src = _data(context, builder, sig, args, 0)
        self.x16, self.xd, self.xs = (_data(context, builder, sig, args, k) for k in range(3, 6))
        self.head = _arg_i64(context, builder, sig, args, 12)  # the row's header (types with a row scale)

    def load(self, ptr: ir.Value, index: ir.Value, vty: ir.Type, align: int = 1) -> ir.Value:
        p = self.b.gep(ptr, [index])
        return self.b.load(self.b.bitcast(p, vty.as_pointer()), align=align, typ=vty)

    def half(self, offset: ir.Value) -> ir.Value:
        p = self.b.bitcast(self.b.gep(self.src, [offset]), _I16.as_pointer())
        return self.b.fpext(self.b.bitcast(self.b.load(p, align=1), ir.HalfType()), _F32)

    def f32(self, offset: ir.Value) -> ir.Value:
        p = self.b.bitcast(self.b.gep(self.src, [offset]), _F32.as_pointer())
        return self.b.load(p, align=1)

    def codes_dot(self, w: ir.Value, value: ir.Value) -> ir.Value:
        """<16 x f32>: the 16 four-value lane sums of u8 codes w (<64 x i8>) against the activation codes from
        flat value index `value`, in units of the group scale xd."""
        return codes_dot(self.b, w, self.x16, value)

    def off(self, base: ir.Value, k: int) -> ir.Value:
        return self.b.add(base, ir.Constant(_I64, k))


def _row_loop(context, builder, sig, args, n_tok: int, qtype: int, body, bias_lanes: int, per_step: int = 1,
              tail=None) -> None:
    """out[oo + t * ostride] (+)= sum over the row's blocks of body(ctx, byte offset, each token's first activation
    group, accumulators) for t < n_tok, per_step blocks at a time; tail(...) takes a last lone block. The sum is
    added to what out holds where the `add` argument is nonzero. A block of an interleaved type holds its whole
    group's rows (the body picks its row's bytes)."""
    b = builder
    qt = quant_type(qtype)
    qk, block_bytes = qt.qk, qt.block_bytes * qt.group  # an interleaved block holds the group's rows
    c = _Ctx(context, builder, sig, args)
    so, nblk, xg0, groups, oo, ostride = (_arg_i64(context, builder, sig, args, k) for k in (1, 2, 6, 7, 9, 10))
    out = _data(context, builder, sig, args, 8)
    add = b.icmp_unsigned("!=", _arg_i64(context, builder, sig, args, 11), ir.Constant(_I64, 0))
    bias_ty = ir.VectorType(_F32, bias_lanes)
    acc = [cgutils.alloca_once_value(b, _const(_V16F, [0.0] * 16)) for _ in range(n_tok)]
    accb = [cgutils.alloca_once_value(b, _const(bias_ty, [0.0] * bias_lanes)) for _ in range(n_tok)]
    firsts = [b.add(xg0, b.mul(groups, ir.Constant(_I64, t))) for t in range(n_tok)]
    steps = b.udiv(nblk, ir.Constant(_I64, per_step))

    def at(k: ir.Value) -> tuple[ir.Value, list[ir.Value]]:
        o = b.add(so, b.mul(k, ir.Constant(_I64, block_bytes)))
        return o, [b.add(x, b.mul(k, ir.Constant(_I64, qk // 16))) for x in firsts]

    with cgutils.for_range(b, steps, intp=_I64) as loop:
        body(c, *at(b.mul(loop.index, ir.Constant(_I64, per_step))), acc, accb)
    if tail is not None:
        last = b.mul(steps, ir.Constant(_I64, per_step))
        with b.if_then(b.icmp_unsigned("<", last, nblk)):
            tail(c, *at(last), acc, accb)
    for t in range(n_tok):
        total = b.fadd(_hsum(b, b.load(acc[t])), _hsum(b, b.load(accb[t])))
        at_out = b.gep(out, [b.add(oo, b.mul(ostride, ir.Constant(_I64, t)))])
        b.store(b.select(add, b.fadd(b.load(at_out), total), total), at_out)


def _pairs(b: ir.IRBuilder, v16: ir.Value, add: bool) -> ir.Value:
    """<8 x f32> from 16 group values: each 32-value sub-block's pair summed (add) or its first (xd is equal)."""
    even = b.shuffle_vector(v16, v16, _idx(list(range(0, 16, 2))))
    if not add:
        return even
    return b.fadd(even, b.shuffle_vector(v16, v16, _idx(list(range(1, 16, 2)))))


def _accumulate(c: _Ctx, w: ir.Value, values: list[ir.Value], scales: list[ir.Value], lanes: list[int],
                acc: list) -> None:
    """acc[t] += (w . token t's 64 activation values from values[t]) * scales[t] spread by lane -> scale index."""
    b = c.b
    for t, value in enumerate(values):
        f = c.codes_dot(w, value)
        b.store(_fma(b, f, b.shuffle_vector(scales[t], scales[t], _idx(lanes)), b.load(acc[t])), acc[t])


def _values(c: _Ctx, xg: list[ir.Value], step: int) -> list[ir.Value]:
    """Each token's flat activation index of the 64-value step `step` of the block at groups xg."""
    return [c.b.add(c.b.mul(x, ir.Constant(_I64, 16)), ir.Constant(_I64, 64 * step)) for x in xg]


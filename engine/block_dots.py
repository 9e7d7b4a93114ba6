"""Integer dot products straight from GGUF blocks: one row of weights . one token's integer activations.

Legend: a block holds QK values (256 for the K-quants, 32 for Q8_0), a sub-block shares one scale, a group is 16
values (the activations' scale unit, engine.q8_activations). The weight codes are unpacked in registers, meet
both activation planes in u8 x s8 multiply-adds (engine.simd_int8._lane_sums) and are scaled per sub-block:

    w . x = sum over sub-blocks of  d_w * sc * xd * (q . x)  +  bias_w * xs

No decoded copy is written anywhere: engine.int8_decoders' scratch round trip (a store and a load of every code
and of two scales per 16 values) cost as much as the dot itself. Only the most used types have a kernel here
(Q4_K, Q6_K, Q8_0: what Q4_K_M and Q8_0 files hold); the rest keep the decoder path.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.block_decoders import Q4_K, Q6_K, Q8_0
from engine.simd import _arg_i64
from engine.simd_int8 import _data, _fma, _hsum, _lane_sums, k4_scale_codes

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V8I, _V8F, _V16I, _V16F = (ir.VectorType(t, n) for t, n in ((_I32, 8), (_F32, 8), (_I32, 16), (_F32, 16)))
_V32I8, _V64I8 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 64)

# Types with a kernel here, and their block sizes (values, bytes).
BLOCK_DOT_TYPES = {Q4_K: (256, 144), Q6_K: (256, 210), Q8_0: (32, 34)}


def _const(vty: ir.VectorType, values: list) -> ir.Constant:
    return ir.Constant(vty, values)


def _idx(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


class _Ctx:
    """Pointers and loads shared by the kernels' IR."""

    def __init__(self, context, builder, sig, args):
        self.b = builder
        self.src = _data(context, builder, sig, args, 0)
        self.xq, self.xl, self.xd, self.xs = (_data(context, builder, sig, args, k) for k in range(3, 7))

    def load(self, ptr: ir.Value, index: ir.Value, vty: ir.Type, align: int = 1) -> ir.Value:
        p = self.b.gep(ptr, [index])
        return self.b.load(self.b.bitcast(p, vty.as_pointer()), align=align, typ=vty)

    def half(self, offset: ir.Value) -> ir.Value:
        p = self.b.bitcast(self.b.gep(self.src, [offset]), _I16.as_pointer())
        return self.b.fpext(self.b.bitcast(self.b.load(p, align=1), ir.HalfType()), _F32)

    def codes_dot(self, w: ir.Value, value: ir.Value) -> ir.Value:
        """<16 x f32>: the 16 four-value lane sums of u8 codes w (<64 x i8>) against the activation values from
        flat value index `value`, both planes, in units of the group scale xd."""
        hi = _lane_sums(self.b, w, self.load(self.xq, value, _V64I8))
        lo = _lane_sums(self.b, w, self.load(self.xl, value, _V64I8))
        return self.b.sitofp(self.b.add(self.b.shl(hi, _const(_V16I, [8] * 16)), lo), _V16F)

    def off(self, base: ir.Value, k: int) -> ir.Value:
        return self.b.add(base, ir.Constant(_I64, k))


def _signature(src, so, nblk, xq, xl, xd, xs, xgroup):
    return types.float32(src, so, nblk, xq, xl, xd, xs, xgroup)


def _row_loop(context, builder, sig, args, block_bytes: int, qk: int, body, bias_lanes: int,
              per_step: int = 1, tail=None) -> ir.Value:
    """sum over the row's blocks of body(ctx, byte offset, first activation group, accumulators), per_step blocks
    at a time; tail(...) takes a last lone block."""
    c = _Ctx(context, builder, sig, args)
    so, nblk, xg0 = (_arg_i64(context, builder, sig, args, k) for k in (1, 2, 7))
    acc = cgutils.alloca_once_value(builder, _const(_V16F, [0.0] * 16))
    accb = cgutils.alloca_once_value(builder, _const(ir.VectorType(_F32, bias_lanes), [0.0] * bias_lanes))
    steps = builder.udiv(nblk, ir.Constant(_I64, per_step))

    def at(k: ir.Value) -> tuple[ir.Value, ir.Value]:
        o = builder.add(so, builder.mul(k, ir.Constant(_I64, block_bytes)))
        return o, builder.add(xg0, builder.mul(k, ir.Constant(_I64, qk // 16)))

    with cgutils.for_range(builder, steps, intp=_I64) as loop:
        body(c, *at(builder.mul(loop.index, ir.Constant(_I64, per_step))), acc, accb)
    if tail is not None:
        last = builder.mul(steps, ir.Constant(_I64, per_step))
        with builder.if_then(builder.icmp_unsigned("<", last, nblk)):
            tail(c, *at(last), acc, accb)
    return builder.fadd(_hsum(builder, builder.load(acc)), _hsum(builder, builder.load(accb)))


def _splat8(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    one = b.insert_element(ir.Constant(_V8F, ir.Undefined), v, ir.Constant(_I32, 0))
    return b.shuffle_vector(one, one, _idx([0] * 8))


def _pairs(b: ir.IRBuilder, v16: ir.Value, add: bool) -> ir.Value:
    """<8 x f32> from 16 group values: each 32-value sub-block's pair summed (add) or its first (xd is equal)."""
    even = b.shuffle_vector(v16, v16, _idx(list(range(0, 16, 2))))
    if not add:
        return even
    return b.fadd(even, b.shuffle_vector(v16, v16, _idx(list(range(1, 16, 2)))))


def _q4_k_block(c: _Ctx, o: ir.Value, xg: ir.Value, acc, accb) -> None:
    b = c.b
    sc, m = k4_scale_codes(b, c.load(c.src, c.off(o, 4), ir.VectorType(_I8, 16)))
    xd = _pairs(b, c.load(c.xd, xg, _V16F, 4), add=False)
    xs = _pairs(b, c.load(c.xs, xg, _V16F, 4), add=True)
    scale = b.fmul(b.fmul(_splat8(b, c.half(o)), b.sitofp(sc, _V8F)), xd)  # d * sc_j * xd_j
    mins = b.fmul(_splat8(b, c.half(c.off(o, 2))), b.sitofp(m, _V8F))  # dmin * m_j, subtracted
    b.store(b.fsub(b.load(accb), b.fmul(mins, xs)), accb)
    low, high = _const(_V32I8, [15] * 32), _const(_V32I8, [4] * 32)
    value0 = b.mul(xg, ir.Constant(_I64, 16))
    a = b.load(acc)
    for g in range(4):  # 64 values: sub-blocks 2g (low nibbles) and 2g + 1 (high nibbles) of 32 bytes
        raw = c.load(c.src, c.off(o, 16 + 32 * g), _V32I8)
        w = b.shuffle_vector(b.and_(raw, low), b.lshr(raw, high), _idx(list(range(64))))
        f = c.codes_dot(w, b.add(value0, ir.Constant(_I64, 64 * g)))
        a = _fma(b, f, b.shuffle_vector(scale, scale, _idx([2 * g] * 8 + [2 * g + 1] * 8)), a)
    b.store(a, acc)


@intrinsic
def dot_q4_k(typingctx, src, so, nblk, xq, xl, xd, xs, xgroup):
    """float32: nblk Q4_K blocks from byte so of src . the activations from group xgroup (engine.q8_activations'
    planes xq, xl and scales xd, xs, read as flat arrays)."""
    sig = _signature(src, so, nblk, xq, xl, xd, xs, xgroup)

    def codegen(context, builder, signature, args):
        return _row_loop(context, builder, signature, args, 144, 256, _q4_k_block, 8)

    return sig, codegen


def _q6_k_block(c: _Ctx, o: ir.Value, xg: ir.Value, acc, accb) -> None:
    b = c.b
    d = c.half(c.off(o, 208))
    sc = b.fmul(b.sitofp(c.load(c.src, c.off(o, 192), ir.VectorType(_I8, 16)), _V16F),
                b.shuffle_vector(b.insert_element(ir.Constant(_V16F, ir.Undefined), d, ir.Constant(_I32, 0)),
                                 ir.Constant(_V16F, ir.Undefined), _idx([0] * 16)))  # d * sc_g
    scale = b.fmul(sc, c.load(c.xd, xg, _V16F, 4))
    b.store(b.fsub(b.load(accb), b.fmul(b.fmul(sc, c.load(c.xs, xg, _V16F, 4)), _const(_V16F, [32.0] * 16))), accb)

    def k(v: int) -> ir.Constant:
        return _const(_V32I8, [v] * 32)

    value0 = b.mul(xg, ir.Constant(_I64, 16))
    a = b.load(acc)
    for h in range(2):  # 128 values: low nibbles of ql, high nibbles, each with 2 bits of qh on top
        ql0, ql1 = (c.load(c.src, c.off(o, 64 * h + 32 * i), _V32I8) for i in range(2))
        qh = c.load(c.src, c.off(o, 128 + 32 * h), _V32I8)
        parts = [
            b.or_(b.and_(ql0, k(15)), b.shl(b.and_(qh, k(3)), k(4))),
            b.or_(b.and_(ql1, k(15)), b.shl(b.and_(b.lshr(qh, k(2)), k(3)), k(4))),
            b.or_(b.lshr(ql0, k(4)), b.shl(b.and_(b.lshr(qh, k(4)), k(3)), k(4))),
            b.or_(b.lshr(ql1, k(4)), b.shl(b.lshr(qh, k(6)), k(4))),
        ]
        for half in range(2):
            w = b.shuffle_vector(parts[2 * half], parts[2 * half + 1], _idx(list(range(64))))
            step = 2 * h + half  # 64 values = 4 groups
            f = c.codes_dot(w, b.add(value0, ir.Constant(_I64, 64 * step)))
            lanes = b.shuffle_vector(scale, scale, _idx([4 * step + lane // 4 for lane in range(16)]))
            a = _fma(b, f, lanes, a)
    b.store(a, acc)


@intrinsic
def dot_q6_k(typingctx, src, so, nblk, xq, xl, xd, xs, xgroup):
    """As dot_q4_k for Q6_K blocks."""
    sig = _signature(src, so, nblk, xq, xl, xd, xs, xgroup)

    def codegen(context, builder, signature, args):
        return _row_loop(context, builder, signature, args, 210, 256, _q6_k_block, 16)

    return sig, codegen


def _q8_0_blocks(c: _Ctx, o: ir.Value, xg: ir.Value, acc, accb, pair: bool) -> None:
    """One step over two Q8_0 blocks (64 values), or over a lone last block (its second half zero)."""
    b = c.b
    flip = _const(_V32I8, [-128] * 32)  # int8 codes + 128: unsigned for the u8 x s8 product, undone in the bias
    first = b.xor(c.load(c.src, c.off(o, 2), _V32I8), flip)
    second = b.xor(c.load(c.src, c.off(o, 36), _V32I8), flip) if pair else ir.Constant(_V32I8, [0] * 32)
    w = b.shuffle_vector(first, second, _idx(list(range(64))))
    d0 = c.half(o)
    d1 = c.half(c.off(o, 34)) if pair else ir.Constant(_F32, 0.0)
    v4 = ir.VectorType(_F32, 4)
    d = b.insert_element(b.insert_element(ir.Constant(v4, ir.Undefined), d0, ir.Constant(_I32, 0)), d1,
                         ir.Constant(_I32, 1))
    d = b.shuffle_vector(d, d, _idx([0, 0, 1, 1]))  # per group
    xd = c.load(c.xd, xg, v4, 4)
    scale = b.fmul(d, xd)
    b.store(b.fsub(b.load(accb), b.fmul(b.fmul(d, c.load(c.xs, xg, v4, 4)), _const(v4, [128.0] * 4))), accb)
    f = c.codes_dot(w, b.mul(xg, ir.Constant(_I64, 16)))
    b.store(_fma(b, f, b.shuffle_vector(scale, scale, _idx([lane // 4 for lane in range(16)])), b.load(acc)), acc)


@intrinsic
def dot_q8_0(typingctx, src, so, nblk, xq, xl, xd, xs, xgroup):
    """As dot_q4_k for Q8_0 blocks (two per step)."""
    sig = _signature(src, so, nblk, xq, xl, xd, xs, xgroup)

    def codegen(context, builder, signature, args):
        def pair(c, o, xg, acc, accb):
            _q8_0_blocks(c, o, xg, acc, accb, True)

        def lone(c, o, xg, acc, accb):
            _q8_0_blocks(c, o, xg, acc, accb, False)

        return _row_loop(context, builder, signature, args, 34, 32, pair, 4, per_step=2, tail=lone)

    return sig, codegen


@njit(cache=True, inline="always")
def has_block_dot(qtype: int) -> bool:
    return qtype in (Q4_K, Q6_K, Q8_0)


@njit(cache=True, inline="always")
def block_dot(qtype: int, src: np.ndarray, so: int, nblk: int, xq: np.ndarray, xl: np.ndarray, xd: np.ndarray,
              xs: np.ndarray, xgroup: int) -> np.float32:
    """nblk blocks of a type in BLOCK_DOT_TYPES from byte so of src . the activations from group xgroup."""
    if qtype == Q4_K:
        return dot_q4_k(src, so, nblk, xq, xl, xd, xs, xgroup)
    if qtype == Q6_K:
        return dot_q6_k(src, so, nblk, xq, xl, xd, xs, xgroup)
    return dot_q8_0(src, so, nblk, xq, xl, xd, xs, xgroup)

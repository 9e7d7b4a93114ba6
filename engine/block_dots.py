"""Integer dot products straight from GGUF blocks: one row of weights . up to 8 tokens' integer activations.

Legend: a block holds QK values (256 for the K-quants, 32 for Q8_0), a sub-block shares one scale, a group is 16
values (the activations' scale unit, engine.q8_activations). The weight codes are unpacked in registers, meet
the 16-bit activation codes in i16 pair multiply-adds (engine.simd_int8._code_sums) and are scaled per sub-block:

    w . x = sum over sub-blocks of  d_w * sc * xd * (q . x)  +  bias_w * xs

No decoded copy is written anywhere: engine.int8_decoders' scratch round trip (a store and a load of every code
and of two scales per 16 values) cost as much as the dot itself. The most used types have a kernel here (Q4_K,
Q6_K, Q8_0: what Q4_K_M and Q8_0 files hold; Q5_K, Q4_0, Q4_1, Q5_0, Q5_1); the rest keep the decoder path.
Each weight block is unpacked once for all tokens of a call (TOKENS at most, one accumulator register per
token), so a decode batch reads the weights from cache once per 8 tokens rather than per token.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.block_decoders import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from engine.ik_decoders import IQ2_K, IQ2_K_R4, IQ3_K, IQ4_K, IQ4_KS, IQ5_KS
from engine.ik_types import quant_type
from engine.simd import _arg_i64, _splat
from engine.simd_int8 import IQ4_CODES, _data, _fma, _fma4, _hsum, codes_dot, k4_scale_codes, lookup_codes

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V8I, _V8F, _V16F = (ir.VectorType(t, n) for t, n in ((_I32, 8), (_F32, 8), (_F32, 16)))
_V32I8 = ir.VectorType(_I8, 32)

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


def _k4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, fifth: bool) -> None:
    """A Q4_K block, or with fifth bits a Q5_K block (the same scales; 32 bytes of 5th bits before the nibbles)."""
    b = c.b
    sc, m = k4_scale_codes(b, c.load(c.src, c.off(o, 4), ir.VectorType(_I8, 16)))
    dsc = b.fmul(_splat(b, c.half(o), _V8F), b.sitofp(sc, _V8F))  # d * sc_j
    mins = b.fmul(_splat(b, c.half(c.off(o, 2)), _V8F), b.sitofp(m, _V8F))  # dmin * m_j, subtracted
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dsc, _pairs(b, c.load(c.xd, x, _V16F, 4), add=False)))
        b.store(b.fsub(b.load(accb[t]), b.fmul(mins, _pairs(b, c.load(c.xs, x, _V16F, 4), add=True))), accb[t])
    low, four, one = _const(_V32I8, [15] * 32), _const(_V32I8, [4] * 32), _const(_V32I8, [1] * 32)
    qh = c.load(c.src, c.off(o, 16), _V32I8) if fifth else None
    for g in range(4):  # 64 values: sub-blocks 2g (low nibbles) and 2g + 1 (high nibbles) of 32 bytes
        raw = c.load(c.src, c.off(o, (48 if fifth else 16) + 32 * g), _V32I8)
        lo, hi = b.and_(raw, low), b.lshr(raw, four)
        if qh is not None:  # bit 2g (2g + 1) of qh[i] is the 5th bit of value i of sub-block 2g (2g + 1)
            lo = b.or_(lo, b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g] * 32)), one), four))
            hi = b.or_(hi, b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g + 1] * 32)), one), four))
        w = b.shuffle_vector(lo, hi, _idx(list(range(64))))
        _accumulate(c, w, _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _q6_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    b = c.b
    d = c.half(c.off(o, 208))
    dsc = b.fmul(b.sitofp(c.load(c.src, c.off(o, 192), ir.VectorType(_I8, 16)), _V16F), _splat(b, d, _V16F))
    bias = b.fmul(dsc, _const(_V16F, [32.0] * 16))  # codes are value + 32
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dsc, c.load(c.xd, x, _V16F, 4)))
        b.store(b.fsub(b.load(accb[t]), b.fmul(bias, c.load(c.xs, x, _V16F, 4))), accb[t])

    def k(v: int) -> ir.Constant:
        return _const(_V32I8, [v] * 32)

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
            _accumulate(c, w, _values(c, xg, step), scales, [4 * step + lane // 4 for lane in range(16)], acc)


class _Small(NamedTuple):
    """A 32-value block type's layout: value = d * (q - bias) [+ m]."""

    m_at: int | None  # offset of the added minimum m (d is at 0)
    bias: int
    qh_at: int | None  # offset of the little-endian word of fifth bits
    codes_at: int
    nibbles: bool  # else int8 bytes


_SMALL = {
    Q8_0: _Small(None, 128, None, 2, False),
    Q4_0: _Small(None, 8, None, 2, True),
    Q4_1: _Small(2, 0, None, 4, True),
    Q5_0: _Small(None, 16, 2, 6, True),
    Q5_1: _Small(2, 0, 4, 8, True),
}


def _small_codes(c: _Ctx, o: ir.Value, qtype: int) -> ir.Value:
    """<32 x i8>: the block's 32 codes as unsigned values, in value order."""
    b = c.b
    _, _, qh_at, codes_at, nibbles = _SMALL[qtype]
    if not nibbles:  # int8 codes + 128: unsigned for the u8 x s8 product, the 128 undone in the bias
        return b.xor(c.load(c.src, c.off(o, codes_at), _V32I8), _const(_V32I8, [-128] * 32))
    v16 = ir.VectorType(_I8, 16)
    raw = c.load(c.src, c.off(o, codes_at), v16)
    q = b.shuffle_vector(b.and_(raw, _const(v16, [15] * 16)), b.lshr(raw, _const(v16, [4] * 16)),
                         _idx(list(range(32))))
    if qh_at is not None:  # bit i of the little-endian word is value i's fifth bit
        v32 = ir.VectorType(_I32, 32)
        word = b.load(b.bitcast(b.gep(c.src, [c.off(o, qh_at)]), _I32.as_pointer()), align=1)
        splat = b.shuffle_vector(b.insert_element(ir.Constant(v32, ir.Undefined), word, ir.Constant(_I32, 0)),
                                 ir.Constant(v32, ir.Undefined), _idx([0] * 32))
        bits = b.and_(b.lshr(splat, _const(v32, list(range(32)))), _const(v32, [1] * 32))
        q = b.or_(q, b.shl(b.trunc(bits, _V32I8), _const(_V32I8, [4] * 32)))
    return q


def _small_blocks(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, qtype: int, pair: bool) -> None:
    """One step over two 32-value blocks (64 values), or over a lone last block (its second half zero)."""
    b = c.b
    nbytes = quant_type(qtype).block_bytes
    m_at, bias = _SMALL[qtype][:2]
    first = _small_codes(c, o, qtype)
    second = _small_codes(c, c.off(o, nbytes), qtype) if pair else ir.Constant(_V32I8, [0] * 32)
    w = b.shuffle_vector(first, second, _idx(list(range(64))))
    v4 = ir.VectorType(_F32, 4)
    zero = ir.Constant(_F32, 0.0)

    def per_group(at: int) -> ir.Value:  # a block field as <4 x f32>, one lane per group of 16 values
        v1 = c.half(c.off(o, nbytes + at)) if pair else zero
        v = b.insert_element(b.insert_element(ir.Constant(v4, ir.Undefined), c.half(c.off(o, at)),
                                              ir.Constant(_I32, 0)), v1, ir.Constant(_I32, 1))
        return b.shuffle_vector(v, v, _idx([0, 0, 1, 1]))

    d = per_group(0)
    # the weight's offset per group, times each group's activation sum: d * -bias, or the block's m
    offset = per_group(m_at) if m_at is not None else b.fmul(d, _const(v4, [-float(bias)] * 4))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(d, c.load(c.xd, x, v4, 4)))
        b.store(_fma4(b, offset, c.load(c.xs, x, v4, 4), b.load(accb[t])), accb[t])
    _accumulate(c, w, _values(c, xg, 0), scales, [lane // 4 for lane in range(16)], acc)


def _small_row(qtype: int):
    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        def pair(c, o, xg, acc, accb):
            _small_blocks(c, o, xg, acc, accb, qtype, True)

        def lone(c, o, xg, acc, accb):
            _small_blocks(c, o, xg, acc, accb, qtype, False)

        _row_loop(context, builder, sig, args, n_tok, qtype, pair, 4, per_step=2, tail=lone)

    return row


def _k4_row(fifth: bool):
    def block(c, o, xg, acc, accb):
        _k4_block(c, o, xg, acc, accb, fifth)

    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        _row_loop(context, builder, sig, args, n_tok, Q5_K if fifth else Q4_K, block, 8)

    return row


# ---- ik_llama.cpp's types: the non-linear code books as unsigned codes, each half's shift in the bias ----------

# IQ2_K's book (-31, -13, 1, 17) + 32; its second half is the first + 5.
_IQ2_CODES = [1, 19, 33, 49]
# IQ3_K's book (-63, -40, -23, -10, 1, 13, 28, 47) + 64; its second half is the first + 4.
_IQ3_CODES = [1, 24, 41, 54, 65, 77, 92, 111]
# IQ5_K's book + 128 (its second half is the first + 2).
_IQ5_CODES = [v + 128 for v in (-126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
                                -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121)]
_V16I = ir.VectorType(_I32, 16)


def _book_scales(c: _Ctx, d: ir.Value, ls: ir.Value, ls_zero: int, half: ir.Value, step: int, code_zero: int,
                 xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 16 group scales of a block with one scale per 16 values: dl = d * (ls - ls_zero) (ls, half:
    <16 x i32>), value = dl * (code - code_zero + step * half) for the book half `half`; adds the offsets' part
    to accb."""
    b = c.b
    dl = b.fmul(_splat(b, d, _V16F), b.sitofp(b.sub(ls, _const(_V16I, [ls_zero] * 16)), _V16F))
    shift = b.sub(b.mul(half, _const(_V16I, [step] * 16)), _const(_V16I, [code_zero] * 16))
    bias = b.fmul(dl, b.sitofp(shift, _V16F))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl, c.load(c.xd, x, _V16F, 4)))
        b.store(_fma(b, bias, c.load(c.xs, x, _V16F, 4), b.load(accb[t])), accb[t])
    return scales


def _spread(c: _Ctx, at: ir.Value, n: int, picks: list[int]) -> ir.Value:
    """<16 x i32>: lane g = byte picks[g] of the n bytes at `at` (a block's per-sub-block fields, one per group)."""
    raw = c.load(c.src, at, ir.VectorType(_I8, n))
    return c.b.zext(c.b.shuffle_vector(raw, raw, _idx(picks)), _V16I)


def _bits16(c: _Ctx, word: ir.Value) -> ir.Value:
    """<16 x i32>: bit g of a 16-bit word in lane g (the `extra` book-half bits of the IQ*_K types)."""
    b = c.b
    v = _splat(b, b.zext(word, _I32), _V16I)
    return b.and_(b.lshr(v, _const(_V16I, list(range(16)))), _const(_V16I, [1] * 16))


def _iq4_nibbles(c: _Ctx, at: ir.Value) -> ir.Value:
    """<64 x i8>: the 4-bit indices of two 32-value sub-blocks of 16 bytes at `at`, in value order (IQ4_XS's
    layout: low nibbles are values 0-15 of a sub-block, high nibbles 16-31)."""
    b = c.b
    raw = c.load(c.src, at, _V32I8)
    return b.shuffle_vector(b.and_(raw, _const(_V32I8, [15] * 32)), b.lshr(raw, _const(_V32I8, [4] * 32)),
                            _idx([*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]))


def _ks_scales(c: _Ctx, o: ir.Value, step: int, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 8 sub-block scales of an IQ4_KS/IQ5_KS block (scale bytes sc[8] @o) under the row's float32
    scale d: dl = d * ((sc & 254) - 127), value = dl * (code - 128 + step * (sc & 1)); adds the offsets' part to
    accb."""
    b = c.b
    v8i = ir.VectorType(_I32, 8)
    sc = b.zext(c.load(c.src, o, ir.VectorType(_I8, 8)), v8i)
    dl = b.fmul(_splat(b, c.f32(c.head), _V8F),
                b.sitofp(b.sub(b.and_(sc, _const(v8i, [254] * 8)), _const(v8i, [127] * 8)), _V8F))
    shift = b.sub(b.mul(b.and_(sc, _const(v8i, [1] * 8)), _const(v8i, [step] * 8)), _const(v8i, [128] * 8))
    bias = b.fmul(dl, b.sitofp(shift, _V8F))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl, _pairs(b, c.load(c.xd, x, _V16F, 4), add=False)))
        b.store(b.fadd(b.load(accb[t]), b.fmul(bias, _pairs(b, c.load(c.xs, x, _V16F, 4), add=True))), accb[t])
    return scales


def _iq4_ks_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ4_KS block (scales[8] @0, qs[128] @8) under its row's float32 scale: sub-block s (32 values) has
    dl = d * ((sc & 254) - 127) and the book half sc & 1 (+4)."""
    scales = _ks_scales(c, o, 4, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        _accumulate(c, lookup_codes(c.b, _iq4_nibbles(c, c.off(o, 8 + 32 * g)), IQ4_CODES), _values(c, xg, g),
                    scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq5_ks_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ5_KS block (scales[8] @0, qs[128] @8, qh[32] @136), scales as IQ4_KS (book half +2): step g's 64
    values are the low nibbles of qs[32 g ..] (sub-block 2g), then the high ones (2g + 1), 5th bits 2g and
    2g + 1 of qh[j]."""
    b = c.b
    scales = _ks_scales(c, o, 2, xg, accb)
    qh = c.load(c.src, c.off(o, 136), _V32I8)
    one, four = _const(_V32I8, [1] * 32), _const(_V32I8, [4] * 32)
    for g in range(4):
        raw = c.load(c.src, c.off(o, 8 + 32 * g), _V32I8)
        lo = b.or_(b.and_(raw, _const(_V32I8, [15] * 32)),
                   b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g] * 32)), one), four))
        hi = b.or_(b.lshr(raw, four), b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g + 1] * 32)), one), four))
        _accumulate(c, lookup_codes(b, b.shuffle_vector(lo, hi, _idx(list(range(64)))), _IQ5_CODES),
                    _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq4_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ4_K block (d @0, extra @2, scales_h[4] @4, scales_l[8] @8, qs[128] @16): half h of sub-block s (one
    group) has the 6-bit scale nibble h of scales_l[s] | bits 4 (s % 2) + 2 h of scales_h[s // 2] << 4, less 32,
    and book half bit 2 s + h of extra (+4); nibbles as IQ4_KS."""
    b = c.b
    order = [(s, h) for s in range(8) for h in range(2)]
    low = _spread(c, c.off(o, 8), 8, [s for s, h in order])
    high = _spread(c, c.off(o, 4), 4, [s // 2 for s, h in order])
    ls = b.or_(b.and_(b.lshr(low, _const(_V16I, [4 * h for s, h in order])), _const(_V16I, [15] * 16)),
               b.shl(b.and_(b.lshr(high, _const(_V16I, [4 * (s % 2) + 2 * h for s, h in order])),
                            _const(_V16I, [3] * 16)), _const(_V16I, [4] * 16)))
    scales = _book_scales(c, c.half(o), ls, 32, _bits16(c, c.load(c.src, c.off(o, 2), _I16)), 4, 128, xg, accb)
    for g in range(4):
        _accumulate(c, lookup_codes(b, _iq4_nibbles(c, c.off(o, 16 + 32 * g)), IQ4_CODES), _values(c, xg, g),
                    scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _iq2_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ2_K block (d @0, extra @2, scales[8] @4, qs[64] @12): half h of sub-block s (one group) has scale
    nibble h of scales[s] less 8 and book half bit 2 s + h of extra (+5); sub-block s's 32 codes are bits
    2 (s % 4) of the 32 bytes at 12 + 32 (s // 4), in value order."""
    b = c.b
    order = [(s, h) for s in range(8) for h in range(2)]
    sc = _spread(c, c.off(o, 4), 8, [s for s, h in order])
    ls = b.and_(b.lshr(sc, _const(_V16I, [4 * h for s, h in order])), _const(_V16I, [15] * 16))
    scales = _book_scales(c, c.half(o), ls, 8, _bits16(c, c.load(c.src, c.off(o, 2), _I16)), 5, 32, xg, accb)
    three = _const(_V32I8, [3] * 32)
    for g in range(4):  # sub-blocks 2g, 2g + 1 share their bytes
        raw = c.load(c.src, c.off(o, 12 + 32 * (g // 2)), _V32I8)
        f = [b.and_(b.lshr(raw, _const(_V32I8, [2 * ((2 * g + j) % 4)] * 32)), three) for j in range(2)]
        idx = b.shuffle_vector(f[0], f[1], _idx(list(range(64))))
        _accumulate(c, lookup_codes(b, idx, _IQ2_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)


def _iq2_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ2_K_R4 block of 4 rows (d[4] f16 @0, extra[8] @8, scales[32] @16, qs[256] @48). Half h of
    sub-block s (16 values, one group) has scale d_k * (nibble 8 s + k + 4 h of scales - 8) and book half bit s of
    extra[k + 4 h] (+5). Its 2-bit codes: bits 2 j of qs[32 s + 16 h + 4 k + i] hold value 4 j + i."""
    b = c.b
    v16i8 = ir.VectorType(_I8, 16)
    order = [(s, h) for s in range(8) for h in range(2)]  # the block's 16 groups
    raw_sc = c.load(c.src, c.off(o, 16), _V32I8)
    nib = b.shuffle_vector(b.and_(raw_sc, _const(_V32I8, [15] * 32)), b.lshr(raw_sc, _const(_V32I8, [4] * 32)),
                           _idx([8 * s + k + 4 * h for s, h in order]))
    ex = _spread(c, c.off(o, 8), 8, [k + 4 * h for s, h in order])
    half = b.and_(b.lshr(ex, _const(_V16I, [s for s, h in order])), _const(_V16I, [1] * 16))
    scales = _book_scales(c, c.half(c.off(o, 2 * k)), b.zext(nib, _V16I), 8, half, 5, 32, xg, accb)
    three = _const(v16i8, [3] * 16)
    for g in range(4):  # sub-blocks 2g, 2g + 1: row k's 16 bytes of the 4 rows' 64
        raw = c.load(c.src, c.off(o, 48 + 64 * g), ir.VectorType(_I8, 64))
        mine = b.shuffle_vector(raw, raw, _idx([32 * s + 16 * h + 4 * k + i for s in range(2) for h in range(2)
                                                for i in range(4)]))
        f = [b.and_(b.lshr(mine, _const(v16i8, [2 * j] * 16)), three) for j in range(4)]
        lo = b.shuffle_vector(f[0], f[1], _idx(list(range(32))))
        hi = b.shuffle_vector(f[2], f[3], _idx(list(range(32))))
        # value 32 s + 16 h + 4 j + i is field j of byte 8 s + 4 h + i
        idx = b.shuffle_vector(lo, hi, _idx([16 * j + 8 * s + 4 * h + i for s in range(2) for h in range(2)
                                             for j in range(4) for i in range(4)]))
        _accumulate(c, lookup_codes(b, idx, _IQ2_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)


def _iq3_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ3_K block (d @0, extra @2, scales_h @4, scales_l[8] @6, qs[64] @14, qh[32] @78): half h of sub-block
    s (one group) has scale 2 (nibble h of scales_l[s]) + 1, negated by bit 2 s + h of scales_h, and book half
    bit 2 s + h of extra (+4); sub-block s's 32 codes are bits 2 (s % 4) of the 32 bytes at 14 + 32 (s // 4)
    with bit s of qh[j] above them."""
    b = c.b
    order = [(s, h) for s in range(8) for h in range(2)]
    sl = _spread(c, c.off(o, 6), 8, [s for s, h in order])
    odd = b.or_(b.shl(b.and_(b.lshr(sl, _const(_V16I, [4 * h for s, h in order])), _const(_V16I, [15] * 16)),
                      _const(_V16I, [1] * 16)), _const(_V16I, [1] * 16))
    sign = _bits16(c, c.load(c.src, c.off(o, 4), _I16))
    ls = b.mul(odd, b.sub(_const(_V16I, [1] * 16), b.shl(sign, _const(_V16I, [1] * 16))))
    scales = _book_scales(c, c.half(o), ls, 0, _bits16(c, c.load(c.src, c.off(o, 2), _I16)), 4, 64, xg, accb)
    three, one = _const(_V32I8, [3] * 32), _const(_V32I8, [1] * 32)
    qh = c.load(c.src, c.off(o, 78), _V32I8)
    for g in range(4):  # sub-blocks 2g, 2g + 1 share their low bits' bytes
        raw = c.load(c.src, c.off(o, 14 + 32 * (g // 2)), _V32I8)
        f = [b.or_(b.and_(b.lshr(raw, _const(_V32I8, [2 * ((2 * g + j) % 4)] * 32)), three),
                   b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g + j] * 32)), one), _const(_V32I8, [2] * 32)))
             for j in range(2)]
        _accumulate(c, lookup_codes(b, b.shuffle_vector(f[0], f[1], _idx(list(range(64)))), _IQ3_CODES),
                    _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _ik_row(qtype: int, block, bias_lanes: int):
    grouped = quant_type(qtype).group > 1  # the block body takes the row within its group

    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        def one(c, o, xg, acc, accb):
            if grouped:
                block(c, o, xg, acc, accb, k)
            else:
                block(c, o, xg, acc, accb)

        _row_loop(context, builder, sig, args, n_tok, qtype, one, bias_lanes)

    return row


_ROWS = {
    Q4_K: _k4_row(False),
    Q5_K: _k4_row(True),
    Q6_K: lambda context, builder, sig, args, n, k: _row_loop(context, builder, sig, args, n, Q6_K, _q6_k_block, 16),
    IQ4_KS: _ik_row(IQ4_KS, _iq4_ks_block, 8),
    IQ2_K_R4: _ik_row(IQ2_K_R4, _iq2_k_r4_block, 16),
    IQ4_K: _ik_row(IQ4_K, _iq4_k_block, 16),
    IQ2_K: _ik_row(IQ2_K, _iq2_k_block, 16),
    IQ5_KS: _ik_row(IQ5_KS, _iq5_ks_block, 8),
    IQ3_K: _ik_row(IQ3_K, _iq3_k_block, 16),
} | {qtype: _small_row(qtype) for qtype in _SMALL}
BLOCK_DOT_TYPES = tuple(_ROWS)  # the types with a kernel here (a row function per type: its code, row k of a group)


def _make_dot(n_tok: int):
    @intrinsic
    def dot(typingctx, qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow):
        sig = types.none(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)

        def codegen(context, builder, signature, args):
            kind = _arg_i64(context, builder, signature, args, 0)
            sig, args = signature.return_type(*signature.args[1:]), args[1:]
            end = builder.append_basic_block("dot_end")
            switch = builder.switch(kind, end)
            krow = _arg_i64(context, builder, sig, args, 13)
            for qt, row in _ROWS.items():
                case = builder.append_basic_block(f"dot_type{qt}")
                switch.add_case(ir.Constant(_I64, qt), case)
                builder.position_at_end(case)
                group = quant_type(qt).group
                if group == 1:
                    row(context, builder, sig, args, n_tok, 0)
                    builder.branch(end)
                    continue
                rows = builder.switch(krow, end)  # one body per row of an interleaved group
                for k in range(group):
                    at = builder.append_basic_block(f"dot_type{qt}_row{k}")
                    rows.add_case(ir.Constant(_I64, k), at)
                    builder.position_at_end(at)
                    row(context, builder, sig, args, n_tok, k)
                    builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()

        return sig, codegen

    dot.__doc__ = f"""out[oo + t * ostride] (+= where add) nblk blocks of weight type qtype (one of BLOCK_DOT_TYPES)
    from byte so of src . token t's activations (engine.q8_activations' codes x16 and scales xd, xs read as
    flat arrays, token t from group xgroup + t * groups) for t < {n_tok}; head and krow as block_dots'."""
    return dot


_dot1, _dot2, _dot4, _dot8 = (_make_dot(n) for n in (1, 2, 4, 8))


@njit(cache=True, inline="always")
def has_block_dot(qtype: int) -> bool:
    return qtype in BLOCK_DOT_TYPES


@njit(cache=True, inline="always")
def block_dots(qtype: int, n_tok: int, src: np.ndarray, so: int, nblk: int, x16: np.ndarray,
               xd: np.ndarray, xs: np.ndarray, xgroup: int, groups: int, out: np.ndarray, oo: int, ostride: int,
               add: bool, head: int, krow: int) -> int:
    """The dots of nblk blocks of a type in BLOCK_DOT_TYPES from byte so of src with the first n of n_tok tokens
    (n the largest of 8, 4, 2, 1 that fits), written to (or, with add, added to) out[oo + t * ostride];
    returns n. head: the byte offset of the row's header (types with a row scale); krow: the row within its
    interleaved group (its blocks from so hold the whole group's rows)."""
    if n_tok >= 8:
        _dot8(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
        return 8
    if n_tok >= 4:
        _dot4(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
        return 4
    if n_tok >= 2:
        _dot2(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
        return 2
    _dot1(qtype, src, so, nblk, x16, xd, xs, xgroup, groups, out, oo, ostride, add, head, krow)
    return 1

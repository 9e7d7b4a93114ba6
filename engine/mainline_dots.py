"""Fused dot kernels for mainline's most used types, read straight from their GGUF blocks (engine.block_dots):
Q4_K, Q5_K, Q6_K (what Q4_K_M files hold) and the 32-value blocks Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from llvmlite import ir

from engine.block_decoders import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from engine.block_ir import (
    _F32,
    _I8,
    _I32,
    _V8F,
    _V16F,
    _V32I8,
    _accumulate,
    _const,
    _Ctx,
    _idx,
    _pairs,
    _row_loop,
    _values,
)
from engine.ik_types import quant_type
from engine.simd import _splat
from engine.simd_int8 import _fma4, k4_scale_codes


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


class SmallBlocks(NamedTuple):
    """How a body reads a 32-value block at byte offset o: value = d * (q - bias) [+ m]."""

    codes: Callable[[_Ctx, ir.Value], ir.Value]  # <32 x i8>: the unsigned codes q in value order
    d: Callable[[_Ctx, ir.Value], ir.Value]  # f32 scale
    m: Callable[[_Ctx, ir.Value], ir.Value] | None  # f32 added minimum
    bias: int


def _small_codes(c: _Ctx, o: ir.Value, qtype: int) -> ir.Value:
    """<32 x i8>: the block's 32 codes as unsigned values, in value order."""
    b = c.b
    _, _, qh_at, codes_at, nibbles = _SMALL[qtype]
    if not nibbles:  # int8 codes + 128: unsigned for the u8 x s8 product, the 128 undone in the bias
        return int8_codes(c, c.off(o, codes_at))
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


def int8_codes(c: _Ctx, at: ir.Value) -> ir.Value:
    """<32 x i8>: 32 int8 codes at `at` + 128 (unsigned for the u8 x s8 product; a bias of 128 undoes it)."""
    return c.b.xor(c.load(c.src, at, _V32I8), _const(_V32I8, [-128] * 32))


def _small_blocks(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, nbytes: int, blocks: SmallBlocks,
                  pair: bool) -> None:
    """One step over two 32-value blocks (64 values), or over a lone last block (its second half zero)."""
    b = c.b
    first = blocks.codes(c, o)
    second = blocks.codes(c, c.off(o, nbytes)) if pair else ir.Constant(_V32I8, [0] * 32)
    w = b.shuffle_vector(first, second, _idx(list(range(64))))
    v4 = ir.VectorType(_F32, 4)
    zero = ir.Constant(_F32, 0.0)

    def per_group(field) -> ir.Value:  # a block field as <4 x f32>, one lane per group of 16 values
        v1 = field(c, c.off(o, nbytes)) if pair else zero
        v = b.insert_element(b.insert_element(ir.Constant(v4, ir.Undefined), field(c, o), ir.Constant(_I32, 0)),
                             v1, ir.Constant(_I32, 1))
        return b.shuffle_vector(v, v, _idx([0, 0, 1, 1]))

    d = per_group(blocks.d)
    # the weight's offset per group, times each group's activation sum: d * -bias, or the block's m
    offset = per_group(blocks.m) if blocks.m is not None else b.fmul(d, _const(v4, [-float(blocks.bias)] * 4))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(d, c.load(c.xd, x, v4, 4)))
        b.store(_fma4(b, offset, c.load(c.xs, x, v4, 4), b.load(accb[t])), accb[t])
    _accumulate(c, w, _values(c, xg, 0), scales, [lane // 4 for lane in range(16)], acc)


def small_row(qtype: int, blocks: Callable[[int], SmallBlocks]):
    """The row function of a 32-value block type, row k of an interleaved group read as blocks(k) says: two blocks
    a step (a block column of the group apart), a lone last block alone."""
    nbytes = quant_type(qtype).group * quant_type(qtype).block_bytes

    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        layout = blocks(k)

        def pair(c, o, xg, acc, accb):
            _small_blocks(c, o, xg, acc, accb, nbytes, layout, True)

        def lone(c, o, xg, acc, accb):
            _small_blocks(c, o, xg, acc, accb, nbytes, layout, False)

        _row_loop(context, builder, sig, args, n_tok, qtype, pair, 4, per_step=2, tail=lone)

    return row


def half_at(at: int) -> Callable[[_Ctx, ir.Value], ir.Value]:
    """A block field reader: the f16 at byte `at` of the block, as f32."""

    def field(c: _Ctx, o: ir.Value) -> ir.Value:
        return c.half(c.off(o, at))

    return field


def _mainline_small(qtype: int) -> SmallBlocks:
    layout = _SMALL[qtype]
    return SmallBlocks(partial(_small_codes, qtype=qtype), half_at(0),
                       half_at(layout.m_at) if layout.m_at is not None else None, layout.bias)


def _k4_row(fifth: bool):
    def block(c, o, xg, acc, accb):
        _k4_block(c, o, xg, acc, accb, fifth)

    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        _row_loop(context, builder, sig, args, n_tok, Q5_K if fifth else Q4_K, block, 8)

    return row


ROWS = {
    Q4_K: _k4_row(False),
    Q5_K: _k4_row(True),
    Q6_K: lambda context, builder, sig, args, n, k: _row_loop(context, builder, sig, args, n, Q6_K, _q6_k_block, 16),
} | {qtype: small_row(qtype, lambda k, qtype=qtype: _mainline_small(qtype)) for qtype in _SMALL}

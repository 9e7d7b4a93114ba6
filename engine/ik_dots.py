"""Fused dot kernels for ik_llama.cpp's own types (IQ*_K, IQ*_KS), read straight from their GGUF blocks
(engine.block_dots).

Each non-linear code book is stored as unsigned codes (book + 128, + 64 or + 32). The second half of every IQ*_K
book is the first plus a constant (+4, +5, +4, +2), so a group's `extra` bit changes only its bias (b * sum of
activations), not its codes. Row scales (the *_KS types' header) come in as the context's `head` offset.
"""

from __future__ import annotations

from llvmlite import ir

from engine.block_ir import (
    _I8,
    _I16,
    _I32,
    _V8F,
    _V16F,
    _V16I,
    _V32I8,
    _accumulate,
    _const,
    _Ctx,
    _idx,
    _pairs,
    _row_loop,
    _values,
)
from engine.ik_decoders import IQ2_K, IQ3_K, IQ4_K, IQ4_KS, IQ5_KS
from engine.ik_types import quant_type
from engine.simd import _splat
from engine.simd_int8 import IQ4_CODES, _fma, lookup_codes

# IQ2_K's book (-31, -13, 1, 17) + 32; its second half is the first + 5.
_IQ2_CODES = [1, 19, 33, 49]
# IQ3_K's book (-63, -40, -23, -10, 1, 13, 28, 47) + 64; its second half is the first + 4.
_IQ3_CODES = [1, 24, 41, 54, 65, 77, 92, 111]
# IQ5_K's book + 128 (its second half is the first + 2).
_IQ5_CODES = [v + 128 for v in (-126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
                                -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121)]


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


def _ks_scales(c: _Ctx, o: ir.Value, step: int, xg: list[ir.Value], accb, row: int = 0,
               rows: int = 1) -> list[ir.Value]:
    """Each token's 8 sub-block scales of an IQ4_KS/IQ5_KS block (scale bytes sc[8] @o) under the row's float32
    scale d: dl = d * ((sc & 254) - 127), value = dl * (code - 128 + step * (sc & 1)); adds the offsets' part to
    accb. Row `row` of an interleaved group of `rows` (*_KS_R4): sub-block s's byte at o + rows * s + row, d at
    the header's float `row`."""
    b = c.b
    v8i = ir.VectorType(_I32, 8)
    raw = c.load(c.src, o, ir.VectorType(_I8, 8 * rows))
    if rows > 1:
        raw = b.shuffle_vector(raw, raw, _idx([rows * s + row for s in range(8)]))
    sc = b.zext(raw, v8i)
    dl = b.fmul(_splat(b, c.f32(c.off(c.head, 4 * row)), _V8F),
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


ROWS = {
    IQ4_KS: _ik_row(IQ4_KS, _iq4_ks_block, 8),
    IQ4_K: _ik_row(IQ4_K, _iq4_k_block, 16),
    IQ2_K: _ik_row(IQ2_K, _iq2_k_block, 16),
    IQ5_KS: _ik_row(IQ5_KS, _iq5_ks_block, 8),
    IQ3_K: _ik_row(IQ3_K, _iq3_k_block, 16),
}

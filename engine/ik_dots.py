"""Fused dot kernels for ik_llama.cpp's own plain types (IQ*_K, IQ*_KS, IQ4_KSS, IQ2_KL, Q6_0, Q8_KV), read
straight from their GGUF blocks (engine.block_dots).

Each non-linear code book is stored as unsigned codes (book + 128, + 64 or + 32). The second half of every IQ*_K
book is the first plus a constant (+4, +5, +4, +2, +1), so a group's `extra` bit changes only its bias (b * sum of
activations), not its codes. IQ6_K's book is not integers: it is dotted as three byte planes of fixed point.
Row scales (the *_KS types' header) come in as the context's `head` offset. Q6_0 and Q8_KV take mainline's
32-value step (engine.mainline_dots.small_row).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from engine.block_ir import (
    _I8,
    _I16,
    _I32,
    _V8F,
    _V8I,
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
from engine.ik_decoders import (
    _A6,
    _B6,
    _C6,
    _D6,
    _IQ2KL,
    IQ2_K,
    IQ2_KL,
    IQ2_KS,
    IQ3_K,
    IQ3_KS,
    IQ4_K,
    IQ4_KS,
    IQ4_KSS,
    IQ5_K,
    IQ5_KS,
    IQ6_K,
    Q6_0,
    Q8_KV,
)
from engine.ik_types import quant_type
from engine.mainline_dots import SmallBlocks, half_at, int8_codes, small_row
from engine.simd import _splat
from engine.simd_int8 import IQ4_CODES, _fma, lookup_codes

# IQ2_K's book (-31, -13, 1, 17) + 32; its second half is the first + 5.
_IQ2_CODES = [1, 19, 33, 49]
# IQ3_K's book (-63, -40, -23, -10, 1, 13, 28, 47) + 64; its second half is the first + 4.
_IQ3_CODES = [1, 24, 41, 54, 65, 77, 92, 111]
# IQ5_K's book + 128 (its second half is the first + 2).
_IQ5_CODES = [v + 128 for v in (-126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
                                -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121)]


def _iq6_planes() -> list[list[int]]:
    """IQ6_K's book + 128 in 24-bit fixed point (x 2^16) as three byte tables, low byte first. The book is a
    float32 cubic (ik_decoders._iq6_value), not integers; each product and sum of its multiply-adds is exact in
    float64, so one rounding to float32 gives the decoder's bits. Fixed point is off by at most 2^-17, the
    spacing of float32 values above 64, so the products agree to float32 rounding."""
    def fma(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))

    fixed = []
    for q in range(64):
        f = np.float32(q)
        fixed.append(round((float(fma(f, fma(f, fma(f, _D6, -_C6), _B6), _A6)) + 128.0) * 65536.0))
    return [[(p >> (8 * k)) & 255 for p in fixed] for k in range(3)]


_IQ6_PLANES = _iq6_planes()
# IQ2_KL's pairs (values of IQ3_K's first book half) + 64: their first values, then their second.
_IQ2KL_CODES = [int(v) + 64 for v in _IQ2KL[:, 0]] + [int(v) + 64 for v in _IQ2KL[:, 1]]


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
    """<len(picks) x i32>: lane g = byte picks[g] of the n bytes at `at` (a block's per-sub-block fields, one
    per group or sub-block)."""
    raw = c.load(c.src, at, ir.VectorType(_I8, n))
    return c.b.zext(c.b.shuffle_vector(raw, raw, _idx(picks)), ir.VectorType(_I32, len(picks)))


def _bits16(c: _Ctx, word: ir.Value) -> ir.Value:
    """<16 x i32>: bit g of a 16-bit word in lane g (the `extra` book-half bits of the IQ*_K types)."""
    b = c.b
    v = _splat(b, b.zext(word, _I32), _V16I)
    return b.and_(b.lshr(v, _const(_V16I, list(range(16)))), _const(_V16I, [1] * 16))


def _iq4_nibbles(c: _Ctx, raw: ir.Value) -> ir.Value:
    """<64 x i8>: the 4-bit indices of two 32-value sub-blocks of 16 bytes each (raw: <32 x i8>), in value order
    (IQ4_XS's layout: low nibbles are values 0-15 of a sub-block, high nibbles 16-31)."""
    b = c.b
    return b.shuffle_vector(b.and_(raw, _const(_V32I8, [15] * 32)), b.lshr(raw, _const(_V32I8, [4] * 32)),
                            _idx([*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]))


def _sub32_scales(c: _Ctx, d: ir.Value, ls: ir.Value, half: ir.Value, step: int, code_zero: int,
                  xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 8 scales of a block with one scale per 32 values: dl = d * ls (ls, half: <8 x i32>), value =
    dl * (code - code_zero + step * half) for the book half `half`; adds the offsets' part to accb."""
    b = c.b
    dl = b.fmul(_splat(b, d, _V8F), b.sitofp(ls, _V8F))
    shift = b.sub(b.mul(half, _const(_V8I, [step] * 8)), _const(_V8I, [code_zero] * 8))
    bias = b.fmul(dl, b.sitofp(shift, _V8F))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl, _pairs(b, c.load(c.xd, x, _V16F, 4), add=False)))
        b.store(b.fadd(b.load(accb[t]), b.fmul(bias, _pairs(b, c.load(c.xs, x, _V16F, 4), add=True))), accb[t])
    return scales


def _ks_scales(c: _Ctx, sc: ir.Value, step: int, xg: list[ir.Value], accb, row: int = 0) -> list[ir.Value]:
    """Each token's 8 sub-block scales of an IQ4_KS/IQ5_KS/IQ4_KSS block from its scale bytes sc (<8 x i32>)
    under the row's float32 scale d (float `row` of the header: row k of an interleaved group's):
    dl = d * ((sc & 254) - 127), value = dl * (code - 128 + step * (sc & 1))."""
    b = c.b
    ls = b.sub(b.and_(sc, _const(_V8I, [254] * 8)), _const(_V8I, [127] * 8))
    return _sub32_scales(c, c.f32(c.off(c.head, 4 * row)), ls, b.and_(sc, _const(_V8I, [1] * 8)), step, 128, xg,
                         accb)


def _bytes8(c: _Ctx, o: ir.Value) -> ir.Value:
    """<8 x i32>: the 8 bytes at o."""
    return c.b.zext(c.load(c.src, o, ir.VectorType(_I8, 8)), _V8I)


def _iq4_ks_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ4_KS block (scales[8] @0, qs[128] @8) under its row's float32 scale: sub-block s (32 values) has
    dl = d * ((sc & 254) - 127) and the book half sc & 1 (+4)."""
    scales = _ks_scales(c, _bytes8(c, o), 4, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        nibbles = _iq4_nibbles(c, c.load(c.src, c.off(o, 8 + 32 * g), _V32I8))
        _accumulate(c, lookup_codes(c.b, nibbles, IQ4_CODES), _values(c, xg, g), scales,
                    [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq5_codes(c: _Ctx, at: ir.Value, qh: ir.Value, g: int) -> ir.Value:
    """<64 x i8>: the 5-bit indices of step g (64 values) of IQ5_KS/IQ5_K: the low nibbles of the 32 bytes at
    `at`, then the high ones, with bits 2g and 2g + 1 of qh[j] (<32 x i8>) on top."""
    b = c.b
    one, four = _const(_V32I8, [1] * 32), _const(_V32I8, [4] * 32)
    raw = c.load(c.src, at, _V32I8)
    lo = b.or_(b.and_(raw, _const(_V32I8, [15] * 32)),
               b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g] * 32)), one), four))
    hi = b.or_(b.lshr(raw, four), b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g + 1] * 32)), one), four))
    return b.shuffle_vector(lo, hi, _idx(list(range(64))))


def _iq5_ks_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ5_KS block (scales[8] @0, qs[128] @8, qh[32] @136), scales as IQ4_KS (book half +2): step g's 64
    values are the low nibbles of qs[32 g ..] (sub-block 2g), then the high ones (2g + 1), 5th bits 2g and
    2g + 1 of qh[j]."""
    scales = _ks_scales(c, _bytes8(c, o), 2, xg, accb)
    qh = c.load(c.src, c.off(o, 136), _V32I8)
    for g in range(4):
        _accumulate(c, lookup_codes(c.b, _iq5_codes(c, c.off(o, 8 + 32 * g), qh, g), _IQ5_CODES),
                    _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iqk_scales(c: _Ctx, o: ir.Value, step: int, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 16 group scales of an IQ4_K/IQ5_K block (d @0, extra @2, scales_h[4] @4, scales_l[8] @8):
    half h of sub-block s (one group) has the 6-bit scale nibble h of scales_l[s] | bits 4 (s % 2) + 2 h of
    scales_h[s // 2] << 4, less 32, and book half bit 2 s + h of extra (+step)."""
    b = c.b
    order = [(s, h) for s in range(8) for h in range(2)]
    low = _spread(c, c.off(o, 8), 8, [s for s, h in order])
    high = _spread(c, c.off(o, 4), 4, [s // 2 for s, h in order])
    ls = b.or_(b.and_(b.lshr(low, _const(_V16I, [4 * h for s, h in order])), _const(_V16I, [15] * 16)),
               b.shl(b.and_(b.lshr(high, _const(_V16I, [4 * (s % 2) + 2 * h for s, h in order])),
                            _const(_V16I, [3] * 16)), _const(_V16I, [4] * 16)))
    return _book_scales(c, c.half(o), ls, 32, _bits16(c, c.load(c.src, c.off(o, 2), _I16)), step, 128, xg, accb)


def _iq4_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ4_K block (scales as _iqk_scales, book half +4; qs[128] @16), nibbles as IQ4_KS."""
    scales = _iqk_scales(c, o, 4, xg, accb)
    for g in range(4):
        nibbles = _iq4_nibbles(c, c.load(c.src, c.off(o, 16 + 32 * g), _V32I8))
        _accumulate(c, lookup_codes(c.b, nibbles, IQ4_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)


def _iq5_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ5_K block (scales as _iqk_scales, book half +2; qs[128] @16, qh[32] @144): codes as IQ5_KS's."""
    scales = _iqk_scales(c, o, 2, xg, accb)
    qh = c.load(c.src, c.off(o, 144), _V32I8)
    for g in range(4):
        _accumulate(c, lookup_codes(c.b, _iq5_codes(c, c.off(o, 16 + 32 * g), qh, g), _IQ5_CODES),
                    _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _iq2_codes(c: _Ctx, qs: ir.Value, g: int) -> ir.Value:
    """<64 x i8>: the 2-bit indices of step g (sub-blocks 2g, 2g + 1) of the IQ2_K/IQ2_KS layout: sub-block s's 32
    codes are bits 2 (s % 4) of the 32 bytes at qs + 32 (s // 4)."""
    b = c.b
    raw = c.load(c.src, c.off(qs, 32 * (g // 2)), _V32I8)
    f = [b.and_(b.lshr(raw, _const(_V32I8, [2 * ((2 * g + j) % 4)] * 32)), _const(_V32I8, [3] * 32))
         for j in range(2)]
    return b.shuffle_vector(f[0], f[1], _idx(list(range(64))))


def _iq3_codes(c: _Ctx, qs: ir.Value, qh: ir.Value, g: int) -> ir.Value:
    """<64 x i8>: the 3-bit indices of step g of the IQ3_K/IQ3_KS layout: IQ2_K's 2 bits (_iq2_codes) with bit s
    of qh[j] (<32 x i8>) above those of sub-block s's value j."""
    b = c.b
    one = _const(_V32I8, [1] * 32)
    h = [b.shl(b.and_(b.lshr(qh, _const(_V32I8, [2 * g + j] * 32)), one), _const(_V32I8, [2] * 32)) for j in range(2)]
    return b.or_(_iq2_codes(c, qs, g), b.shuffle_vector(h[0], h[1], _idx(list(range(64)))))


def _iq2_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ2_K block (d @0, extra @2, scales[8] @4, qs[64] @12): half h of sub-block s (one group) has scale
    nibble h of scales[s] less 8 and book half bit 2 s + h of extra (+5); sub-block s's 32 codes are bits
    2 (s % 4) of the 32 bytes at 12 + 32 (s // 4), in value order."""
    b = c.b
    order = [(s, h) for s in range(8) for h in range(2)]
    sc = _spread(c, c.off(o, 4), 8, [s for s, h in order])
    ls = b.and_(b.lshr(sc, _const(_V16I, [4 * h for s, h in order])), _const(_V16I, [15] * 16))
    scales = _book_scales(c, c.half(o), ls, 8, _bits16(c, c.load(c.src, c.off(o, 2), _I16)), 5, 32, xg, accb)
    for g in range(4):
        _accumulate(c, lookup_codes(b, _iq2_codes(c, c.off(o, 12), g), _IQ2_CODES), _values(c, xg, g), scales,
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
    qh = c.load(c.src, c.off(o, 78), _V32I8)
    for g in range(4):
        _accumulate(c, lookup_codes(b, _iq3_codes(c, c.off(o, 14), qh, g), _IQ3_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)


def _iq6_k_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ6_K block (d @0, extra @2, int8 scales[16] @4, qs[128] @20, qh[64] @148): group g has scale
    d * scales[g] and adds 1 to the book where bit g of extra is set; step g's codes are IQ5_K's nibbles with bits
    4 (g % 2) (low nibbles) and 4 (g % 2) + 2 (high) of qh[32 (g // 2) + j] as bits 4-5. The three byte planes
    of the book (_IQ6_PLANES) are dotted apart and summed with their weights 2^-16, 2^-8, 1."""
    b = c.b
    ls = b.sext(c.load(c.src, c.off(o, 4), ir.VectorType(_I8, 16)), _V16I)
    scales = _book_scales(c, c.half(o), ls, 0, _bits16(c, c.load(c.src, c.off(o, 2), _I16)), 1, 128, xg, accb)
    three, four, low = _const(_V32I8, [3] * 32), _const(_V32I8, [4] * 32), _const(_V32I8, [15] * 32)
    step = _const(_V16F, [1.0 / 256] * 16)
    for g in range(4):
        raw = c.load(c.src, c.off(o, 20 + 32 * g), _V32I8)
        qh = c.load(c.src, c.off(o, 148 + 32 * (g // 2)), _V32I8)
        lo = b.or_(b.and_(raw, low), b.shl(b.and_(b.lshr(qh, _const(_V32I8, [4 * (g % 2)] * 32)), three), four))
        hi = b.or_(b.lshr(raw, four), b.shl(b.and_(b.lshr(qh, _const(_V32I8, [4 * (g % 2) + 2] * 32)), three), four))
        idx = b.shuffle_vector(lo, hi, _idx(list(range(64))))
        planes = [lookup_codes(b, idx, table) for table in _IQ6_PLANES]
        lanes = _idx([4 * g + lane // 4 for lane in range(16)])
        for t, value in enumerate(_values(c, xg, g)):
            f0, f1, f2 = (c.codes_dot(w, value) for w in planes)
            f = _fma(b, _fma(b, f0, step, f1), step, f2)
            b.store(_fma(b, f, b.shuffle_vector(scales[t], scales[t], lanes), b.load(acc[t])), acc[t])


def _extra_bits(c: _Ctx, o: ir.Value, first: int) -> ir.Value:
    """<8 x i32>: bits first .. first + 7 of the 16-bit word at o, one per sub-block."""
    bits = _bits16(c, c.load(c.src, o, _I16))
    return c.b.shuffle_vector(bits, bits, _idx(list(range(first, first + 8))))


def _iq2_ks_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ2_KS block (extra @0, scales[4] @2, qs[64] @6) under its row's f16 scale: sub-block s (32 values) has
    dl = d * ((nibble s % 2 of scales[s // 2] | bit 8 + s of extra << 4) - 16) and book half bit s of extra
    (+5); codes as IQ2_K's."""
    b = c.b
    nib = b.and_(b.lshr(_spread(c, c.off(o, 2), 4, [s // 2 for s in range(8)]), _const(_V8I, [0, 4] * 4)),
                 _const(_V8I, [15] * 8))
    ls = b.sub(b.or_(nib, b.shl(_extra_bits(c, o, 8), _const(_V8I, [4] * 8))), _const(_V8I, [16] * 8))
    scales = _sub32_scales(c, c.half(c.head), ls, _extra_bits(c, o, 0), 5, 32, xg, accb)
    for g in range(4):
        _accumulate(c, lookup_codes(b, _iq2_codes(c, c.off(o, 6), g), _IQ2_CODES), _values(c, xg, g), scales,
                    [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq3_ks_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ3_KS block (extra @0, scales[4] @2, qs[64] @6, qh[32] @70) under its row's f16 scale: sub-block s
    has dl = d * ((nibble s // 4 of scales[s % 4] | bit s of extra << 4) - 16) and book half bit 8 + s of extra
    (+4); codes as IQ3_K's."""
    b = c.b
    nib = b.and_(b.lshr(_spread(c, c.off(o, 2), 4, [s % 4 for s in range(8)]), _const(_V8I, [0] * 4 + [4] * 4)),
                 _const(_V8I, [15] * 8))
    ls = b.sub(b.or_(nib, b.shl(_extra_bits(c, o, 0), _const(_V8I, [4] * 8))), _const(_V8I, [16] * 8))
    scales = _sub32_scales(c, c.half(c.head), ls, _extra_bits(c, o, 8), 4, 64, xg, accb)
    qh = c.load(c.src, c.off(o, 70), _V32I8)
    for g in range(4):
        _accumulate(c, lookup_codes(b, _iq3_codes(c, c.off(o, 6), qh, g), _IQ3_CODES), _values(c, xg, g), scales,
                    [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq4_kss_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ4_KSS block (64 little-endian words, 8 per sub-block) under its row's float32 scale: bit 0 of word k
    of sub-block s is bit k of its IQ4_KS scale byte; the word's other bits w become w ^ (w >> 1), whose bytes
    are the sub-block's IQ4_XS nibbles."""
    b = c.b
    v64i16, v16i16 = ir.VectorType(_I16, 64), ir.VectorType(_I16, 16)
    low = b.and_(c.load(c.src, o, v64i16), _const(v64i16, [1] * 64))
    bits = b.icmp_unsigned("!=", low, _const(v64i16, [0] * 64))  # <64 x i1>: bit 8 s + k = word 8 s + k's bit 0
    sc = b.zext(b.bitcast(b.bitcast(bits, ir.IntType(64)), ir.VectorType(_I8, 8)), _V8I)
    scales = _ks_scales(c, sc, 4, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        w = b.and_(c.load(c.src, c.off(o, 32 * g), v16i16), _const(v16i16, [0xFFFE] * 16))
        raw = b.bitcast(b.xor(w, b.lshr(w, _const(v16i16, [1] * 16))), _V32I8)
        _accumulate(c, lookup_codes(b, _iq4_nibbles(c, raw), IQ4_CODES), _values(c, xg, g), scales,
                    [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq2_kl_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ2_KL block (scales_h @0, scales_l[4] @2, qs[64] @6, qh[16] @70) under its row's f16 scale: sub-block
    s has dl = d * ((nibble s // 4 of scales_l[s % 4] | bits 2 s, 2 s + 1 of scales_h << 4) - 32); step g's 5-bit
    codes c_j = nibble h of qs[16 g + j] | bit 2 g + h of qh[j] << 4 each pick a pair of values (2j, 2j + 1 of
    sub-block 2 g + h), looked up in one 64-entry table (the pairs' first values, then their second)."""
    b = c.b
    nib = b.and_(b.lshr(_spread(c, c.off(o, 2), 4, [s % 4 for s in range(8)]), _const(_V8I, [0] * 4 + [4] * 4)),
                 _const(_V8I, [15] * 8))
    sh = _splat(b, b.zext(c.load(c.src, o, _I16), _I32), _V8I)
    high = b.and_(b.lshr(sh, _const(_V8I, list(range(0, 16, 2)))), _const(_V8I, [3] * 8))
    ls = b.sub(b.or_(nib, b.shl(high, _const(_V8I, [4] * 8))), _const(_V8I, [32] * 8))
    scales = _sub32_scales(c, c.half(c.head), ls, _const(_V8I, [0] * 8), 0, 64, xg, accb)
    v16 = ir.VectorType(_I8, 16)
    one, four = _const(v16, [1] * 16), _const(v16, [4] * 16)
    qh = c.load(c.src, c.off(o, 70), v16)
    for g in range(4):
        raw = c.load(c.src, c.off(o, 6 + 16 * g), v16)
        c1 = b.or_(b.and_(raw, _const(v16, [15] * 16)),
                   b.shl(b.and_(b.lshr(qh, _const(v16, [2 * g] * 16)), one), four))
        c2 = b.or_(b.lshr(raw, four), b.shl(b.and_(b.lshr(qh, _const(v16, [2 * g + 1] * 16)), one), four))
        first = b.shuffle_vector(c1, c2, _idx(list(range(32))))
        second = b.or_(first, _const(_V32I8, [32] * 32))
        idx = b.shuffle_vector(first, second, _idx([k for j in range(32) for k in (j, 32 + j)]))
        _accumulate(c, lookup_codes(b, idx, _IQ2KL_CODES), _values(c, xg, g), scales,
                    [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _q6_0_codes(c: _Ctx, o: ir.Value) -> ir.Value:
    """<32 x i8>: a Q6_0 block's codes (d @0, qh[8] @2, qs[16] @10): value j < 16 is the low nibble of qs[j],
    value j + 16 its high one, with bits 4 (j // 8) + 2 (half) .. + 1 of qh[j % 8] as bits 4-5."""
    b = c.b
    v16, v8 = ir.VectorType(_I8, 16), ir.VectorType(_I8, 8)
    raw = c.load(c.src, c.off(o, 10), v16)
    q = b.shuffle_vector(b.and_(raw, _const(v16, [15] * 16)), b.lshr(raw, _const(v16, [4] * 16)),
                         _idx(list(range(32))))
    qh = c.load(c.src, c.off(o, 2), v8)
    h = b.lshr(b.shuffle_vector(qh, qh, _idx([v % 8 for v in range(32)])),
               _const(_V32I8, [4 * (v % 16 // 8) + 2 * (v // 16) for v in range(32)]))
    return b.or_(q, b.shl(b.and_(h, _const(_V32I8, [3] * 32)), _const(_V32I8, [4] * 32)))


def _header_scale(k: int):
    """Row k's float32 scale in its row's (or interleaved group's) header: the *_KV types have no block scale."""

    def field(c: _Ctx, o: ir.Value) -> ir.Value:
        return c.f32(c.off(c.head, 4 * k))

    return field


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
    IQ5_K: _ik_row(IQ5_K, _iq5_k_block, 16),
    IQ6_K: _ik_row(IQ6_K, _iq6_k_block, 16),
    IQ2_KS: _ik_row(IQ2_KS, _iq2_ks_block, 8),
    IQ3_KS: _ik_row(IQ3_KS, _iq3_ks_block, 8),
    IQ4_KSS: _ik_row(IQ4_KSS, _iq4_kss_block, 8),
    IQ2_KL: _ik_row(IQ2_KL, _iq2_kl_block, 8),
    Q6_0: small_row(Q6_0, lambda k: SmallBlocks(_q6_0_codes, half_at(0), None, 32)),
    # Q8_KV's header also holds the row's code sum, unused here
    Q8_KV: small_row(Q8_KV, lambda k: SmallBlocks(int8_codes, _header_scale(0), None, 128)),
}

"""Fused dot kernels for ik_llama.cpp's row-interleaved types (*_R4, *_R8), read in their stored layout
(engine.block_dots).

A block of such a type holds the same block column of G rows (G = 4 or 8), interleaved. Row k of a group picks its
bytes out of the group's with constant shuffles: one kernel body per k, no repacking at load. The rows of a group
are visited one after another, so the group's bytes come from L1 after the first row.
"""

from __future__ import annotations

from llvmlite import ir

from engine.block_ir import _I8, _V8I, _V16I, _V32I8, _accumulate, _const, _Ctx, _idx, _values
from engine.ik_decoders import _R4_AT, IQ2_K_R4, IQ3_K_R4, IQ4_K_R4, IQ4_KS_R4, IQ4_XS_R8, IQ5_K_R4, IQ5_KS_R4
from engine.ik_dots import _IQ2_CODES, _IQ3_CODES, _IQ5_CODES, _book_scales, _ik_row, _ks_scales, _spread
from engine.simd_int8 import IQ4_CODES, lookup_codes


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



def _dword_codes(c: _Ctx, words: ir.Value, picks: list[int], shifts: list[int], mask: int) -> ir.Value:
    """<16 x i32>: lane l = (words[picks[l]] >> shifts[l]) & mask per byte (mask repeated in each byte). A 4-value
    lane of codes sits in one dword of the interleaved layouts, so one dword permute picks row k's lanes in value
    order and a per-dword shift (not a shuffle) chooses their nibble or bit field."""
    b = c.b
    w = b.shuffle_vector(words, words, _idx(picks))
    return b.and_(b.lshr(w, _const(_V16I, shifts)), _const(_V16I, [mask * 0x01010101] * 16))


def _r4_codes(c: _Ctx, qs: ir.Value, k: int, qh: ir.Value | None = None) -> ir.Value:
    """<64 x i8>: row k's 4-bit (with qh, 5-bit) indices of two 32-value sub-blocks in value order, from the
    IQ4_K_R4-like layout at qs (64 bytes a sub-block: byte 16 p + 4 k + i holds row k's values _R4_AT[p] + i (low
    nibble) and _R4_AT[p] + 8 + i (high)); qh: the sub-blocks' 5th bits, 16 bytes each, bits 2p and 2p + 1 of
    byte 4 k + i."""
    b = c.b
    # lane l of sub-block j (values 4 l ..) is nibble n of dword 4 p + k
    lanes = [(j, *next((p, n) for p in range(4) for n in range(2) if _R4_AT[p] + 8 * n == 4 * lane))
             for j in range(2) for lane in range(8)]
    words = b.shuffle_vector(c.load(c.src, qs, _V16I), c.load(c.src, c.off(qs, 64), _V16I), _idx(list(range(32))))
    codes = _dword_codes(c, words, [16 * j + 4 * p + k for j, p, n in lanes], [4 * n for j, p, n in lanes], 15)
    if qh is not None:  # bit 2 p + n of qh dword 4 j + k
        bits = _dword_codes(c, c.load(c.src, qh, _V8I), [4 * j + k for j, p, n in lanes],
                            [2 * p + n for j, p, n in lanes], 1)
        codes = b.or_(codes, b.shl(bits, _const(_V16I, [4] * 16)))
    return b.bitcast(codes, ir.VectorType(_I8, 64))


def _iqks_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int, fifth: bool) -> None:
    """Row k of an IQ4_KS_R4 (IQ5_KS_R4) block of 4 rows (scales[32] @0, qs[512] @32, qh[128] @544): sub-block
    s's scale byte 4 s + k as IQ4_KS's (book half +4, IQ5: +2) under row k's float in the group's header."""
    scales = _ks_scales(c, o, 2 if fifth else 4, xg, accb, k, 4)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        qh = c.off(o, 544 + 32 * g) if fifth else None
        w = lookup_codes(c.b, _r4_codes(c, c.off(o, 32 + 128 * g), k, qh), _IQ5_CODES if fifth else IQ4_CODES)
        _accumulate(c, w, _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq4_ks_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    _iqks_r4_block(c, o, xg, acc, accb, k, False)


def _iq5_ks_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    _iqks_r4_block(c, o, xg, acc, accb, k, True)


def _iqk_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int, fifth: bool) -> None:
    """Row k of an IQ4_K_R4 (IQ5_K_R4) block of 4 rows (d[4] f16 @0, extra[8] @8, scales_h[16] @16, scales_l[32]
    @32, qs[512] @64, qh[128] @576). Half h of sub-block s (one group) has scale S = 8 s + k + 4 h: nibble S // 32
    of scales_l[S % 32] | bits 2 (S // 16) of scales_h[S % 16] << 4, less 32, and book half bit s of
    extra[k + 4 h] (+4, IQ5: +2)."""
    b = c.b
    order = [8 * s + k + 4 * h for s in range(8) for h in range(2)]  # the block's 16 groups' scale indices
    low = _spread(c, c.off(o, 32), 32, [n % 32 for n in order])
    high = _spread(c, c.off(o, 16), 16, [n % 16 for n in order])
    ls = b.or_(b.and_(b.lshr(low, _const(_V16I, [4 * (n // 32) for n in order])), _const(_V16I, [15] * 16)),
               b.shl(b.and_(b.lshr(high, _const(_V16I, [2 * (n // 16) for n in order])), _const(_V16I, [3] * 16)),
                     _const(_V16I, [4] * 16)))
    ex = _spread(c, c.off(o, 8), 8, [k + 4 * h for s in range(8) for h in range(2)])
    half = b.and_(b.lshr(ex, _const(_V16I, [s for s in range(8) for h in range(2)])), _const(_V16I, [1] * 16))
    scales = _book_scales(c, c.half(c.off(o, 2 * k)), ls, 32, half, 2 if fifth else 4, 128, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        qh = c.off(o, 576 + 32 * g) if fifth else None
        w = lookup_codes(b, _r4_codes(c, c.off(o, 64 + 128 * g), k, qh), _IQ5_CODES if fifth else IQ4_CODES)
        _accumulate(c, w, _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _iq4_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    _iqk_r4_block(c, o, xg, acc, accb, k, False)


def _iq5_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    _iqk_r4_block(c, o, xg, acc, accb, k, True)


def _iq3_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ3_K_R4 block of 4 rows (d[4] f16 @0, extra[8] @8, scales_h[8] @16, scales_l[32] @24,
    qs[256] @56, qh[128] @312). Half h of sub-block s (one group) has scale S = 8 s + k + 4 h: 2 (nibble S // 32
    of scales_l[S % 32]) + 1, negated by bit S // 8 of scales_h[S % 8], and book half bit s of extra[k + 4 h]
    (+4). Its codes as IQ2_K_R4's (qs[32 s + 16 h + 4 k + i], bits 2 j for value 4 j + i) with bit j + 4 h of
    qh[16 s + 4 k + i] above them."""
    b = c.b
    order = [(s, h) for s in range(8) for h in range(2)]
    at = [8 * s + k + 4 * h for s, h in order]  # the 16 groups' scale indices
    sl = _spread(c, c.off(o, 24), 32, [n % 32 for n in at])
    odd = b.or_(b.shl(b.and_(b.lshr(sl, _const(_V16I, [4 * (n // 32) for n in at])), _const(_V16I, [15] * 16)),
                      _const(_V16I, [1] * 16)), _const(_V16I, [1] * 16))
    sh = _spread(c, c.off(o, 16), 8, [n % 8 for n in at])
    sign = b.and_(b.lshr(sh, _const(_V16I, [n // 8 for n in at])), _const(_V16I, [1] * 16))
    ls = b.mul(odd, b.sub(_const(_V16I, [1] * 16), b.shl(sign, _const(_V16I, [1] * 16))))
    ex = _spread(c, c.off(o, 8), 8, [k + 4 * h for s, h in order])
    half = b.and_(b.lshr(ex, _const(_V16I, [s for s, h in order])), _const(_V16I, [1] * 16))
    scales = _book_scales(c, c.half(c.off(o, 2 * k)), ls, 0, half, 4, 64, xg, accb)
    lanes = [(j, q) for j in range(2) for q in range(8)]  # lane q of sub-block j: half q // 4, field q % 4
    for g in range(4):  # sub-blocks 2g, 2g + 1
        low = _dword_codes(c, c.load(c.src, c.off(o, 56 + 64 * g), _V16I), [8 * j + 4 * (q // 4) + k for j, q in lanes],
                           [2 * (q % 4) for j, q in lanes], 3)
        high = _dword_codes(c, c.load(c.src, c.off(o, 312 + 32 * g), _V8I), [4 * j + k for j, q in lanes],
                            [q for j, q in lanes], 1)
        w = b.bitcast(b.or_(low, b.shl(high, _const(_V16I, [2] * 16))), ir.VectorType(_I8, 64))
        _accumulate(c, lookup_codes(b, w, _IQ3_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)


def _iq4_xs_r8_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ4_XS_R8 block of 8 rows (d[8] f16 @0, scales_h[16] @16, scales_l[32] @32, qs[1024] @64).
    Sub-block s has the 6-bit scale S = 8 s + k (as IQ4_K_R4's, less 32); its row k codes: the nibbles of
    qs[128 s + 32 l + 4 k + i], value 8 l + i low, 8 l + 4 + i high."""
    b = c.b
    at = [8 * s + k for s in range(8) for h in range(2)]  # one scale per sub-block, for both its groups
    low = _spread(c, c.off(o, 32), 32, [n % 32 for n in at])
    high = _spread(c, c.off(o, 16), 16, [n % 16 for n in at])
    ls = b.or_(b.and_(b.lshr(low, _const(_V16I, [4 * (n // 32) for n in at])), _const(_V16I, [15] * 16)),
               b.shl(b.and_(b.lshr(high, _const(_V16I, [2 * (n // 16) for n in at])), _const(_V16I, [3] * 16)),
                     _const(_V16I, [4] * 16)))
    scales = _book_scales(c, c.half(c.off(o, 2 * k)), ls, 32, _const(_V16I, [0] * 16), 0, 128, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1: lane q (values 4 q ..) is nibble q % 2 of dword 8 (q // 2) + k
        a = [c.load(c.src, c.off(o, 64 + 256 * g + 64 * n), _V16I) for n in range(4)]
        words = b.shuffle_vector(b.shuffle_vector(a[0], a[1], _idx(list(range(32)))),
                                 b.shuffle_vector(a[2], a[3], _idx(list(range(32)))), _idx(list(range(64))))
        w = _dword_codes(c, words, [32 * j + 8 * (q // 2) + k for j in range(2) for q in range(8)],
                         [4 * (q % 2) for j in range(2) for q in range(8)], 15)
        _accumulate(c, lookup_codes(b, b.bitcast(w, ir.VectorType(_I8, 64)), IQ4_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)

ROWS = {
    IQ2_K_R4: _ik_row(IQ2_K_R4, _iq2_k_r4_block, 16),
    IQ4_KS_R4: _ik_row(IQ4_KS_R4, _iq4_ks_r4_block, 8),
    IQ4_K_R4: _ik_row(IQ4_K_R4, _iq4_k_r4_block, 16),
    IQ5_K_R4: _ik_row(IQ5_K_R4, _iq5_k_r4_block, 16),
    IQ5_KS_R4: _ik_row(IQ5_KS_R4, _iq5_ks_r4_block, 8),
    IQ3_K_R4: _ik_row(IQ3_K_R4, _iq3_k_r4_block, 16),
    IQ4_XS_R8: _ik_row(IQ4_XS_R8, _iq4_xs_r8_block, 16),
}

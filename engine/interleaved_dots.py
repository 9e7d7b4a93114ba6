"""Fused dot kernels for ik_llama.cpp's row-interleaved types (*_R4, *_R8), read in their stored layout
(engine.block_dots).

A block of such a type holds the same block column of G rows (G = 4 or 8), interleaved. Row k of a group picks its
bytes out of the group's with constant shuffles: one kernel body per k, no repacking at load. The rows of a group
are visited one after another, so the group's bytes come from L1 after the first row.
"""

from __future__ import annotations

from functools import partial

from llvmlite import ir

from engine.block_ir import _I8, _I32, _V8I, _V16F, _V16I, _V32I8, _V64I8, _accumulate, _const, _Ctx, _idx, _values
from engine.ik_decoders import (
    IQ2_K_R4,
    IQ3_K_R4,
    IQ4_K_R4,
    IQ4_KS_R4,
    IQ4_NL_R4,
    IQ4_XS_R8,
    IQ5_K_R4,
    IQ5_KS_R4,
    Q2_K_R4,
    Q3_K_R4,
    Q4_0_R8,
    Q4_K_R4,
    Q5_0_R4,
    Q5_K_R4,
    Q6_0_R4,
    Q6_K_R4,
    Q8_0_R8,
    Q8_KV_R8,
)
from engine.ik_dots import _IQ2_CODES, _IQ3_CODES, _IQ5_CODES, _book_scales, _header_scale, _ik_row, _ks_scales, _spread
from engine.mainline_dots import SmallBlocks, half_at, small_row
from engine.simd import _splat
from engine.simd_int8 import IQ4_CODES, _fma, lookup_codes

# The *_R4 nibble layouts (IQ4_NL_R4, Q5_0_R4, Q6_0_R4, Q*_K_R4): row k's 16 bytes of a 32-value block are 4 at
# 16 p + 4 k for parts p = 0..3, and part p's byte i holds values _R4_AT[p] + i (low nibble) and + 8 (high). In
# value order, 4 values at a time: the part and nibble of each lane.
_R4_PART = (0, 2, 0, 2, 1, 3, 1, 3)
_R4_NIB = (0, 0, 1, 1, 0, 0, 1, 1)


def _pick(c: _Ctx, words: ir.Value, picks: list[int], shifts: list[int] | None = None,
          mask: int | None = None) -> ir.Value:
    """<n x i32>: lane l = (words[picks[l]] >> shifts[l]) with each byte masked by `mask`. A 4-value lane of codes
    sits in one dword of the interleaved layouts, so one dword permute picks row k's lanes in value order and a
    per-dword shift (not a byte shuffle) chooses their nibble or bit field."""
    b = c.b
    vty = ir.VectorType(_I32, len(picks))
    w = b.shuffle_vector(words, words, _idx(picks))
    if shifts is not None and any(shifts):
        w = b.lshr(w, _const(vty, shifts))
    if mask is not None:
        w = b.and_(w, _const(vty, [mask * 0x01010101] * len(picks)))
    return w


def _fields(c: _Ctx, at: ir.Value, nwords: int, picks: list[int], shifts: list[int] | None = None,
            mask: int | None = None) -> ir.Value:
    """_pick from the nwords 4-byte words at `at`."""
    return _pick(c, c.load(c.src, at, ir.VectorType(_I32, nwords)), picks, shifts, mask)


def _bytes(c: _Ctx, w: ir.Value) -> ir.Value:
    return c.b.bitcast(w, ir.VectorType(_I8, 4 * w.type.count))


def _r4_nibbles(c: _Ctx, at: ir.Value, k: int, n: int) -> ir.Value:
    """<8 n x i32>: row k's 4-bit codes of n consecutive 32-value blocks of 64 bytes at `at` in the *_R4 nibble
    layout, in value order."""
    return _fields(c, at, 16 * n, [16 * j + 4 * p + k for j in range(n) for p in _R4_PART],
                   [4 * h for _ in range(n) for h in _R4_NIB], 15)


def _q8_0_r8_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes + 128 of a Q8_0_R8 block of 8 rows (d[8] f16 @0, qs[256] @16): values 4 j .. 4 j + 3 are
    word 8 j + k of qs."""
    w = _fields(c, c.off(at, 16), 64, [8 * j + k for j in range(8)])
    return _bytes(c, c.b.xor(w, _const(w.type, [-0x7F7F7F80] * 8)))  # 0x80808080: int8 + 128


def _q8_kv_r8_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes + 128 of a Q8_KV_R8 block column of 8 rows (qs[256]; the rows' float32 scales are the
    group's header): values 16 h + 4 l .. 16 h + 4 l + 3 are word 32 h + 8 l + k."""
    w = _fields(c, at, 64, [32 * h + 8 * l + k for h in range(2) for l in range(4)])
    return _bytes(c, c.b.xor(w, _const(w.type, [-0x7F7F7F80] * 8)))  # 0x80808080: int8 + 128


def _q4_0_r8_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes of a Q4_0_R8 block of 8 rows (d[8] f16 @0, qs[128] @16): word 8 l + k of qs holds values
    4 l .. 4 l + 3 (low nibbles) and 16 + 4 l .. (high)."""
    w = _fields(c, c.off(at, 16), 32, [8 * (j % 4) + k for j in range(8)], [4 * (j // 4) for j in range(8)], 15)
    return _bytes(c, w)


def _iq4_nl_r4_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes of an IQ4_NL_R4 block of 4 rows (d[4] f16 @0, qs[64] @8 in the *_R4 nibble layout)."""
    return lookup_codes(c.b, _bytes(c, _r4_nibbles(c, c.off(at, 8), k, 1)), IQ4_CODES)


def _q5_0_r4_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes of a Q5_0_R4 block of 4 rows (d[4] f16 @0, qh[16] @8, qs[64] @24 in the *_R4 nibble
    layout): part p's nibble h takes bit p + 4 h of row k's qh word k."""
    h = _fields(c, c.off(at, 8), 4, [k] * 8, [p + 4 * h for p, h in zip(_R4_PART, _R4_NIB, strict=True)], 1)
    w = c.b.or_(_r4_nibbles(c, c.off(at, 24), k, 1), c.b.shl(h, _const(h.type, [4] * 8)))
    return _bytes(c, w)


def _q6_0_r4_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes of a Q6_0_R4 block of 4 rows (d[4] f16 @0, qh[32] @8, qs[64] @40 in the *_R4 nibble
    layout): part p's nibble h takes bits 2 (p // 2) + 4 h, + 1 of qh word 4 (p % 2) + k."""
    lanes = list(zip(_R4_PART, _R4_NIB, strict=True))
    h = _fields(c, c.off(at, 8), 8, [4 * (p % 2) + k for p, h in lanes], [2 * (p // 2) + 4 * h for p, h in lanes], 3)
    w = c.b.or_(_r4_nibbles(c, c.off(at, 40), k, 1), c.b.shl(h, _const(h.type, [4] * 8)))
    return _bytes(c, w)


def _small_r_row(qtype: int, codes, bias: int):
    """The row function of a 32-value interleaved type: value = d_k * (code - bias), d_k the f16 at 2 k."""
    return small_row(qtype, lambda k: SmallBlocks(partial(codes, k=k), half_at(2 * k), None, bias))


def _group_scales(c: _Ctx, dl: ir.Value, bias: ir.Value, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 16 group scales dl * xd (dl, bias: <16 x f32> per group); adds bias * xs to accb."""
    b = c.b
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl, c.load(c.xd, x, _V16F, 4)))
        b.store(_fma(b, bias, c.load(c.xs, x, _V16F, 4), b.load(accb[t])), accb[t])
    return scales


def _k4_r4_scales(c: _Ctx, o: ir.Value, k: int, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Row k's group scales of a Q4_K_R4 / Q5_K_R4 block (d[4] @0, dmin[4] @8, scales_h[16] @16, scales_l[32]
    @32): sub-block ib's 6-bit scale and min are the nibbles of scales_l[4 ib + k] with bits 0-1 and 2-3 of
    scales_h[(4 ib + k) % 16] >> 4 (ib // 4) on top; value = d sc q - dmin m."""
    b = c.b
    sub = [g // 2 for g in range(16)]
    sl = _spread(c, c.off(o, 32), 32, [4 * ib + k for ib in sub])
    sh = b.lshr(_spread(c, c.off(o, 16), 16, [(4 * ib + k) % 16 for ib in sub]),
                _const(_V16I, [4 * (ib // 4) for ib in sub]))

    def k16(v: int) -> ir.Constant:
        return _const(_V16I, [v] * 16)

    sc = b.or_(b.and_(sl, k16(15)), b.shl(b.and_(sh, k16(3)), k16(4)))
    m = b.or_(b.lshr(sl, k16(4)), b.shl(b.and_(sh, k16(12)), k16(2)))
    dl = b.fmul(_splat(b, c.half(c.off(o, 2 * k)), _V16F), b.sitofp(sc, _V16F))
    ml = b.fmul(_splat(b, c.half(c.off(o, 8 + 2 * k)), _V16F), b.sitofp(m, _V16F))
    return _group_scales(c, dl, b.fsub(_const(_V16F, [0.0] * 16), ml), xg, accb)


def _k4_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int, fifth: bool) -> None:
    """Row k of a Q4_K_R4 block of 4 rows (qs[512] @64, 64 bytes per 32 values in the *_R4 nibble layout), or
    with fifth bits of a Q5_K_R4 block (qh[128] @64, qs @192): sub-block ib's 5th bits are in row k's word
    16 ib + 4 k of qh, bits (0, 2, 1, 3, 4, 6, 5, 7) for its 8 lanes."""
    b = c.b
    scales = _k4_r4_scales(c, o, k, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        w = _r4_nibbles(c, c.off(o, (192 if fifth else 64) + 128 * g), k, 2)
        if fifth:
            h = _fields(c, c.off(o, 64 + 32 * g), 8, [4 * (lane // 8) + k for lane in range(16)],
                        [(0, 2, 1, 3, 4, 6, 5, 7)[lane % 8] for lane in range(16)], 1)
            w = b.or_(w, b.shl(h, _const(_V16I, [4] * 16)))
        _accumulate(c, _bytes(c, w), _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _q6_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of a Q6_K_R4 block of 4 rows (d[4] @0, int8 scales[64] @8, qh[256] @72, ql[512] @328): group g's
    scale is byte 4 g + k; ql in the *_R4 nibble layout (64 bytes per 32 values), the 2 high bits of part p's
    nibble h in row k's word 4 (p % 2) + k of the sub-block's 32 qh bytes, at bit 4 (p // 2) + 2 h."""
    b = c.b
    raw = c.load(c.src, c.off(o, 8), _V64I8)
    sc = b.sext(b.shuffle_vector(raw, raw, _idx([4 * g + k for g in range(16)])), _V16I)
    scales = _book_scales(c, c.half(c.off(o, 2 * k)), sc, 0, _const(_V16I, [0] * 16), 0, 32, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        lanes = [(j, p, h) for j in range(2) for p, h in zip(_R4_PART, _R4_NIB, strict=True)]
        h = _fields(c, c.off(o, 72 + 64 * g), 16, [8 * j + 4 * (p % 2) + k for j, p, h in lanes],
                    [4 * (p // 2) + 2 * h for j, p, h in lanes], 3)
        w = b.or_(_r4_nibbles(c, c.off(o, 328 + 128 * g), k, 2), b.shl(h, _const(_V16I, [4] * 16)))
        _accumulate(c, _bytes(c, w), _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


# The 2-bit layouts (Q2_K_R4, Q3_K_R4): row k's 8 bytes of a 32-value sub-block are words k and 4 + k of its 32,
# bits 2 s of byte i of word 4 h + k hold value 16 h + 4 s + i. Per 64 values (two sub-blocks), each lane's word
# and shift:
_R4_2BIT = [(8 * (lane // 8) + 4 * (lane % 8 // 4), 2 * (lane % 4)) for lane in range(16)]


def _q2_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of a Q2_K_R4 block of 4 rows (d[4] @0, dmin[4] @8, scales[64] @16, qs[256] @80): group g's byte
    4 g + k holds its 4-bit scale (low) and min (high); value = d sc q - dmin m."""
    b = c.b
    sc = _spread(c, c.off(o, 16), 64, [4 * g + k for g in range(16)])
    dl = b.fmul(_splat(b, c.half(c.off(o, 2 * k)), _V16F), b.sitofp(b.and_(sc, _const(_V16I, [15] * 16)), _V16F))
    ml = b.fmul(_splat(b, c.half(c.off(o, 8 + 2 * k)), _V16F), b.sitofp(b.lshr(sc, _const(_V16I, [4] * 16)), _V16F))
    scales = _group_scales(c, dl, b.fsub(_const(_V16F, [0.0] * 16), ml), xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        w = _fields(c, c.off(o, 80 + 64 * g), 16, [at + k for at, _ in _R4_2BIT], [s for _, s in _R4_2BIT], 3)
        _accumulate(c, _bytes(c, w), _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _q3_k_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of a Q3_K_R4 block of 4 rows (d[4] @0, scales_h[16] @8, scales_l[32] @24, qh[128] @56, qs[256]
    @184): group g's 6-bit scale s = 4 g + k is nibble s // 32 of scales_l[s % 32] with bits 2 (s // 16), + 1 of
    scales_h[s % 16] on top, less 32; the 3rd bit of value 16 h + 4 j + i of sub-block ib is bit j + 4 h of byte
    i of qh word 4 ib + k; value = d sc (q - 4)."""
    b = c.b
    sl = _spread(c, c.off(o, 24), 32, [(4 * g + k) % 32 for g in range(16)])
    sh = _spread(c, c.off(o, 8), 16, [(4 * g + k) % 16 for g in range(16)])
    at = [4 * g + k for g in range(16)]
    lo = b.and_(b.lshr(sl, _const(_V16I, [4 * (s // 32) for s in at])), _const(_V16I, [15] * 16))
    hi = b.and_(b.lshr(sh, _const(_V16I, [2 * (s // 16) for s in at])), _const(_V16I, [3] * 16))
    ls = b.or_(lo, b.shl(hi, _const(_V16I, [4] * 16)))
    scales = _book_scales(c, c.half(c.off(o, 2 * k)), ls, 32, _const(_V16I, [0] * 16), 0, 4, xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        low = _fields(c, c.off(o, 184 + 64 * g), 16, [at + k for at, _ in _R4_2BIT], [s for _, s in _R4_2BIT], 3)
        high = _fields(c, c.off(o, 56 + 32 * g), 8, [4 * (lane // 8) + k for lane in range(16)],
                       [lane % 4 + 4 * (lane % 8 // 4) for lane in range(16)], 1)
        w = b.or_(low, b.shl(high, _const(_V16I, [2] * 16)))
        _accumulate(c, _bytes(c, w), _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


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
        raw = c.load(c.src, c.off(o, 48 + 64 * g), _V64I8)
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


def _r4_codes(c: _Ctx, qs: ir.Value, k: int, qh: ir.Value | None = None) -> ir.Value:
    """<64 x i8>: row k's 4-bit (with qh, 5-bit) indices of two 32-value sub-blocks in value order, from the
    IQ4_K_R4-like layout at qs (the *_R4 nibble layout, 64 bytes a sub-block); qh: the sub-blocks' 5th bits, 16
    bytes each: part p's nibble n takes bit 2 p + n of qh dword 4 j + k (sub-block j)."""
    b = c.b
    codes = _r4_nibbles(c, qs, k, 2)
    if qh is not None:
        lanes = [(j, p, n) for j in range(2) for p, n in zip(_R4_PART, _R4_NIB, strict=True)]
        bits = _pick(c, c.load(c.src, qh, _V8I), [4 * j + k for j, p, n in lanes], [2 * p + n for j, p, n in lanes],
                     1)
        codes = b.or_(codes, b.shl(bits, _const(_V16I, [4] * 16)))
    return b.bitcast(codes, _V64I8)


def _iqks_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int, fifth: bool) -> None:
    """Row k of an IQ4_KS_R4 (IQ5_KS_R4) block of 4 rows (scales[32] @0, qs[512] @32, qh[128] @544): sub-block
    s's scale byte 4 s + k as IQ4_KS's (book half +4, IQ5: +2) under row k's float in the group's header."""
    raw = c.load(c.src, o, ir.VectorType(_I8, 32))
    sc = c.b.zext(c.b.shuffle_vector(raw, raw, _idx([4 * s + k for s in range(8)])), _V8I)
    scales = _ks_scales(c, sc, 2 if fifth else 4, xg, accb, k)
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
        low = _pick(c, c.load(c.src, c.off(o, 56 + 64 * g), _V16I), [8 * j + 4 * (q // 4) + k for j, q in lanes],
                           [2 * (q % 4) for j, q in lanes], 3)
        high = _pick(c, c.load(c.src, c.off(o, 312 + 32 * g), _V8I), [4 * j + k for j, q in lanes],
                            [q for j, q in lanes], 1)
        w = b.bitcast(b.or_(low, b.shl(high, _const(_V16I, [2] * 16))), _V64I8)
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
        w = _pick(c, words, [32 * j + 8 * (q // 2) + k for j in range(2) for q in range(8)],
                         [4 * (q % 2) for j in range(2) for q in range(8)], 15)
        _accumulate(c, lookup_codes(b, b.bitcast(w, _V64I8), IQ4_CODES), _values(c, xg, g), scales,
                    [4 * g + lane // 4 for lane in range(16)], acc)


ROWS = {
    Q8_0_R8: _small_r_row(Q8_0_R8, _q8_0_r8_codes, 128),
    Q4_0_R8: _small_r_row(Q4_0_R8, _q4_0_r8_codes, 8),
    IQ4_NL_R4: _small_r_row(IQ4_NL_R4, _iq4_nl_r4_codes, 128),
    Q5_0_R4: _small_r_row(Q5_0_R4, _q5_0_r4_codes, 16),
    Q6_0_R4: _small_r_row(Q6_0_R4, _q6_0_r4_codes, 32),
    Q4_K_R4: _ik_row(Q4_K_R4, lambda c, o, xg, acc, accb, k: _k4_r4_block(c, o, xg, acc, accb, k, False), 16),
    Q5_K_R4: _ik_row(Q5_K_R4, lambda c, o, xg, acc, accb, k: _k4_r4_block(c, o, xg, acc, accb, k, True), 16),
    Q6_K_R4: _ik_row(Q6_K_R4, _q6_k_r4_block, 16),
    Q2_K_R4: _ik_row(Q2_K_R4, _q2_k_r4_block, 16),
    Q3_K_R4: _ik_row(Q3_K_R4, _q3_k_r4_block, 16),
    Q8_KV_R8: small_row(Q8_KV_R8, lambda k: SmallBlocks(partial(_q8_kv_r8_codes, k=k), _header_scale(k), None, 128)),
    IQ2_K_R4: _ik_row(IQ2_K_R4, _iq2_k_r4_block, 16),
    IQ4_KS_R4: _ik_row(IQ4_KS_R4, _iq4_ks_r4_block, 8),
    IQ4_K_R4: _ik_row(IQ4_K_R4, _iq4_k_r4_block, 16),
    IQ5_K_R4: _ik_row(IQ5_K_R4, _iq5_k_r4_block, 16),
    IQ5_KS_R4: _ik_row(IQ5_KS_R4, _iq5_ks_r4_block, 8),
    IQ3_K_R4: _ik_row(IQ3_K_R4, _iq3_k_r4_block, 16),
    IQ4_XS_R8: _ik_row(IQ4_XS_R8, _iq4_xs_r8_block, 16),
}

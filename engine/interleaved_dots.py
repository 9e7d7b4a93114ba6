"""Fused dot kernels for ik_llama.cpp's row-interleaved types (*_R4, *_R8), read in their stored layout
(engine.block_dots).

A block of such a type holds the same block column of G rows (G = 4 or 8), interleaved. Row k of a group picks its
bytes out of the group's with constant shuffles: one kernel body per k, no repacking at load. The rows of a group
are visited one after another, so the group's bytes come from L1 after the first row.
"""

from __future__ import annotations

from llvmlite import ir

from engine.block_ir import _I8, _I32, _V16I, _V32I8, _accumulate, _const, _Ctx, _idx, _values
from engine.ik_decoders import IQ2_K_R4, Q4_0_R8, Q8_0_R8
from engine.ik_dots import _IQ2_CODES, _book_scales, _ik_row, _spread
from engine.ik_types import quant_type
from engine.mainline_dots import _block_pair, _pair_row
from engine.simd_int8 import lookup_codes

# The *_R4 nibble layouts (IQ4_NL_R4, Q5_0_R4, Q6_0_R4, Q*_K_R4): row k's 16 bytes of a 32-value block are 4 at
# 16 p + 4 k for parts p = 0..3, and part p's byte i holds values _R4_AT[p] + i (low nibble) and + 8 (high). In
# value order, 4 values at a time: the part and nibble of each lane.
_R4_PART = (0, 2, 0, 2, 1, 3, 1, 3)
_R4_NIB = (0, 0, 1, 1, 0, 0, 1, 1)


def _fields(c: _Ctx, at: ir.Value, nwords: int, picks: list[int], shifts: list[int] | None = None,
            mask: int | None = None) -> ir.Value:
    """<n x i32>: words picks[l] of the nwords 4-byte words at `at`, each shifted right by shifts[l] and each of
    its bytes masked by `mask` (a lane's 4 values share the shift: row k's bytes come 4 at a time)."""
    b = c.b
    vty = ir.VectorType(_I32, len(picks))
    raw = c.load(c.src, at, ir.VectorType(_I32, nwords))
    w = b.shuffle_vector(raw, raw, _idx(picks))
    if shifts is not None and any(shifts):
        w = b.lshr(w, _const(vty, shifts))
    if mask is not None:
        w = b.and_(w, _const(vty, [mask * 0x01010101] * len(picks)))
    return w


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


def _q4_0_r8_codes(c: _Ctx, at: ir.Value, k: int) -> ir.Value:
    """Row k's 32 codes of a Q4_0_R8 block of 8 rows (d[8] f16 @0, qs[128] @16): word 8 l + k of qs holds values
    4 l .. 4 l + 3 (low nibbles) and 16 + 4 l .. (high)."""
    w = _fields(c, c.off(at, 16), 32, [8 * (j % 4) + k for j in range(8)], [4 * (j // 4) for j in range(8)], 15)
    return _bytes(c, w)


def _small_r_row(qtype: int, codes, bias: int):
    """The row function of a 32-value interleaved type: value = d_k * (code - bias), d_k the f16 at 2 k."""
    nbytes = quant_type(qtype).group * quant_type(qtype).block_bytes

    def step(c, o, xg, acc, accb, pair, k):
        _block_pair(c, o, xg, acc, accb, lambda at: codes(c, at, k), nbytes, 2 * k, None, bias, pair)

    return _pair_row(qtype, step)


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



ROWS = {
    Q8_0_R8: _small_r_row(Q8_0_R8, _q8_0_r8_codes, 128),
    Q4_0_R8: _small_r_row(Q4_0_R8, _q4_0_r8_codes, 8),
    IQ2_K_R4: _ik_row(IQ2_K_R4, _iq2_k_r4_block, 16),
}

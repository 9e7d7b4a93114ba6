"""Row decoders for GGUF block types (numba): one row's bytes -> float32, bit-identical to `gguf.quants`.

Legend: B blocks per row, QK values per block. Layouts: docs/deepseek2.md §6.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.ik_decoders import decode_ik
from engine.simd import (
    _NO_BIAS,
    _bits_to_f32,
    _f16_at,
    _half_to_f32,
    _i8,
    _unpack16,
    _unpack16_i8,
    _unpack16_iq4,
    _unpack16_qh,
)

# GGML type ids (gguf.GGMLQuantizationType), repeated here because jitted code needs plain ints.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16 = 10, 11, 12, 13, 14, 20, 23, 30

# qtype -> (values per block, bytes per block).
BLOCK: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    IQ4_NL: (32, 18),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
    IQ4_XS: (256, 136),
}

# ---------------------------------------------------------------------------------------------------------
# Row decoders: src = one row's bytes (uint8 [B * block bytes]), dst = float32 [C]; each 16-value group of a
# block is one _unpack16* call with the block's scales computed once.
# ---------------------------------------------------------------------------------------------------------


@njit(cache=True)
def _dec_f16(src: np.ndarray, dst: np.ndarray) -> None:
    for i in range(dst.size):
        dst[i] = _half_to_f32(np.uint16(src[2 * i]) | (np.uint16(src[2 * i + 1]) << np.uint16(8)))


@njit(cache=True)
def _dec_bf16(src: np.ndarray, dst: np.ndarray) -> None:
    for i in range(dst.size):
        dst[i] = _bits_to_f32((np.uint32(src[2 * i]) << np.uint32(16)) | (np.uint32(src[2 * i + 1]) << np.uint32(24)))


@njit(cache=True)
def _dec_f32(src: np.ndarray, dst: np.ndarray) -> None:
    for i in range(dst.size):
        o = 4 * i
        bits = (
            np.uint32(src[o])
            | (np.uint32(src[o + 1]) << np.uint32(8))
            | (np.uint32(src[o + 2]) << np.uint32(16))
            | (np.uint32(src[o + 3]) << np.uint32(24))
        )
        dst[i] = _bits_to_f32(bits)


@njit(cache=True)
def _dec_q8_0(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 34 * b
        d = _f16_at(src, o)
        _unpack16_i8(dst, 32 * b, src, o + 2, d)
        _unpack16_i8(dst, 32 * b + 16, src, o + 18, d)


@njit(cache=True)
def _dec_q4_0(src: np.ndarray, dst: np.ndarray) -> None:
    # qs[16] @2: value j < 16 is the low nibble of qs[j], value 16 + j the high nibble.
    for b in range(dst.size // 32):
        o = 18 * b
        d = _f16_at(src, o)
        _unpack16(dst, 32 * b, src, o + 2, 0, 15, o, 0, 0, 0, 8, d, _NO_BIAS)
        _unpack16(dst, 32 * b + 16, src, o + 2, 4, 15, o, 0, 0, 0, 8, d, _NO_BIAS)


@njit(cache=True)
def _dec_q4_1(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 20 * b
        d = _f16_at(src, o)
        m = _f16_at(src, o + 2)
        _unpack16(dst, 32 * b, src, o + 4, 0, 15, o, 0, 0, 0, 0, d, m)
        _unpack16(dst, 32 * b + 16, src, o + 4, 4, 15, o, 0, 0, 0, 0, d, m)


@njit(cache=True)
def _qh32(src: np.ndarray, o: int) -> int:
    """The little-endian uint32 of 5th bits in Q5_0/Q5_1 blocks."""
    return np.int64(src[o]) | (np.int64(src[o + 1]) << 8) | (np.int64(src[o + 2]) << 16) | (np.int64(src[o + 3]) << 24)


@njit(cache=True)
def _dec_q5_0(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, qh @2, qs @6: value e (nibble order as Q4_0) takes its 5th bit from bit e of qh.
    for b in range(dst.size // 32):
        o = 22 * b
        d = _f16_at(src, o)
        qh = _qh32(src, o + 2)
        _unpack16_qh(dst, 32 * b, src, o + 6, 0, qh, 0, 16, d, _NO_BIAS)
        _unpack16_qh(dst, 32 * b + 16, src, o + 6, 4, qh, 16, 16, d, _NO_BIAS)


@njit(cache=True)
def _dec_q5_1(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 24 * b
        d = _f16_at(src, o)
        m = _f16_at(src, o + 2)
        qh = _qh32(src, o + 4)
        _unpack16_qh(dst, 32 * b, src, o + 8, 0, qh, 0, 0, d, m)
        _unpack16_qh(dst, 32 * b + 16, src, o + 8, 4, qh, 16, 0, d, m)


@njit(cache=True)
def _dec_iq4_nl(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 18 * b
        d = _f16_at(src, o)
        _unpack16_iq4(dst, 32 * b, src, o + 2, 0, d)
        _unpack16_iq4(dst, 32 * b + 16, src, o + 2, 4, d)


@njit(cache=True)
def _dec_q2_k(src: np.ndarray, dst: np.ndarray) -> None:
    # scales[16] @0 (low 4 bits scale, high 4 bits min), qs[64] @16, d @80, dmin @82; value e = 128h + 32s + l
    # takes 2 bits (2s) of qs[32h + l] and the scale of its 16-value sub-block e // 16.
    for b in range(dst.size // 256):
        o = 84 * b
        d = _f16_at(src, o + 80)
        dmin = _f16_at(src, o + 82)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    sc = np.int32(src[o + 8 * h + 2 * s + half])
                    a = d * np.float32(sc & 15)
                    m = dmin * np.float32(sc >> 4)
                    base = 256 * b + 128 * h + 32 * s + 16 * half
                    _unpack16(dst, base, src, o + 16 + 32 * h + 16 * half, 2 * s, 3, o, 0, 0, 0, 0, a, -m)


@njit(cache=True)
def _dec_q3_k(src: np.ndarray, dst: np.ndarray) -> None:
    # hmask[32] @0, qs[64] @32, scales[12] @96 (16 6-bit scales, -32), d @108; value e = 128h + 32s + l has
    # low bits 2s of qs[32h + l] and loses 4 unless bit 4h + s of hmask[l] is set: q = (low | hbit << 2) - 4.
    for b in range(dst.size // 256):
        o = 110 * b
        d = _f16_at(src, o + 108)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    j = 8 * h + 2 * s + half
                    lo = (np.int32(src[o + 96 + (j & 7)]) >> (4 * (j >> 3))) & 15
                    hi = (np.int32(src[o + 104 + (j & 3)]) >> (2 * (j >> 2))) & 3
                    a = d * np.float32((lo | (hi << 4)) - 32)
                    base = 256 * b + 128 * h + 32 * s + 16 * half
                    q0 = o + 32 + 32 * h + 16 * half
                    _unpack16(dst, base, src, q0, 2 * s, 3, o + 16 * half, 4 * h + s, 1, 2, 4, a, _NO_BIAS)


@njit(cache=True)
def _scale_min_k4(src: np.ndarray, o: int, j: int) -> tuple[int, int]:
    """Sub-block j's 6-bit (scale, min) of a Q4_K/Q5_K block whose 12 packed scale bytes start at o."""
    if j < 4:
        return np.int32(src[o + j]) & 63, np.int32(src[o + j + 4]) & 63
    sc = (np.int32(src[o + j + 4]) & 15) | ((np.int32(src[o + j - 4]) >> 6) << 4)
    m = (np.int32(src[o + j + 4]) >> 4) | ((np.int32(src[o + j]) >> 6) << 4)
    return sc, m


@njit(cache=True)
def _dec_q4_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, dmin @2, scales @4, qs[128] @16: chunk g's 32 bytes hold sub-block 2g (low) and 2g + 1 (high).
    for b in range(dst.size // 256):
        o = 144 * b
        d = _f16_at(src, o)
        dmin = _f16_at(src, o + 2)
        for g in range(4):
            for k in range(2):
                sc, m = _scale_min_k4(src, o + 4, 2 * g + k)
                a, c = d * np.float32(sc), dmin * np.float32(m)
                for half in range(2):
                    base = 256 * b + 64 * g + 32 * k + 16 * half
                    _unpack16(dst, base, src, o + 16 + 32 * g + 16 * half, 4 * k, 15, o, 0, 0, 0, 0, a, -c)


@njit(cache=True)
def _dec_q5_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, dmin @2, scales @4, qh[32] @16, qs[128] @48: sub-block j = 2g + k has its 5th bits in bit j of qh.
    for b in range(dst.size // 256):
        o = 176 * b
        d = _f16_at(src, o)
        dmin = _f16_at(src, o + 2)
        for g in range(4):
            for k in range(2):
                sc, m = _scale_min_k4(src, o + 4, 2 * g + k)
                a, c = d * np.float32(sc), dmin * np.float32(m)
                for half in range(2):
                    base = 256 * b + 64 * g + 32 * k + 16 * half
                    q0 = o + 48 + 32 * g + 16 * half
                    _unpack16(dst, base, src, q0, 4 * k, 15, o + 16 + 16 * half, 2 * g + k, 1, 4, 0, a, -c)


@njit(cache=True)
def _dec_q6_k(src: np.ndarray, dst: np.ndarray) -> None:
    # ql[128] @0, qh[64] @128, int8 scales[16] @192, d @208; value e = 128h + 32s + l:
    # low 4 bits from ql[64h + 32(s % 2) + l] (nibble s // 2), high 2 bits (2s) from qh[32h + l].
    for b in range(dst.size // 256):
        o = 210 * b
        d = _f16_at(src, o + 208)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    a = d * _i8(src[o + 192 + 8 * h + 2 * s + half])
                    base = 256 * b + 128 * h + 32 * s + 16 * half
                    l0 = o + 64 * h + 32 * (s & 1) + 16 * half
                    h0 = o + 128 + 32 * h + 16 * half
                    _unpack16(dst, base, src, l0, 4 * (s >> 1), 15, h0, 2 * s, 3, 4, 32, a, _NO_BIAS)


@njit(cache=True)
def _dec_iq4_xs(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, scales_h u16 @2, scales_l[4] @4, qs[128] @8; sub-block ib: low nibbles of its 16 bytes, then high.
    for b in range(dst.size // 256):
        o = 136 * b
        d = _f16_at(src, o)
        sh = np.int32(src[o + 2]) | (np.int32(src[o + 3]) << 8)
        for ib in range(8):
            ls = ((np.int32(src[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            a = d * np.float32(ls - 32)
            _unpack16_iq4(dst, 256 * b + 32 * ib, src, o + 8 + 16 * ib, 0, a)
            _unpack16_iq4(dst, 256 * b + 32 * ib + 16, src, o + 8 + 16 * ib, 4, a)


@njit(cache=True)
def _decode_row(qtype: int, src: np.ndarray, dst: np.ndarray) -> None:
    """Decode one row of any supported type; the branch is taken once per row, not per value."""
    if qtype == Q8_0:
        _dec_q8_0(src, dst)
    elif qtype == Q4_K:
        _dec_q4_k(src, dst)
    elif qtype == Q6_K:
        _dec_q6_k(src, dst)
    elif qtype == Q5_K:
        _dec_q5_k(src, dst)
    elif qtype == Q4_0:
        _dec_q4_0(src, dst)
    elif qtype == Q4_1:
        _dec_q4_1(src, dst)
    elif qtype == Q5_0:
        _dec_q5_0(src, dst)
    elif qtype == Q5_1:
        _dec_q5_1(src, dst)
    elif qtype == IQ4_NL:
        _dec_iq4_nl(src, dst)
    elif qtype == IQ4_XS:
        _dec_iq4_xs(src, dst)
    elif qtype == Q2_K:
        _dec_q2_k(src, dst)
    elif qtype == Q3_K:
        _dec_q3_k(src, dst)
    elif qtype == F16:
        _dec_f16(src, dst)
    elif qtype == BF16:
        _dec_bf16(src, dst)
    elif qtype == F32:
        _dec_f32(src, dst)
    else:  # ik_llama.cpp's types decode whole rows / interleaved groups only (engine.ik_decoders)
        decode_ik(qtype, src, dst)

"""Row decoders for ik_llama.cpp's own quant types (numba), bit-identical to its `dequantize_row_*` functions.

Legend: C values per row, G rows per interleaved group. Layouts: engine.ik_types and ik_llama.cpp's
ggml/src/ggml-common.h; each decoder follows ggml/src/iqk/iqk_quantize.cpp (or ggml-quants.c) operation for
operation, in float32, so every value is the float ik_llama.cpp computes.

A decoder takes one whole unit: src = one row's bytes including its header (plain types) or the G * row bytes of
one interleaved group, dst = C (or G * C, rows one after another) float32 values. Only whole units decode: a row
header is read once per row and an interleaved block holds G rows.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.iq_grid_decoders import (
    _dec_iq1_m_r4,
    _dec_iq1_s_r4,
    _dec_iq2_s_r4,
    _dec_iq2_xs_r4,
    _dec_iq2_xxs_r4,
    _dec_iq3_s_r4,
    _dec_iq3_xxs_r4,
)
from engine.simd import _bits_to_f32, _f16_at, _i8

# ik_llama.cpp type ids (engine.ik_types), repeated as plain ints for jitted code.
Q6_0, IQ2_K, IQ3_K, IQ4_K, IQ5_K, IQ6_K = 133, 137, 138, 139, 140, 141
IQ4_KS, IQ2_KS, IQ4_KSS, IQ5_KS, IQ3_KS, IQ2_KL = 144, 145, 146, 152, 156, 157
Q8_KV = 151
Q8_0_R8, Q4_K_R4, Q6_K_R4, IQ4_XS_R8, IQ2_K_R4, IQ4_K_R4 = 208, 212, 214, 223, 337, 339
IQ3_K_R4, IQ5_K_R4, IQ4_KS_R4, IQ5_KS_R4 = 338, 340, 344, 352
Q4_0_R8, Q5_0_R4, Q6_0_R4, IQ4_NL_R4, Q2_K_R4, Q3_K_R4, Q5_K_R4 = 202, 206, 233, 220, 210, 211, 213
IQ2_KT, IQ3_KT, IQ4_KT, IQ1_KT = 153, 154, 155, 158
IQ2_XXS_R4, IQ2_XS_R4, IQ3_XXS_R4, IQ1_S_R4, IQ3_S_R4, IQ2_S_R4, IQ1_M_R4 = 216, 217, 218, 219, 221, 222, 229
Q8_KV_R8, BF16_R16 = 398, 230

# The non-linear code books (ggml-common.h); the second half of each is the shifted set `extra` bits select.
_IQ2NL = np.array([-31, -13, 1, 17, -26, -8, 6, 22], np.float32)
_IQ3NL = np.array([-63, -40, -23, -10, 1, 13, 28, 47, -59, -36, -19, -6, 5, 17, 32, 51], np.float32)
_IQ4K = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                  -123, -100, -79, -61, -45, -31, -18, -6, 5, 17, 29, 42, 57, 73, 93, 117], np.float32)
_IQ5NL = np.array([-126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
                   -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121,
                   -124, -112, -101, -90, -81, -72, -63, -55, -48, -41, -34, -28, -22, -16, -10, -4,
                   1, 7, 13, 19, 25, 31, 38, 45, 53, 61, 70, 79, 89, 99, 111, 123], np.float32)
# IQ2_KL: 32 pairs of int8 values, stored as uint16 (low byte first).
_IQ2KL_PAIRS = np.array([0xe9c1, 0x0dc1, 0xc1d8, 0xf6d8, 0x0dd8, 0x2fd8, 0xd8e9, 0xe9e9, 0x01e9, 0x0de9, 0x1ce9,
                         0xc1f6, 0x01f6, 0x0df6, 0x2ff6, 0xe901, 0xf601, 0x0101, 0x0d01, 0x1c01, 0xd80d, 0xe90d,
                         0xf60d, 0x010d, 0x0d0d, 0xc11c, 0xe91c, 0x011c, 0x1c1c, 0x2f1c, 0xe92f, 0x0d2f], np.uint16)
_IQ2KL = np.stack([(_IQ2KL_PAIRS & 0xFF).astype(np.uint8).view(np.int8),
                   (_IQ2KL_PAIRS >> 8).astype(np.uint8).view(np.int8)], axis=1).astype(np.float32)
# IQ6_K's code book is a cubic in the 6-bit code q (iqk_quantize.cpp A_IQ6K..D_IQ6K), evaluated in float32.
_A6, _B6, _C6, _D6 = np.float32(-127.0), np.float32(6.2568), np.float32(0.11218), np.float32(0.0011972)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c in float32 with one rounding. ik_llama.cpp is built with GCC's default -ffp-contract=fast (and
    -march=native FMA), so its `x * y + z` expressions are fused; matching its bits needs the same fusion."""
    if not all(isinstance(t, types.Float) for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        x, y, z = (context.cast(builder, v, t, types.float32) for v, t in zip(args, signature.args, strict=True))
        return builder.call(fn, [x, y, z])

    return types.float32(a, b, c), codegen


@njit(cache=True, inline="always")
def _u16(src: np.ndarray, o: int) -> int:
    return np.int32(src[o]) | (np.int32(src[o + 1]) << 8)


@njit(cache=True, inline="always")
def _f32_at(src: np.ndarray, o: int) -> np.float32:
    """The float32 stored little-endian at byte offset o (the *_KS row scales)."""
    return _bits_to_f32(np.uint32(src[o]) | (np.uint32(src[o + 1]) << np.uint32(8))
                        | (np.uint32(src[o + 2]) << np.uint32(16)) | (np.uint32(src[o + 3]) << np.uint32(24)))


@njit(cache=True)
def _dec_q6_0(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, qh[8] @2, qs[16] @10: value j < 16 is qs[j]'s low nibble | bits 4-5 from qh[j % 8] >> 4 (j // 8).
    for b in range(dst.size // 32):
        o = 26 * b
        d = _f16_at(src, o)
        for j in range(16):
            h = np.int32(src[o + 2 + j % 8]) >> (4 * (j // 8))
            q = np.int32(src[o + 10 + j])
            dst[32 * b + j] = np.float32(((q & 15) | ((h << 4) & 48)) - 32) * d
            dst[32 * b + j + 16] = np.float32(((q >> 4) | ((h << 2) & 48)) - 32) * d


@njit(cache=True)
def _dec_iq2_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, extra u16 @2, scales[8] @4, qs[64] @12: sub-block ib32 (32 values as two 16s) takes 2 bits
    # (2 * (ib32 % 4)) of qs[32 * (ib32 // 4) + j].
    for b in range(dst.size // 256):
        o = 76 * b
        d = _f16_at(src, o)
        extra = _u16(src, o + 2)
        for ib in range(8):
            sc = np.int32(src[o + 4 + ib])
            dl1 = d * np.float32((sc & 15) - 8)
            dl2 = d * np.float32((sc >> 4) - 8)
            v1 = 4 * ((extra >> (2 * ib)) & 1)
            v2 = 4 * ((extra >> (2 * ib + 1)) & 1)
            q0 = o + 12 + 32 * (ib // 4)
            shift = 2 * (ib % 4)
            y = 256 * b + 32 * ib
            for j in range(16):
                dst[y + j] = dl1 * _IQ2NL[v1 + ((np.int32(src[q0 + j]) >> shift) & 3)]
                dst[y + j + 16] = dl2 * _IQ2NL[v2 + ((np.int32(src[q0 + j + 16]) >> shift) & 3)]


@njit(cache=True)
def _dec_iq3_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, extra @2, scales_h @4, scales_l[8] @6, qs[64] @14, qh[32] @78.
    for b in range(dst.size // 256):
        o = 110 * b
        d = _f16_at(src, o)
        extra = _u16(src, o + 2)
        sh = _u16(src, o + 4)
        for ib in range(8):
            sl = np.int32(src[o + 6 + ib])
            s1 = -1 if (sh >> (2 * ib)) & 1 else 1
            s2 = -1 if (sh >> (2 * ib + 1)) & 1 else 1
            dl1 = d * np.float32((2 * (sl & 15) + 1) * s1)
            dl2 = d * np.float32((2 * (sl >> 4) + 1) * s2)
            v1 = 8 * ((extra >> (2 * ib)) & 1)
            v2 = 8 * ((extra >> (2 * ib + 1)) & 1)
            q0 = o + 14 + 32 * (ib // 4)
            shift_l = 2 * (ib % 4)
            y = 256 * b + 32 * ib
            for j in range(16):
                c1 = ((np.int32(src[q0 + j]) >> shift_l) & 3) | (((np.int32(src[o + 78 + j]) >> ib) & 1) << 2)
                c2 = ((np.int32(src[q0 + j + 16]) >> shift_l) & 3) | (((np.int32(src[o + 94 + j]) >> ib) & 1) << 2)
                dst[y + j] = dl1 * _IQ3NL[v1 + c1]
                dst[y + j + 16] = dl2 * _IQ3NL[v2 + c2]


@njit(cache=True)
def _dec_iq4_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, extra @2, scales_h[4] @4, scales_l[8] @8, qs[128] @16.
    for b in range(dst.size // 256):
        o = 144 * b
        d = _f16_at(src, o)
        extra = _u16(src, o + 2)
        for ib in range(8):
            sh = np.int32(src[o + 4 + ib // 2]) >> (4 * (ib % 2))
            sl = np.int32(src[o + 8 + ib])
            dl1 = d * np.float32(((sl & 15) | ((sh << 4) & 48)) - 32)
            dl2 = d * np.float32(((sl >> 4) | ((sh << 2) & 48)) - 32)
            v1 = 16 * ((extra >> (2 * ib)) & 1)
            v2 = 16 * ((extra >> (2 * ib + 1)) & 1)
            y = 256 * b + 32 * ib
            for j in range(16):
                q = np.int32(src[o + 16 + 16 * ib + j])
                dst[y + j] = dl1 * _IQ4K[v1 + (q & 15)]
                dst[y + j + 16] = dl2 * _IQ4K[v2 + (q >> 4)]


@njit(cache=True)
def _dec_iq5_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, extra @2, scales_h[4] @4, scales_l[8] @8, qs[128] @16, qh[32] @144.
    for b in range(dst.size // 256):
        o = 176 * b
        d = _f16_at(src, o)
        extra = _u16(src, o + 2)
        for i in range(4):  # 64 values: qs[32 i ..], 5th bits 2 (i % 4) and 2 (i % 4) + 1 of qh
            sh = np.int32(src[o + 4 + i])
            sl0 = np.int32(src[o + 8 + 2 * i])
            sl1 = np.int32(src[o + 9 + 2 * i])
            dl1 = d * np.float32(((sl0 & 15) | ((sh << 4) & 48)) - 32)
            dl2 = d * np.float32(((sl0 >> 4) | ((sh << 2) & 48)) - 32)
            dl3 = d * np.float32(((sl1 & 15) | (sh & 48)) - 32)
            dl4 = d * np.float32(((sl1 >> 4) | ((sh >> 2) & 48)) - 32)
            ex = extra >> (4 * i)
            v1, v2, v3, v4 = 32 * (ex & 1), 32 * ((ex >> 1) & 1), 32 * ((ex >> 2) & 1), 32 * ((ex >> 3) & 1)
            shift = 2 * i
            y = 256 * b + 64 * i
            qs = o + 16 + 32 * i
            for j in range(16):
                a, c = np.int32(src[qs + j]), np.int32(src[qs + j + 16])
                ha, hc = np.int32(src[o + 144 + j]) >> shift, np.int32(src[o + 160 + j]) >> shift
                dst[y + j] = dl1 * _IQ5NL[v1 + ((a & 15) | ((ha & 1) << 4))]
                dst[y + j + 16] = dl2 * _IQ5NL[v2 + ((c & 15) | ((hc & 1) << 4))]
                dst[y + j + 32] = dl3 * _IQ5NL[v3 + ((a >> 4) | ((ha & 2) << 3))]
                dst[y + j + 48] = dl4 * _IQ5NL[v4 + ((c >> 4) | ((hc & 2) << 3))]


@njit(cache=True, inline="always")
def _iq6_value(q: int, m: np.float32) -> np.float32:
    # A + q * (B + q * (-C + q * D)) + m, each multiply-add fused as GCC compiles it (see _fma)
    f = np.float32(q)
    return _fma(f, _fma(f, _fma(f, _D6, -_C6), _B6), _A6) + m


@njit(cache=True)
def _dec_iq6_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, extra @2, int8 scales[16] @4, qs[128] @20, qh[64] @148.
    for b in range(dst.size // 256):
        o = 212 * b
        d = _f16_at(src, o)
        extra = _u16(src, o + 2)
        for i in range(4):
            dl1, dl2 = d * _i8(src[o + 4 + 4 * i]), d * _i8(src[o + 5 + 4 * i])
            dl3, dl4 = d * _i8(src[o + 6 + 4 * i]), d * _i8(src[o + 7 + 4 * i])
            ex = extra >> (4 * i)
            m1 = np.float32(ex & 1)
            m2 = np.float32((ex >> 1) & 1)
            m3 = np.float32((ex >> 2) & 1)
            m4 = np.float32((ex >> 3) & 1)
            shift = 4 * (i % 2)
            qh = o + 148 + 32 * (i // 2)
            qs = o + 20 + 32 * i
            y = 256 * b + 64 * i
            for j in range(16):
                a, c = np.int32(src[qs + j]), np.int32(src[qs + j + 16])
                ha, hc = np.int32(src[qh + j]) >> shift, np.int32(src[qh + j + 16]) >> shift
                dst[y + j] = dl1 * _iq6_value((a & 15) | ((ha & 3) << 4), m1)
                dst[y + j + 16] = dl2 * _iq6_value((c & 15) | ((hc & 3) << 4), m2)
                dst[y + j + 32] = dl3 * _iq6_value((a >> 4) | ((ha & 12) << 2), m3)
                dst[y + j + 48] = dl4 * _iq6_value((c >> 4) | ((hc & 12) << 2), m4)


@njit(cache=True)
def _dec_iq4_ks(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of scales[8] @0, qs[128] @8; scale byte: bit 0 picks the code book half.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 136 * b
        for ib in range(8):
            s = np.int32(src[o + ib])
            dl = d * np.float32((s & 254) - 127)
            v = 16 * (s & 1)
            y = 256 * b + 32 * ib
            for j in range(16):
                q = np.int32(src[o + 8 + 16 * ib + j])
                dst[y + j] = dl * _IQ4K[v + (q & 15)]
                dst[y + j + 16] = dl * _IQ4K[v + (q >> 4)]


@njit(cache=True)
def _dec_iq2_ks(src: np.ndarray, dst: np.ndarray) -> None:
    # f16 row scale @0, then blocks of extra u16 @0, scales[4] @2, qs[64] @6.
    d = _f16_at(src, 0)
    for b in range(dst.size // 256):
        o = 2 + 70 * b
        extra = _u16(src, o)
        for i in range(4):
            sc = np.int32(src[o + 2 + i])
            ex = extra >> (2 * i)
            dl1 = d * np.float32(((sc & 15) | ((ex >> 4) & 16)) - 16)
            dl2 = d * np.float32(((sc >> 4) | ((ex >> 5) & 16)) - 16)
            v1, v2 = 4 * (ex & 1), 4 * ((ex >> 1) & 1)
            shift = 4 * (i % 2)
            q0 = o + 6 + 32 * (i // 2)
            y = 256 * b + 64 * i
            for j in range(32):
                q = np.int32(src[q0 + j])
                dst[y + j] = dl1 * _IQ2NL[v1 + ((q >> shift) & 3)]
                dst[y + j + 32] = dl2 * _IQ2NL[v2 + ((q >> (shift + 2)) & 3)]


@njit(cache=True)
def _dec_iq5_ks(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of scales[8] @0, qs[128] @8, qh[32] @136.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 168 * b
        for i in range(4):
            s1, s2 = np.int32(src[o + 2 * i]), np.int32(src[o + 2 * i + 1])
            dl1 = d * np.float32((s1 & 254) - 127)
            dl2 = d * np.float32((s2 & 254) - 127)
            v1, v2 = 32 * (s1 & 1), 32 * (s2 & 1)
            y = 256 * b + 64 * i
            for j in range(32):
                q = np.int32(src[o + 8 + 32 * i + j])
                h = np.int32(src[o + 136 + j])
                dst[y + j] = dl1 * _IQ5NL[v1 + ((q & 15) | (((h >> (2 * i)) & 1) << 4))]
                dst[y + j + 32] = dl2 * _IQ5NL[v2 + ((q >> 4) | (((h >> (2 * i + 1)) & 1) << 4))]


@njit(cache=True)
def _dec_iq4_kss(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of 8 x 8 uint16: bit 0 of the 8 words of a 32-value sub-block is its
    # scale byte; the other 15 bits w (bit 0 cleared) become w ^ (w >> 1), two bytes of nibbles.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 128 * b
        for ib in range(8):
            w0 = o + 16 * ib
            ls = 0
            for k in range(8):
                ls |= (_u16(src, w0 + 2 * k) & 1) << k
            v = 16 * (ls & 1)
            dl = d * np.float32((ls & 254) - 127)
            y = 256 * b + 32 * ib
            for k in range(8):
                w = _u16(src, w0 + 2 * k) & 0xFFFE
                w ^= w >> 1
                lo, hi = w & 0xFF, w >> 8
                dst[y + 2 * k] = dl * _IQ4K[v + (lo & 15)]
                dst[y + 2 * k + 16] = dl * _IQ4K[v + (lo >> 4)]
                dst[y + 2 * k + 1] = dl * _IQ4K[v + (hi & 15)]
                dst[y + 2 * k + 17] = dl * _IQ4K[v + (hi >> 4)]


@njit(cache=True)
def _dec_iq3_ks(src: np.ndarray, dst: np.ndarray) -> None:
    # f16 row scale @0, then blocks of extra u16 @0, scales[4] @2, qs[64] @6, qh[32] @70.
    d = _f16_at(src, 0)
    for b in range(dst.size // 256):
        o = 2 + 102 * b
        extra = _u16(src, o)
        for i128 in range(2):
            for ib in range(4):
                k = 4 * i128 + ib  # sub-block: scale nibble from scales[k % 4], 5th bit from extra bit k
                sc = np.int32(src[o + 2 + k % 4])
                ls = ((sc >> (4 * (k // 4))) & 15) | (((extra >> k) & 1) << 4)
                dl = d * np.float32(ls - 16)
                v = 8 * ((extra >> (8 + k)) & 1)
                y = 256 * b + 32 * k
                for j in range(32):
                    q = (np.int32(src[o + 6 + 32 * i128 + j]) >> (2 * ib)) & 3
                    h = (np.int32(src[o + 70 + j]) >> k) & 1
                    dst[y + j] = dl * _IQ3NL[v + (q | (h << 2))]


@njit(cache=True)
def _dec_iq2_kl(src: np.ndarray, dst: np.ndarray) -> None:
    # f16 row scale @0, then blocks of scales_h u16 @0, scales_l[4] @2, qs[64] @6, qh[16] @70; a 5-bit code
    # picks a pair of values.
    d = _f16_at(src, 0)
    for b in range(dst.size // 256):
        o = 2 + 86 * b
        sh = _u16(src, o)
        for i in range(4):
            l1 = (np.int32(src[o + 2 + (2 * i) % 4]) >> (4 * (i // 2))) & 15
            l2 = (np.int32(src[o + 2 + (2 * i + 1) % 4]) >> (4 * (i // 2))) & 15
            dl1 = d * np.float32((l1 | (((sh >> (4 * i)) & 3) << 4)) - 32)
            dl2 = d * np.float32((l2 | (((sh >> (4 * i + 2)) & 3) << 4)) - 32)
            y = 256 * b + 64 * i
            for j in range(16):
                q = np.int32(src[o + 6 + 16 * i + j])
                h = np.int32(src[o + 70 + j])
                c1 = (q & 15) | (((h >> (2 * i)) & 1) << 4)
                c2 = (q >> 4) | (((h >> (2 * i + 1)) & 1) << 4)
                dst[y + 2 * j] = dl1 * _IQ2KL[c1, 0]
                dst[y + 2 * j + 1] = dl1 * _IQ2KL[c1, 1]
                dst[y + 2 * j + 32] = dl2 * _IQ2KL[c2, 0]
                dst[y + 2 * j + 33] = dl2 * _IQ2KL[c2, 1]


@njit(cache=True)
def _dec_q8_kv(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, 4 bytes (the row's code sum, unused here) @4, int8 codes @8.
    d = _f32_at(src, 0)
    for j in range(dst.size):
        dst[j] = d * _i8(src[8 + j])


# ---- trellis types (*_KT): a 12-16 bit index seeds a multiplicative generator that yields a group's values ----


@njit(cache=True, inline="always")
def _kt_values(idx: int, offset: int, dst: np.ndarray, y: int, count: int, scale: np.float32, absolute: bool) -> None:
    """QuantizerIQKT::set_values (is_int): x = idx + offset, then per value x *= 0xCBAC1FED (mod 2^32) and the
    value is the sum of the 4 bytes of x & 0x3f3f3f3f, less 126 (its absolute value for IQ3_KT), times scale."""
    x = np.uint64((idx + offset) & 0xFFFFFFFF)
    for k in range(count):
        x = (np.uint64(0xCBAC1FED) * x) & np.uint64(0xFFFFFFFF)
        s = np.int64(x & np.uint64(0x3F3F3F3F))
        v = np.float32((s & 255) + ((s >> 8) & 255) + ((s >> 16) & 255) + (s >> 24)) - np.float32(126.0)
        dst[y + k] = scale * (abs(v) if absolute else v)


@njit(cache=True)
def _dec_iq2_kt(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of scales[4] @0, 32 uint16 indices @4: index j < 16 gives values
    # 8j.. of the block's first half (scale: low nibble of scales[j // 4]), index 16 + j the second half's.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 68 * b
        for ib in range(4):
            sc = np.int32(src[o + ib])
            sl, sh = d * _IQ4K[sc & 15], d * _IQ4K[sc >> 4]
            for ig in range(4):
                j = 4 * ib + ig
                _kt_values(_u16(src, o + 4 + 2 * j), 4096, dst, 256 * b + 8 * j, 8, sl, False)
                _kt_values(_u16(src, o + 36 + 2 * j), 4096, dst, 256 * b + 128 + 8 * j, 8, sh, False)


@njit(cache=True)
def _dec_iq3_kt(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of scales[4] @0, 32 uint16 indices @4 (as IQ2_KT, values taken
    # absolute, plain 4-bit scales), sign bits qh[32] @68: bit ib (bit ib + 4) of qh[8 ig + j] negates value j
    # of group ig of sub-block ib in the first (second) half.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 100 * b
        for ib in range(4):
            sc = np.int32(src[o + ib])
            sl, sh = d * np.float32(sc & 15), d * np.float32(sc >> 4)
            for ig in range(4):
                j = 4 * ib + ig
                yl, yh = 256 * b + 8 * j, 256 * b + 128 + 8 * j
                _kt_values(_u16(src, o + 4 + 2 * j), 4096, dst, yl, 8, sl, True)
                _kt_values(_u16(src, o + 36 + 2 * j), 4096, dst, yh, 8, sh, True)
                for t in range(8):
                    h = np.int32(src[o + 68 + 8 * ig + t])
                    if (h >> ib) & 1:
                        dst[yl + t] = -dst[yl + t]
                    if (h >> (ib + 4)) & 1:
                        dst[yh + t] = -dst[yh + t]


@njit(cache=True)
def _dec_iq4_kt(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of 8 uint32 words @0 (per 32-value sub-block: bit 0 offset select, bits 1-7
    # scale + 64, bits 8.. three high index bits per group of 4), ql[64] @32, qh[32] @96.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 128 * b
        for ib in range(8):
            w = np.int64(_u16(src, o + 4 * ib)) | (np.int64(_u16(src, o + 4 * ib + 2)) << 16)
            offset = 32768 + 4096 if w & 1 else 4096
            sl = d * np.float32(((w & 255) >> 1) - 64)
            for ig in range(8):
                jj = 8 * ib + ig
                idx = (np.int64(src[o + 32 + jj]) | ((np.int64(src[o + 96 + jj % 32]) << (8 - 4 * (jj // 32))) & 0xF00)
                       | (((w >> (8 + 3 * ig)) & 7) << 12))
                _kt_values(idx, offset, dst, 256 * b + 32 * ib + 4 * ig, 4, sl, False)


@njit(cache=True)
def _dec_iq1_kt(src: np.ndarray, dst: np.ndarray) -> None:
    # float32 row scale @0, then blocks of sh[8] @0 (low nibble: scale code; bits 4-7: 13th index bit per group),
    # ql[32] @8, qh[16] @40.
    d = _f32_at(src, 0)
    for b in range(dst.size // 256):
        o = 4 + 56 * b
        for ib in range(8):
            sh = np.int64(src[o + ib])
            sl = d * _IQ4K[sh & 15]
            for ig in range(4):
                idx = np.int64(src[o + 8 + 4 * ib + ig]) | (
                    (np.int64(src[o + 40 + 4 * (ib % 4) + ig]) << (8 - 4 * (ib // 4))) & 0xF00)
                idx |= (sh << (8 - ig)) & 0x1000
                _kt_values(idx, 4096, dst, 256 * b + 32 * ib + 8 * ig, 8, sl, False)


# ---- row-interleaved types: dst holds the G rows one after another, n = dst.size // G values each ----------


@njit(cache=True)
def _dec_q8_0_r8(src: np.ndarray, dst: np.ndarray) -> None:
    # per 32 columns: d[8] @0, qs[256] @16; row k's values 4l + i and 4l + i + 16 are qs[32l + 4k + i] and
    # qs[128 + 32l + 4k + i].
    n = dst.size // 8
    for b in range(n // 32):
        o = 272 * b
        for k in range(8):
            d = _f16_at(src, o + 2 * k)
            y = k * n + 32 * b
            for l in range(4):
                for i in range(4):
                    dst[y + 4 * l + i] = d * _i8(src[o + 16 + 32 * l + 4 * k + i])
                    dst[y + 4 * l + i + 16] = d * _i8(src[o + 144 + 32 * l + 4 * k + i])


@njit(cache=True, inline="always")
def _k4_r4_scale_min(src: np.ndarray, o: int, k: int, ib: int) -> tuple[np.float32, np.float32]:
    """Q4_K_R4/Q5_K_R4: row k's scale and min of sub-block ib in the block at o (d[4] @0, dmin[4] @8, the high
    bits of the 6-bit scales/mins @16, their low bits @32)."""
    s = 4 * ib + k
    sl = np.int32(src[o + 32 + s])
    sh = np.int32(src[o + 16 + s % 16]) >> (4 * (s // 16))
    dl = _f16_at(src, o + 2 * k) * np.float32((sl & 15) | ((sh & 3) << 4))
    ml = _f16_at(src, o + 8 + 2 * k) * np.float32((sl >> 4) | ((sh & 12) << 2))
    return dl, ml


@njit(cache=True)
def _dec_q4_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, dmin[4] @8, scales_h[16] @16, scales_l[32] @32, qs[512] @64.
    n = dst.size // 4
    for b in range(n // 256):
        o = 576 * b
        for k in range(4):
            for ib in range(8):
                dl, ml = _k4_r4_scale_min(src, o, k, ib)
                y = k * n + 256 * b + 32 * ib
                q = o + 64 + 64 * ib + 4 * k
                for i in range(4):
                    for part, at in ((0, 0), (16, 16), (32, 4), (48, 20)):
                        c = np.int32(src[q + i + part])
                        dst[y + i + at] = _fma(dl, np.float32(c & 15), -ml)  # dl * q - ml, fused (_fma)
                        dst[y + i + at + 8] = _fma(dl, np.float32(c >> 4), -ml)


@njit(cache=True)
def _dec_q6_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, int8 scales[64] @8, qh[256] @72, ql[512] @328 (64 ql, 32 qh per 32 columns).
    n = dst.size // 4
    for b in range(n // 256):
        o = 840 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                dl1 = d * _i8(src[o + 8 + 8 * ib + k])
                dl2 = d * _i8(src[o + 8 + 8 * ib + k + 4])
                ql = o + 328 + 64 * ib + 4 * k
                qh = o + 72 + 32 * ib + 4 * k
                y = k * n + 256 * b + 32 * ib
                for i in range(4):
                    l0, l1 = np.int32(src[ql + i]), np.int32(src[ql + i + 16])
                    l2, l3 = np.int32(src[ql + i + 32]), np.int32(src[ql + i + 48])
                    h0, h1 = np.int32(src[qh + i]), np.int32(src[qh + i + 16])
                    dst[y + i] = dl1 * np.float32(((l0 & 15) | ((h0 << 4) & 48)) - 32)
                    dst[y + i + 8] = dl1 * np.float32(((l0 >> 4) | ((h0 << 2) & 48)) - 32)
                    dst[y + i + 16] = dl2 * np.float32(((l1 & 15) | ((h1 << 4) & 48)) - 32)
                    dst[y + i + 24] = dl2 * np.float32(((l1 >> 4) | ((h1 << 2) & 48)) - 32)
                    dst[y + i + 4] = dl1 * np.float32(((l2 & 15) | (h0 & 48)) - 32)
                    dst[y + i + 12] = dl1 * np.float32(((l2 >> 4) | ((h0 >> 2) & 48)) - 32)
                    dst[y + i + 20] = dl2 * np.float32(((l3 & 15) | (h1 & 48)) - 32)
                    dst[y + i + 28] = dl2 * np.float32(((l3 >> 4) | ((h1 >> 2) & 48)) - 32)


@njit(cache=True, inline="always")
def _scale6(src: np.ndarray, o: int, s: int) -> int:
    """Scale s (0..63) of an IQ4_XS_R8 / IQ4_K_R4 block: 4 bits from scales_l[32] @o + 16, 2 from scales_h[16] @o."""
    lo = (np.int32(src[o + 16 + s % 32]) >> (4 * (s // 32))) & 15
    hi = (np.int32(src[o + s % 16]) >> (2 * (s // 16))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=True)
def _dec_iq4_xs_r8(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[8] @0, scales_h[16] @16, scales_l[32] @32, qs[1024] @64.
    n = dst.size // 8
    for b in range(n // 256):
        o = 1088 * b
        for k in range(8):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                dl = d * np.float32(_scale6(src, o + 16, 8 * ib + k))
                y = k * n + 256 * b + 32 * ib
                for l in range(4):
                    for i in range(4):
                        c = np.int32(src[o + 64 + 128 * ib + 4 * k + i + 32 * l])
                        dst[y + 8 * l + i] = dl * _IQ4K[c & 15]
                        dst[y + 8 * l + i + 4] = dl * _IQ4K[c >> 4]


@njit(cache=True)
def _dec_iq2_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, extra[8] @8, scales[32] @16, qs[256] @48 (32 per 32 columns).
    n = dst.size // 4
    for b in range(n // 256):
        o = 304 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                s1, s2 = 8 * ib + k, 8 * ib + k + 4
                dl1 = d * np.float32(((np.int32(src[o + 16 + s1 % 32]) >> (4 * (s1 // 32))) & 15) - 8)
                dl2 = d * np.float32(((np.int32(src[o + 16 + s2 % 32]) >> (4 * (s2 // 32))) & 15) - 8)
                v1 = 4 * ((np.int32(src[o + 8 + k]) >> ib) & 1)
                v2 = 4 * ((np.int32(src[o + 12 + k]) >> ib) & 1)
                y = k * n + 256 * b + 32 * ib
                q = o + 48 + 32 * ib + 4 * k
                for i in range(4):
                    c1, c2 = np.int32(src[q + i]), np.int32(src[q + i + 16])
                    for s in range(4):
                        dst[y + i + 4 * s] = dl1 * _IQ2NL[v1 + ((c1 >> (2 * s)) & 3)]
                        dst[y + i + 16 + 4 * s] = dl2 * _IQ2NL[v2 + ((c2 >> (2 * s)) & 3)]


# Where the 8 values of one byte position of the *_R4 4-bit layouts go: qs byte 64 ib + 4 k + i + _R4_PART[p]
# holds row k's values i + _R4_AT[p] (low nibble) and i + _R4_AT[p] + 8 (high), with 5th bits 2p and 2p + 1 of
# qh[16 ib + 4 k + i] (IQ5 types).
_R4_PART = (0, 16, 32, 48)
_R4_AT = (0, 16, 4, 20)
_Q5K_R4_QH = (0, 4, 2, 6)


@njit(cache=True, inline="always")
def _r4_nibbles(src: np.ndarray, q: int, qh: int, dst: np.ndarray, y: int, dl1: np.float32, dl2: np.float32,
                table: np.ndarray, v1: int, v2: int) -> None:
    """Row k's 32 values of one 32-column block of IQ4_K_R4-like layouts (q = qs + 64 ib + 4 k, qh likewise or
    -1 for 4-bit types); parts 0 and 2 use (dl1, v1), parts 1 and 3 (dl2, v2)."""
    for i in range(4):
        h = np.int32(src[qh + i]) if qh >= 0 else 0
        for p in range(4):
            dl, v = (dl1, v1) if p % 2 == 0 else (dl2, v2)
            c = np.int32(src[q + i + _R4_PART[p]])
            lo = (c & 15) | (((h >> (2 * p)) & 1) << 4)
            hi = (c >> 4) | (((h >> (2 * p + 1)) & 1) << 4)
            dst[y + i + _R4_AT[p]] = dl * table[v + lo]
            dst[y + i + _R4_AT[p] + 8] = dl * table[v + hi]


@njit(cache=True, inline="always")
def _iq3_r4_scale(src: np.ndarray, o: int, d: np.float32, s: int) -> np.float32:
    """Scale s of an IQ3_K_R4 block: d * (2 * (4 bits of scales_l) + 1) * (-1 if bit of scales_h)."""
    mag = 2 * ((np.int32(src[o + 24 + s % 32]) >> (4 * (s // 32))) & 15) + 1
    sign = -1 if (np.int32(src[o + 16 + s % 8]) >> (s // 8)) & 1 else 1
    return d * np.float32(mag) * np.float32(sign)


@njit(cache=True)
def _dec_iq3_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, extra[8] @8, scales_h[8] @16, scales_l[32] @24, qs[256] @56, qh[128] @312.
    n = dst.size // 4
    for b in range(n // 256):
        o = 440 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                dl1 = _iq3_r4_scale(src, o, d, 8 * ib + k)
                dl2 = _iq3_r4_scale(src, o, d, 8 * ib + k + 4)
                v1 = 8 * ((np.int32(src[o + 8 + k]) >> ib) & 1)
                v2 = 8 * ((np.int32(src[o + 12 + k]) >> ib) & 1)
                y = k * n + 256 * b + 32 * ib
                ql = o + 56 + 32 * ib + 4 * k
                qh = o + 312 + 16 * ib + 4 * k
                for i in range(4):
                    c1, c2, h = np.int32(src[ql + i]), np.int32(src[ql + i + 16]), np.int32(src[qh + i])
                    for s in range(4):
                        dst[y + i + 4 * s] = dl1 * _IQ3NL[v1 + (((c1 >> (2 * s)) & 3) | (((h >> s) & 1) << 2))]
                        dst[y + i + 16 + 4 * s] = dl2 * _IQ3NL[v2 + (((c2 >> (2 * s)) & 3)
                                                                       | (((h >> (s + 4)) & 1) << 2))]


@njit(cache=True, inline="always")
def _dec_iqk_r4(src: np.ndarray, dst: np.ndarray, fifth: bool) -> None:
    """IQ4_K_R4, or with fifth bits IQ5_K_R4. Per 256 columns: d[4] @0, extra[8] @8, scales_h[16] @16,
    scales_l[32] @32, qs[512] @64, and for IQ5 qh[128] @576."""
    n = dst.size // 4
    block, shift, table = (704, 32, _IQ5NL) if fifth else (576, 16, _IQ4K)
    for b in range(n // 256):
        o = block * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                dl1 = d * np.float32(_scale6(src, o + 16, 8 * ib + k))
                dl2 = d * np.float32(_scale6(src, o + 16, 8 * ib + k + 4))
                v1 = shift * ((np.int32(src[o + 8 + k]) >> ib) & 1)
                v2 = shift * ((np.int32(src[o + 12 + k]) >> ib) & 1)
                qh = o + 576 + 16 * ib + 4 * k if fifth else -1
                _r4_nibbles(src, o + 64 + 64 * ib + 4 * k, qh, dst, k * n + 256 * b + 32 * ib, dl1, dl2, table, v1,
                            v2)


@njit(cache=True, inline="always")
def _dec_iqks_r4(src: np.ndarray, dst: np.ndarray, fifth: bool) -> None:
    """IQ4_KS_R4, or with fifth bits IQ5_KS_R4: the 4 rows' float32 scales @0, then per 256 columns: scales[32] @0,
    qs[512] @32, and for IQ5 qh[128] @544."""
    n = dst.size // 4
    block, shift, table = (672, 32, _IQ5NL) if fifth else (544, 16, _IQ4K)
    for b in range(n // 256):
        o = 16 + block * b
        for k in range(4):
            d = _f32_at(src, 4 * k)
            for ib in range(8):
                s = np.int32(src[o + 4 * ib + k])
                dl = d * np.float32((s & 254) - 127)
                v = shift * (s & 1)
                qh = o + 544 + 16 * ib + 4 * k if fifth else -1
                _r4_nibbles(src, o + 32 + 64 * ib + 4 * k, qh, dst, k * n + 256 * b + 32 * ib, dl, dl, table, v, v)


@njit(cache=True)
def _dec_q4_0_r8(src: np.ndarray, dst: np.ndarray) -> None:
    # per 32 columns: d[8] @0, qs[128] @16; row k's values 4l + i and 4l + i + 16 are qs[32l + 4k + i]'s nibbles.
    n = dst.size // 8
    for b in range(n // 32):
        o = 144 * b
        for k in range(8):
            d = _f16_at(src, o + 2 * k)
            y = k * n + 32 * b
            for l in range(4):
                for i in range(4):
                    c = np.int32(src[o + 16 + 32 * l + 4 * k + i])
                    dst[y + 4 * l + i] = d * np.float32((c & 15) - 8)
                    dst[y + 4 * l + i + 16] = d * np.float32((c >> 4) - 8)


@njit(cache=True)
def _dec_iq4_nl_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 32 columns: d[4] @0, qs[64] @8, the _R4_PART / _R4_AT nibble layout with one scale per block.
    n = dst.size // 4
    for b in range(n // 32):
        o = 72 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            _r4_nibbles(src, o + 8 + 4 * k, -1, dst, k * n + 32 * b, d, d, _IQ4K, 0, 0)


@njit(cache=True)
def _dec_q5_0_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 32 columns: d[4] @0, qh[16] @8, qs[64] @24; part l's nibbles take 5th bits l and l + 4 of qh[4k + i].
    n = dst.size // 4
    for b in range(n // 32):
        o = 88 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            m = np.float32(-16.0) * d
            y = k * n + 32 * b
            for l in range(4):
                at = 16 * (l % 2) + 4 * (l // 2)
                for i in range(4):
                    c = np.int32(src[o + 24 + 4 * k + i + 16 * l])
                    h = np.int32(src[o + 8 + 4 * k + i])
                    dst[y + i + at] = _fma(d, np.float32((c & 15) | (((h >> l) & 1) << 4)), m)  # d * q + m, fused
                    dst[y + i + at + 8] = _fma(d, np.float32((c >> 4) | (((h >> (l + 4)) & 1) << 4)), m)


@njit(cache=True)
def _dec_q6_0_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 32 columns: d[4] @0, qh[32] @8, qs[64] @40; part l's bits 5-6 come from qh[4k + i + 16 (l % 2)].
    n = dst.size // 4
    for b in range(n // 32):
        o = 104 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            m = np.float32(-32.0) * d
            y = k * n + 32 * b
            for l in range(4):
                at = 16 * (l % 2) + 4 * (l // 2)
                for i in range(4):
                    c = np.int32(src[o + 40 + 4 * k + i + 16 * l])
                    h = np.int32(src[o + 8 + 4 * k + i + 16 * (l % 2)])
                    s = 2 * (l // 2)
                    dst[y + i + at] = _fma(d, np.float32((c & 15) | (((h >> s) & 3) << 4)), m)
                    dst[y + i + at + 8] = _fma(d, np.float32((c >> 4) | (((h >> (s + 4)) & 3) << 4)), m)


@njit(cache=True)
def _dec_q2_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, dmin[4] @8, scales[64] @16 (4-bit scale | 4-bit min), qs[256] @80.
    n = dst.size // 4
    for b in range(n // 256):
        o = 336 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            m = _f16_at(src, o + 8 + 2 * k)
            for ib in range(8):
                s1, s2 = np.int32(src[o + 16 + 8 * ib + k]), np.int32(src[o + 20 + 8 * ib + k])
                dl1, ml1 = d * np.float32(s1 & 15), m * np.float32(s1 >> 4)
                dl2, ml2 = d * np.float32(s2 & 15), m * np.float32(s2 >> 4)
                y = k * n + 256 * b + 32 * ib
                q = o + 80 + 32 * ib + 4 * k
                for i in range(4):
                    c1, c2 = np.int32(src[q + i]), np.int32(src[q + i + 16])
                    for s in range(4):
                        dst[y + i + 4 * s] = _fma(dl1, np.float32((c1 >> (2 * s)) & 3), -ml1)
                        dst[y + i + 16 + 4 * s] = _fma(dl2, np.float32((c2 >> (2 * s)) & 3), -ml2)


@njit(cache=True)
def _dec_q3_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, scales_h[16] @8, scales_l[32] @24, qh[128] @56, qs[256] @184.
    n = dst.size // 4
    for b in range(n // 256):
        o = 440 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                dl1 = d * np.float32(_scale6(src, o + 8, 8 * ib + k))
                dl2 = d * np.float32(_scale6(src, o + 8, 8 * ib + k + 4))
                y = k * n + 256 * b + 32 * ib
                q = o + 184 + 32 * ib + 4 * k
                qh = o + 56 + 16 * ib + 4 * k
                for i in range(4):
                    c1, c2, h = np.int32(src[q + i]), np.int32(src[q + i + 16]), np.int32(src[qh + i])
                    for s in range(4):
                        dst[y + i + 4 * s] = dl1 * np.float32((((c1 >> (2 * s)) & 3) | (((h >> s) & 1) << 2)) - 4)
                        dst[y + i + 16 + 4 * s] = dl2 * np.float32((((c2 >> (2 * s)) & 3)
                                                                    | (((h >> (s + 4)) & 1) << 2)) - 4)


@njit(cache=True)
def _dec_q5_k_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, dmin[4] @8, scales_h[16] @16, scales_l[32] @32, qh[128] @64, qs[512] @192.
    n = dst.size // 4
    for b in range(n // 256):
        o = 704 * b
        for k in range(4):
            for ib in range(8):
                dl, ml = _k4_r4_scale_min(src, o, k, ib)
                y = k * n + 256 * b + 32 * ib
                q = o + 192 + 64 * ib + 4 * k
                qh = o + 64 + 16 * ib + 4 * k
                for i in range(4):
                    h = np.int32(src[qh + i])
                    for p in range(4):
                        c = np.int32(src[q + i + _R4_PART[p]])
                        hb = _Q5K_R4_QH[p]  # unlike IQ5_K_R4, qs parts 16 and 32 take qh bits 4-5 and 2-3
                        lo = (c & 15) | (((h >> hb) & 1) << 4)
                        hi = (c >> 4) | (((h >> (hb + 1)) & 1) << 4)
                        dst[y + i + _R4_AT[p]] = _fma(dl, np.float32(lo), -ml)  # dl * q - ml, fused
                        dst[y + i + _R4_AT[p] + 8] = _fma(dl, np.float32(hi), -ml)


@njit(cache=True)
def _dec_q8_kv_r8(src: np.ndarray, dst: np.ndarray) -> None:
    # the 8 rows' float32 scales @0, int8 codes @32: per 16 columns 128 bytes, row k's values 4l + i at
    # 32l + 4k + i.
    n = dst.size // 8
    for b in range(n // 16):
        o = 32 + 128 * b
        for k in range(8):
            d = _f32_at(src, 4 * k)
            for l in range(4):
                for i in range(4):
                    dst[k * n + 16 * b + 4 * l + i] = d * _i8(src[o + 32 * l + 4 * k + i])


@njit(cache=True)
def _dec_bf16_r16(src: np.ndarray, dst: np.ndarray) -> None:
    # 16 rows of bf16 values, per 2 columns 64 bytes: row k's 2 values at bytes 4k .. 4k + 3. One row at a time:
    # writing the 16 rows side by side is ~10x slower.
    n = dst.size // 16
    for k in range(16):
        for b in range(n // 2):
            o = 64 * b + 4 * k
            y = k * n + 2 * b
            dst[y] = _bits_to_f32((np.uint32(src[o]) << np.uint32(16)) | (np.uint32(src[o + 1]) << np.uint32(24)))
            dst[y + 1] = _bits_to_f32((np.uint32(src[o + 2]) << np.uint32(16))
                                      | (np.uint32(src[o + 3]) << np.uint32(24)))


@njit(cache=True)
def decode_ik(qtype: int, src: np.ndarray, dst: np.ndarray) -> None:
    """Decode one unit (a row with its header, or an interleaved group) of an ik_llama.cpp type."""
    if qtype == IQ4_KS:
        _dec_iq4_ks(src, dst)
    elif qtype == IQ2_K:
        _dec_iq2_k(src, dst)
    elif qtype == IQ3_K:
        _dec_iq3_k(src, dst)
    elif qtype == IQ4_K:
        _dec_iq4_k(src, dst)
    elif qtype == IQ5_K:
        _dec_iq5_k(src, dst)
    elif qtype == IQ6_K:
        _dec_iq6_k(src, dst)
    elif qtype == Q6_0:
        _dec_q6_0(src, dst)
    elif qtype == IQ2_KS:
        _dec_iq2_ks(src, dst)
    elif qtype == IQ5_KS:
        _dec_iq5_ks(src, dst)
    elif qtype == IQ4_KSS:
        _dec_iq4_kss(src, dst)
    elif qtype == IQ3_KS:
        _dec_iq3_ks(src, dst)
    elif qtype == IQ2_KL:
        _dec_iq2_kl(src, dst)
    elif qtype == Q8_KV:
        _dec_q8_kv(src, dst)
    elif qtype == IQ2_KT:
        _dec_iq2_kt(src, dst)
    elif qtype == IQ3_KT:
        _dec_iq3_kt(src, dst)
    elif qtype == IQ4_KT:
        _dec_iq4_kt(src, dst)
    elif qtype == IQ1_KT:
        _dec_iq1_kt(src, dst)
    elif qtype == Q8_0_R8:
        _dec_q8_0_r8(src, dst)
    elif qtype == Q4_K_R4:
        _dec_q4_k_r4(src, dst)
    elif qtype == Q6_K_R4:
        _dec_q6_k_r4(src, dst)
    elif qtype == IQ4_XS_R8:
        _dec_iq4_xs_r8(src, dst)
    elif qtype == IQ4_K_R4:
        _dec_iqk_r4(src, dst, False)
    elif qtype == IQ2_K_R4:
        _dec_iq2_k_r4(src, dst)
    elif qtype == IQ3_K_R4:
        _dec_iq3_k_r4(src, dst)
    elif qtype == IQ5_K_R4:
        _dec_iqk_r4(src, dst, True)
    elif qtype == IQ4_KS_R4:
        _dec_iqks_r4(src, dst, False)
    elif qtype == IQ5_KS_R4:
        _dec_iqks_r4(src, dst, True)
    elif qtype == Q4_0_R8:
        _dec_q4_0_r8(src, dst)
    elif qtype == IQ4_NL_R4:
        _dec_iq4_nl_r4(src, dst)
    elif qtype == Q5_0_R4:
        _dec_q5_0_r4(src, dst)
    elif qtype == Q6_0_R4:
        _dec_q6_0_r4(src, dst)
    elif qtype == Q2_K_R4:
        _dec_q2_k_r4(src, dst)
    elif qtype == Q3_K_R4:
        _dec_q3_k_r4(src, dst)
    elif qtype == Q5_K_R4:
        _dec_q5_k_r4(src, dst)
    elif qtype == IQ2_XXS_R4:
        _dec_iq2_xxs_r4(src, dst)
    elif qtype == IQ2_XS_R4:
        _dec_iq2_xs_r4(src, dst)
    elif qtype == IQ2_S_R4:
        _dec_iq2_s_r4(src, dst)
    elif qtype == IQ3_XXS_R4:
        _dec_iq3_xxs_r4(src, dst)
    elif qtype == IQ3_S_R4:
        _dec_iq3_s_r4(src, dst)
    elif qtype == IQ1_S_R4:
        _dec_iq1_s_r4(src, dst)
    elif qtype == IQ1_M_R4:
        _dec_iq1_m_r4(src, dst)
    elif qtype == Q8_KV_R8:
        _dec_q8_kv_r8(src, dst)
    elif qtype == BF16_R16:
        _dec_bf16_r16(src, dst)


# The ik_llama.cpp types decode_ik decodes.
IK_DECODED = frozenset({Q6_0, IQ2_K, IQ3_K, IQ4_K, IQ5_K, IQ6_K, IQ4_KS, IQ2_KS, IQ4_KSS, IQ5_KS, IQ3_KS, IQ2_KL, Q8_KV,
                        Q8_0_R8, Q4_K_R4, Q6_K_R4, IQ4_XS_R8, IQ4_K_R4, IQ2_K_R4, IQ3_K_R4, IQ5_K_R4, IQ4_KS_R4,
                        IQ5_KS_R4, IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT, Q4_0_R8, IQ4_NL_R4, Q5_0_R4, Q6_0_R4, Q2_K_R4,
                        Q3_K_R4, Q5_K_R4, IQ2_XXS_R4, IQ2_XS_R4, IQ2_S_R4, IQ3_XXS_R4, IQ3_S_R4, IQ1_S_R4,
                        IQ1_M_R4, Q8_KV_R8, BF16_R16})

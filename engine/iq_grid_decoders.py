"""Decoders for ik_llama.cpp's row-interleaved lattice i-quants (IQ2_XXS_R4 ... IQ1_M_R4), bit-identical to its
`dequantize_row_*_r4` (ggml/src/iqk/iqk_quantize.cpp), called through engine.ik_decoders.decode_ik.

Legend: n values per row, 4 rows per group. src = one group's bytes (4 * row bytes), dst = the 4 rows one after
another. Each 8 (IQ2, IQ1) or 4 (IQ3) values come from one grid entry (engine.iq_grids) times a scale, signs from
separate bits. The expressions follow ik_llama.cpp's in float32 (a product per value, no sums to fuse; its
multiply by -1 for a sign is an exact negation, written here as one).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.iq_grids import IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID
from engine.simd import _f16_at

_IQ1_DELTA = np.float32(0.125)  # IQ1S_DELTA / IQ1M_DELTA: the grid shift, +-1/8


@njit(cache=True, inline="always")
def _u16(src: np.ndarray, o: int) -> int:
    return np.int64(src[o]) | (np.int64(src[o + 1]) << 8)


@njit(cache=True, inline="always")
def _scale_and_signs(src: np.ndarray, o: int) -> tuple[int, int]:
    """IQ2_XXS_R4 / IQ3_XXS_R4 `sas` word at o: bit 0 of each byte is one of the 4-bit scale's bits; bits 1-7 hold
    the sign bits in a form whose xor with itself shifted right by one gives a sign per value (repack_iq2_xxs)."""
    w = _u16(src, o) | (_u16(src, o + 2) << 16)
    scale = (w & 1) | ((w >> 7) & 2) | ((w >> 14) & 4) | ((w >> 21) & 8)
    w &= 0xFEFEFEFE
    return scale, w ^ (w >> 1)


@njit(cache=True, inline="always")
def _dec_xxs_r4(src: np.ndarray, dst: np.ndarray, grid: np.ndarray, nbytes: int, dmul: np.float32) -> None:
    # IQ2_XXS_R4 (8-value grid entries, 264 bytes) and IQ3_XXS_R4 (4-value, 392 bytes): per 256 columns: d[4] @0,
    # sas[128] @8 (a 32-bit word of scale and sign bits per row and 32 columns), qs @136 (grid indices).
    width = grid.shape[1]
    per = 32 // width  # grid entries per row and 32 columns
    n = dst.size // 4
    for b in range(n // 256):
        o = nbytes * b
        for k in range(4):
            d = dmul * _f16_at(src, o + 2 * k)
            for ib in range(8):
                scale, signs = _scale_and_signs(src, o + 8 + 4 * (4 * ib + k))
                dl = d * np.float32(2 * scale + 1)
                y = k * n + 256 * b + 32 * ib
                for i in range(per):
                    g = np.int64(src[o + 136 + 4 * per * ib + per * k + i])
                    for j in range(width):
                        v = dl * np.float32(grid[g, j])
                        dst[y + width * i + j] = -v if (signs >> (width * i + j)) & 1 else v


@njit(cache=True)
def _dec_iq2_xxs_r4(src: np.ndarray, dst: np.ndarray) -> None:
    _dec_xxs_r4(src, dst, IQ2XXS_GRID, 264, np.float32(0.125))


@njit(cache=True)
def _dec_iq2_xs_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, qs uint16[128] @8 (9-bit grid index, 7 sign bits), scales[32] @264.
    n = dst.size // 4
    for b in range(n // 256):
        o = 296 * b
        for k in range(4):
            d = np.float32(0.125) * _f16_at(src, o + 2 * k)
            for ib in range(8):
                sc = np.int64(src[o + 264 + 4 * ib + k])
                dl1 = d * np.float32(2 * (sc & 15) + 1)
                dl2 = d * np.float32(2 * (sc >> 4) + 1)
                y = k * n + 256 * b + 32 * ib
                for i in range(4):
                    q = _u16(src, o + 8 + 2 * (16 * ib + 4 * k + i))
                    signs = q >> 9
                    signs ^= signs << 1
                    dl = dl1 if i < 2 else dl2
                    for j in range(8):
                        v = dl * np.float32(IQ2XS_GRID[q & 511, j])
                        dst[y + 8 * i + j] = -v if (signs >> j) & 1 else v


@njit(cache=True)
def _dec_iq2_s_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, qs[128] @8 (low 8 index bits), qh[32] @136 (2 high bits per 8 values),
    # signs[128] @168, scales[32] @296.
    n = dst.size // 4
    for b in range(n // 256):
        o = 328 * b
        for k in range(4):
            d = np.float32(0.125) * _f16_at(src, o + 2 * k)
            for ib in range(8):
                sc = np.int64(src[o + 296 + 4 * ib + k])
                dl1 = d * np.float32(2 * (sc & 15) + 1)
                dl2 = d * np.float32(2 * (sc >> 4) + 1)
                qh = np.int64(src[o + 136 + 4 * ib + k])
                y = k * n + 256 * b + 32 * ib
                for i in range(4):
                    at = 16 * ib + 4 * k + i
                    g = np.int64(src[o + 8 + at]) | ((qh << (8 - 2 * i)) & 0x300)
                    signs = np.int64(src[o + 168 + at])
                    dl = dl1 if i < 2 else dl2
                    for j in range(8):
                        v = dl * np.float32(IQ2S_GRID[g, j])
                        dst[y + 8 * i + j] = -v if (signs >> j) & 1 else v


@njit(cache=True)
def _dec_iq3_xxs_r4(src: np.ndarray, dst: np.ndarray) -> None:
    _dec_xxs_r4(src, dst, IQ3XXS_GRID, 392, np.float32(0.25))


@njit(cache=True)
def _dec_iq3_s_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # per 256 columns: d[4] @0, qs[256] @8, qh[32] @264 (9th index bits), signs[128] @296, scales[16] @424
    # (4 bits per row and 32 columns: scale l = 4 ib + k is nibble l // 16 of byte l % 16).
    n = dst.size // 4
    for b in range(n // 256):
        o = 440 * b
        for k in range(4):
            d = _f16_at(src, o + 2 * k)
            for ib in range(8):
                s = 4 * ib + k
                dl = d * np.float32(1 + 2 * ((np.int64(src[o + 424 + s % 16]) >> (4 * (s // 16))) & 15))
                qh = np.int64(src[o + 264 + 4 * ib + k])
                y = k * n + 256 * b + 32 * ib
                for i in range(4):
                    g1 = np.int64(src[o + 8 + 32 * ib + k + 8 * i]) + ((qh << (8 - i)) & 0x100)
                    g2 = np.int64(src[o + 8 + 32 * ib + k + 8 * i + 4]) + ((qh << (4 - i)) & 0x100)
                    for j in range(4):
                        signs = np.int64(src[o + 296 + 16 * ib + 4 * k + j])
                        v1 = dl * np.float32(IQ3S_GRID[g1, j])
                        v2 = dl * np.float32(IQ3S_GRID[g2, j])
                        dst[y + 4 * i + j] = -v1 if (signs >> i) & 1 else v1
                        dst[y + 4 * i + 16 + j] = -v2 if (signs >> (i + 4)) & 1 else v2


@njit(cache=True)
def _dec_iq1_s_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # the 4 rows' f16 scales @0, then per 32 columns: qs[16] @0 (low 8 index bits), qh uint16[4] @16 (per row:
    # 3 high bits per 8 values, a 3-bit scale @12, the shift's sign @15).
    n = dst.size // 4
    for b in range(n // 32):
        o = 8 + 24 * b
        for k in range(4):
            qh = _u16(src, o + 16 + 2 * k)
            shift = -_IQ1_DELTA if qh & 0x8000 else _IQ1_DELTA
            dl = _f16_at(src, 2 * k) * np.float32(2 * ((qh >> 12) & 7) + 1)
            y = k * n + 32 * b
            for i in range(4):
                g = np.int64(src[o + 4 * i + k]) | (((qh >> (3 * i)) & 7) << 8)
                for j in range(8):
                    dst[y + 8 * i + j] = dl * (np.float32(IQ1S_GRID[g, j]) + shift)


@njit(cache=True)
def _dec_iq1_m_r4(src: np.ndarray, dst: np.ndarray) -> None:
    # the 4 rows' f16 scales @0, then per 32 columns: qs[16] @0, qh[8] @16 (per row and 16 values: 3 high index
    # bits and the shift's sign for each 8), scales[4] @24 (per row: a 4-bit scale per 16 values).
    n = dst.size // 4
    for b in range(n // 32):
        o = 8 + 28 * b
        for k in range(4):
            d = _f16_at(src, 2 * k)
            sc = np.int64(src[o + 24 + k])
            y = k * n + 32 * b
            for i in range(2):
                dl = d * np.float32((sc >> (4 * i)) & 15)
                qh = np.int64(src[o + 16 + 4 * i + k])
                g1 = np.int64(src[o + 8 * i + k]) | ((qh & 0x07) << 8)
                g2 = np.int64(src[o + 8 * i + k + 4]) | ((qh & 0x70) << 4)
                delta1 = -_IQ1_DELTA if qh & 0x08 else _IQ1_DELTA
                delta2 = -_IQ1_DELTA if qh & 0x80 else _IQ1_DELTA
                for j in range(8):
                    dst[y + 16 * i + j] = dl * (np.float32(IQ1S_GRID[g1, j]) + delta1)
                    dst[y + 16 * i + 8 + j] = dl * (np.float32(IQ1S_GRID[g2, j]) + delta2)

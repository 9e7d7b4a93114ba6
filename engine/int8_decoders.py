"""Row decoders to integer codes (numba): one row's bytes -> uint8 codes q and per-lane float scales a, b.

Legend: B blocks per row, QK values per block, a group = 16 values. Value v = a[v // 16] * q[v] + b[v // 16] equals
engine.block_decoders' float32 value up to the rounding of that product (exactly where a and b are products of
the block's scales). The layouts and the bit positions are those of engine.block_decoders, line for line.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.block_decoders import (
    IQ4_NL,
    IQ4_XS,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
)
from engine.simd import _f16_at
from engine.simd_int8 import _unpack16_u8_iq4, _unpack32_u8

# The types with integer codes under affine block scales (everything but the float types).
INT8_TYPES = frozenset({Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS})


@njit(cache=True, inline="always")
def _groups(a: np.ndarray, b: np.ndarray, v0: int, n: int, av: np.float32, bv: np.float32) -> None:
    """Scales of the n values from value v0 (n, v0 multiples of 16)."""
    for g in range(v0 // 16, (v0 + n) // 16):
        a[g] = av
        b[g] = bv


@njit(cache=True, inline="always")
def _idec_iq4_nl(src, q, a, b) -> None:
    for blk in range(len(src) // 18):
        o = 18 * blk
        d = _f16_at(src, o)
        _unpack16_u8_iq4(q, 32 * blk, src, o + 2, 0)
        _unpack16_u8_iq4(q, 32 * blk + 16, src, o + 2, 4)
        _groups(a, b, 32 * blk, 32, d, np.float32(-128.0) * d)


@njit(cache=True, inline="always")
def _idec_q2_k(src, q, a, b) -> None:
    for blk in range(len(src) // 84):
        o = 84 * blk
        d = _f16_at(src, o + 80)
        dmin = _f16_at(src, o + 82)
        for h in range(2):
            for s in range(4):
                base = 256 * blk + 128 * h + 32 * s
                _unpack32_u8(q, base, src, o + 16 + 32 * h, 2 * s, 3, o, 0, 0, 0, 0)
                for half in range(2):
                    sc = np.int32(src[o + 8 * h + 2 * s + half])
                    _groups(a, b, base + 16 * half, 16, d * np.float32(sc & 15), -(dmin * np.float32(sc >> 4)))


@njit(cache=True, inline="always")
def _idec_q3_k(src, q, a, b) -> None:
    for blk in range(len(src) // 110):
        o = 110 * blk
        d = _f16_at(src, o + 108)
        for h in range(2):
            for s in range(4):
                base = 256 * blk + 128 * h + 32 * s
                _unpack32_u8(q, base, src, o + 32 + 32 * h, 2 * s, 3, o, 4 * h + s, 1, 2, 0)
                for half in range(2):
                    j = 8 * h + 2 * s + half
                    lo = (np.int32(src[o + 96 + (j & 7)]) >> (4 * (j >> 3))) & 15
                    hi = (np.int32(src[o + 104 + (j & 3)]) >> (2 * (j >> 2))) & 3
                    av = d * np.float32((lo | (hi << 4)) - 32)
                    _groups(a, b, base + 16 * half, 16, av, np.float32(-4.0) * av)


@njit(cache=True, inline="always")
def _idec_iq4_xs(src, q, a, b) -> None:
    for blk in range(len(src) // 136):
        o = 136 * blk
        d = _f16_at(src, o)
        sh = np.int32(src[o + 2]) | (np.int32(src[o + 3]) << 8)
        for ib in range(8):
            ls = ((np.int32(src[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            av = d * np.float32(ls - 32)
            _unpack16_u8_iq4(q, 256 * blk + 32 * ib, src, o + 8 + 16 * ib, 0)
            _unpack16_u8_iq4(q, 256 * blk + 32 * ib + 16, src, o + 8 + 16 * ib, 4)
            _groups(a, b, 256 * blk + 32 * ib, 32, av, np.float32(-128.0) * av)


@njit(cache=True, inline="always")
def idecode_row(qtype: int, src: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Codes and lane scales of one row (or a run of whole blocks of it) of any type in INT8_TYPES but those with
    a kernel in engine.block_dots (which never come here)."""
    if qtype == IQ4_NL:
        _idec_iq4_nl(src, q, a, b)
    elif qtype == IQ4_XS:
        _idec_iq4_xs(src, q, a, b)
    elif qtype == Q2_K:
        _idec_q2_k(src, q, a, b)
    elif qtype == Q3_K:
        _idec_q3_k(src, q, a, b)

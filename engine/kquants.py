"""NumPy quantizers for the K-quant types gguf cannot write (Q4_K, Q5_K, Q6_K), vectorised over blocks.

Legend: N sub-blocks, B super-blocks of QK_K = 256 values, L integer levels. Each quantizer follows
llama.cpp's reference scheme (ggml-quants.c `quantize_row_q{4,5,6}_K_ref`): fit every sub-block with a small
search over grid scales plus a least-squares refit, store the sub-block scales (and mins) as 6/8-bit integers
under f16 super-scales, then re-round the values against the stored scales. Blocks decode with
`gguf.quants.dequantize`; they are close to llama.cpp's but not bit-identical (unweighted fits, fewer steps).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

QK_K = 256
# Values quantized per step: bounds the float32 scratch (a few dozen MiB) for any tensor size.
_CHUNK_VALUES = 1 << 20
# Grid-scale offsets tried per sub-block, in levels (llama.cpp tries 21; 7 lose under 0.5% RMS).
_AFFINE_SEARCH = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
_SYMMETRIC_SEARCH = np.linspace(-0.9, 0.9, 7, dtype=np.float32)


def _qtype_name(qtype: str | int) -> str:
    if isinstance(qtype, str):
        return qtype.upper()
    return gguf.GGMLQuantizationType(qtype).name


def supported() -> tuple[str, ...]:
    """Names of the types `quantize` writes."""
    return tuple(_ENCODERS)


def quantize(array: np.ndarray, qtype: str | int) -> np.ndarray:
    """Encode floats [..., C] (C a multiple of 256) as K-quant blocks: uint8 [..., C / 256 * block bytes]."""
    name = _qtype_name(qtype)
    if name not in _ENCODERS:
        raise ValueError(f"kquants cannot write {name}; it writes {', '.join(_ENCODERS)}")
    encode, type_bytes = _ENCODERS[name]
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ValueError(f"{name} needs rows that are a multiple of {QK_K} values, got shape {a.shape}")
    cols = a.shape[-1]
    rows = a.reshape(-1, cols)
    row_bytes = cols // QK_K * type_bytes
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // cols)
    for r0 in range(0, rows.shape[0], step):
        blocks = rows[r0 : r0 + step].reshape(-1, QK_K)  # [B, 256]
        out[r0 : r0 + step] = encode(blocks).reshape(-1, row_bytes)
    return out.reshape(*a.shape[:-1], row_bytes)


# ---- sub-block fits ----------------------------------------------------------------------------------------


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def fit_affine(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale s ≥ 0 and offset m ≤ 0 per row of x [N, n] so that x ≈ s·L + m with L in 0..nmax.

    For each grid scale the levels are rounded, then (s, m) is the least-squares refit with m clamped to ≤ 0
    (Q4_K/Q5_K store −m as a min ≥ 0); the refit with the smallest squared error wins.
    """
    n = np.float32(x.shape[1])
    lo = np.minimum(x.min(1), 0)
    span = x.max(1) - lo
    span_safe = np.where(span > 0, span, 1)
    sx, sx2 = x.sum(1), _dot(x, x)
    best_s, best_m = span / nmax, lo  # plain min/max; every search step must beat it
    best_err = np.full(len(x), np.inf, dtype=np.float32)
    for delta in _AFFINE_SEARCH:
        q = np.rint((x - lo[:, None]) * ((nmax + delta) / span_safe)[:, None])
        np.clip(q, 0, nmax, out=q)
        sl, sl2, sxl = q.sum(1), _dot(q, q), _dot(x, q)
        det = n * sl2 - sl * sl  # exact: the levels are small integers
        ok = det > 0
        safe = np.where(ok, det, 1)
        s = (n * sxl - sl * sx) / safe
        m = (sl2 * sx - sl * sxl) / safe
        pos = m > 0
        s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), s)
        m = np.where(pos, 0, m)
        # Σ(s·q + m − x)² expanded over the sums already at hand
        err = sx2 + s * s * sl2 + n * m * m + 2 * (s * m * sl - s * sxl - m * sx)
        better = ok & (s > 0) & (err < best_err)
        best_s, best_m = np.where(better, s, best_s), np.where(better, m, best_m)
        best_err = np.where(better, err, best_err)
    return best_s.astype(np.float32), best_m.astype(np.float32)


def fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Signed scale s per row of x [N, n] so that x ≈ s·L, L in −nmax..nmax−1 (llama.cpp make_qx_quants)."""
    vmax = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]
    inv = -1 / np.where(vmax != 0, vmax, 1)
    best_s = np.zeros(len(x), dtype=np.float32)
    best_score = np.full(len(x), -1.0, dtype=np.float32)
    for delta in _SYMMETRIC_SEARCH:
        # the largest |x| maps to −nmax: the asymmetric end of the range, so that value is nearly exact
        q = np.rint(x * ((nmax + delta) * inv)[:, None])
        np.clip(q, -nmax, nmax - 1, out=q)
        sxl, sl2 = _dot(x, q), _dot(q, q)
        sl2 = np.where(sl2 > 0, sl2, 1)
        score = sxl * sxl / sl2  # the squared error drops by this much with the least-squares scale
        better = score > best_score
        best_s = np.where(better, sxl / sl2, best_s)
        best_score = np.where(better, score, best_score)
    return np.where(vmax != 0, best_s, 0).astype(np.float32)


# ---- super-blocks ------------------------------------------------------------------------------------------


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative per-sub-block values [B, 8] as a f16 super-scale [B] and 6-bit integers [B, 8]."""
    d = (values.max(1) / 63).astype(np.float16)
    d32 = d.astype(np.float32)
    q = np.clip(np.rint(values / np.where(d32 > 0, d32, 1)[:, None]), 0, 63)
    return d, np.where(d32[:, None] > 0, q, 0).astype(np.uint8)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [B, 8] into Q4_K's 12 bytes (inverse of gguf's Q4_K.get_scale_min)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _affine_levels(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K core: d, dmin (f16 [B]), scales and mins (uint8 [B, 8]), levels (uint8 [B, 256])."""
    B = blocks.shape[0]
    x = blocks.reshape(B * 8, 32)
    s, m = fit_affine(x, nmax)
    d, sc = _six_bit(s.reshape(B, 8))
    dmin, mq = _six_bit(-m.reshape(B, 8))
    # re-round against the scales actually stored, as llama.cpp does
    eff_s = (d.astype(np.float32)[:, None] * sc).reshape(B * 8, 1)
    eff_m = (dmin.astype(np.float32)[:, None] * mq).reshape(B * 8, 1)
    q = np.clip(np.rint((x + eff_m) / np.where(eff_s > 0, eff_s, 1)), 0, nmax)
    q = np.where(eff_s > 0, q, 0).astype(np.uint8).reshape(B, QK_K)
    return d, dmin, _pack_scales(sc, mq), q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Levels [B, 256] as 128 bytes: chunk g holds sub-block 2g in low nibbles and 2g+1 in high nibbles."""
    r = (q & 15).reshape(-1, 4, 2, 32)
    return (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(-1, 128)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def encode_q4_k(blocks: np.ndarray) -> np.ndarray:
    """[B, 256] float32 -> [B, 144] uint8: d, dmin, 12 scale bytes, 128 nibble bytes."""
    d, dmin, scales, q = _affine_levels(blocks, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _nibbles(q)], axis=1)


def encode_q5_k(blocks: np.ndarray) -> np.ndarray:
    """[B, 256] float32 -> [B, 176] uint8: d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes."""
    d, dmin, scales, q = _affine_levels(blocks, 31)
    high = (q >> 4).reshape(-1, 8, 32)  # bit j of qh[l] is the 5th bit of value l of sub-block j
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qh, _nibbles(q)], axis=1)


def encode_q6_k(blocks: np.ndarray) -> np.ndarray:
    """[B, 256] float32 -> [B, 210] uint8: 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d."""
    B = blocks.shape[0]
    x = blocks.reshape(B * 16, 16)
    s = fit_symmetric(x, 32).reshape(B, 16)
    smax = np.take_along_axis(s, np.abs(s).argmax(1)[:, None], 1)[:, 0]
    iscale = np.where(smax != 0, -128 / np.where(smax != 0, smax, 1), 0)
    sc = np.clip(np.rint(iscale[:, None] * s), -128, 127).astype(np.int8)
    d = np.where(smax != 0, 1 / np.where(iscale != 0, iscale, 1), 0).astype(np.float16)
    eff = (d.astype(np.float32)[:, None] * sc).reshape(B * 16, 1)
    q = np.clip(np.rint(x / np.where(eff != 0, eff, 1)), -32, 31)
    q = (np.where(eff != 0, q, 0) + 32).astype(np.uint8).reshape(B, 2, 2, 2, 32)  # [B, half, nibble, 2, 32]
    low = q & 15
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(B, 128)  # byte h*64+p: values h*128+p and h*128+64+p
    top = (q >> 4).reshape(B, 2, 4, 32)  # [B, half, k, l]: value h*128 + 32k + l
    qh = np.bitwise_or.reduce(top << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([ql, qh.reshape(B, 64).astype(np.uint8), sc.view(np.uint8), _f16_bytes(d)], axis=1)


_ENCODERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    "Q4_K": (encode_q4_k, 144),
    "Q5_K": (encode_q5_k, 176),
    "Q6_K": (encode_q6_k, 210),
}

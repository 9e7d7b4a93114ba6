"""The reference for the integer-activation kernels: activations quantized by NumPy as engine.q8_activations
does (one scale per 32 values, 16-bit codes), the float64 values they stand for, and the tolerance."""

from __future__ import annotations

import numpy as np

RTOL = 2e-6


def q8_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [T, C] -> (the float64 values its codes stand for, high plane, low plane): per 32 values d = max|x| / 127,
    hi = rint(x / d), lo = rint(256 (x - d hi) / d) within +-127, value = d / 256 * (256 hi + lo)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), np.float32(0.0)).astype(np.float32)
    hi = np.rint(blocks * inv)
    lo = np.clip(np.rint((blocks - hi * d) * inv * np.float32(256.0)), -127, 127)
    assert np.abs(hi).max() <= 127
    value = (256 * hi.astype(np.float64) + lo) * (d / np.float32(256.0)).astype(np.float64)
    return value.reshape(x.shape), hi.reshape(x.shape), lo.reshape(x.shape)


def tokens(T: int, C: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, C)).astype(np.float32)
    x[:, :32] = 0.0  # an all-zero activation block: scale 0, no division by it
    x[:, 32:64] *= 1e3  # blocks of very different magnitudes
    return x


def rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())

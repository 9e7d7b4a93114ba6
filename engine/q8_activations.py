"""Activations as 16-bit integer codes for the integer dot products, one scale per 32 values.

Legend: T tokens, C columns (input features), Cp columns padded to a multiple of 64, a group = 16 values, a step =
64 values (one vector of weight codes in engine.simd_int8).
As llama.cpp's Q8_0, a block of 32 values gets d = max|x| / 127 and codes hi = rint(x / d); unlike it, the
remainder is quantized too, lo = rint((x - d * hi) * 256 / d), and the code is 256 * hi + lo (|code| < 2^15), so
x = (d / 256) * code to 2^-16 of the block's largest value. llama.cpp's 8-bit activations moved SmolLM2's
next-token distributions by a mean KL of 3e-3 from float32, these by ~1e-6 (tests/engine).
Per row: codes x16, int16, each step's 32 even-indexed values first, then its 32 odd-indexed ones (the order in
which engine.simd_int8 splits the weight codes), and per group xd = d / 256 and xs = xd * (sum of its codes),
the form engine.simd_int8's and engine.block_dots' kernels read. Padding carries zero codes and zero scales.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

BLOCK = 32  # values per activation scale
STEP = 64  # values per step of the integer dots, the unit of the code order


class Q8Rows(NamedTuple):
    x16: np.ndarray  # int16 [T, Cp], codes in step order
    xd: np.ndarray  # float32 [T, Cp / 16]
    xs: np.ndarray  # float32 [T, Cp / 16]


@njit(cache=True, inline="always")
def position(i: int) -> int:
    """Where value i of a row sits in x16: its step, then even values before odd ones."""
    return i - i % STEP + (i % 2) * (STEP // 2) + (i % STEP) // 2


@njit(cache=True)
def _quantize(x: np.ndarray, x16: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    T, C = x.shape
    for t in range(T):
        for b0 in range(0, C, BLOCK):
            amax = np.float32(0.0)
            for i in range(b0, b0 + BLOCK):
                amax = max(amax, abs(x[t, i]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for g in range(b0 // 16, (b0 + BLOCK) // 16):
                s = 0
                for i in range(16 * g, 16 * g + 16):
                    hi = np.int32(np.rint(x[t, i] * inv))
                    lo = np.int32(np.rint((x[t, i] - np.float32(hi) * d) * inv * np.float32(256.0)))
                    lo = min(max(lo, -127), 127)
                    x16[t, position(i)] = 256 * hi + lo
                    s += 256 * hi + lo
                xd[t, g] = d / np.float32(256.0)
                xs[t, g] = xd[t, g] * np.float32(s)


@njit(cache=True)
def padded(columns: int) -> int:
    """Columns rounded up to the 64 values of one integer dot step."""
    return -(-columns // 64) * 64


@njit(cache=True, nogil=True)
def quantized(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_rows for compiled callers (the kernels quantize their input themselves: the arrays made in
    Python cost more than the quantization); C must be a multiple of 32."""
    T, C = x.shape
    cp = padded(C)
    x16 = np.zeros((T, cp), np.int16)
    xd, xs = np.zeros((T, cp // 16), np.float32), np.zeros((T, cp // 16), np.float32)
    _quantize(x, x16, xd, xs)
    return x16, xd, xs


def quantize_rows(x: np.ndarray) -> Q8Rows:
    """x [T, C] float32 (C a multiple of 32) -> its 16-bit codes (in step order) and group scales."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] % BLOCK:
        raise ValueError(f"{x.shape[1]} columns is not a multiple of the {BLOCK}-value activation block")
    return Q8Rows(*quantized(x))

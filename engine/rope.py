"""Rotary position embedding as llama.cpp applies it (NORM type: adjacent pairs), with linear and YaRN scaling.

Legend: T tokens, P = n_rot / 2 rotated pairs.
"""

from __future__ import annotations

import math

import numpy as np

from engine.config import RopeConfig
from engine.ops import array_module


def _yarn_corr_dim(n_rot: int, n_ctx_orig: int, n_rotations: float, base: float) -> float:
    return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_angles(cfg: RopeConfig, positions: np.ndarray) -> np.ndarray:
    """Angles theta [T, P] in float64 for absolute positions (ggml's rope_yarn, ext_factor 1 for YaRN)."""
    i = np.arange(cfg.n_rot // 2, dtype=np.float64)
    theta_ext = np.asarray(positions, dtype=np.float64)[:, None] * cfg.freq_base ** (-2.0 * i / cfg.n_rot)
    if cfg.scaling_type == "linear":
        return theta_ext / cfg.factor
    if not cfg.is_yarn:
        return theta_ext
    theta_int = theta_ext / cfg.factor
    lo = max(0.0, math.floor(_yarn_corr_dim(cfg.n_rot, cfg.orig_ctx, cfg.beta_fast, cfg.freq_base)))
    hi = min(cfg.n_rot - 1.0, math.ceil(_yarn_corr_dim(cfg.n_rot, cfg.orig_ctx, cfg.beta_slow, cfg.freq_base)))
    keep = 1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)  # 1 = original frequency
    return theta_int * (1.0 - keep) + theta_ext * keep


TABLE_POSITIONS = 4096  # cos/sin kept for positions below this; later ones are computed per call
MEMO_TOKENS = 64  # the last call's cos/sin beyond the table are kept when this short (every layer asks again)


def table_bytes(n_rot: int, n_ctx: int) -> int:
    """The most a RopeTable keeps for a context of n_ctx positions: what a worker charges for it."""
    return 4 * n_rot * (min(TABLE_POSITIONS, max(64, 2 * n_ctx)) + MEMO_TOKENS)


class RopeTable:
    """cos/sin per position: a table grown to the largest position seen up to TABLE_POSITIONS (a peer picks the
    positions of a worker's runs, so the table must not grow with them), computed per call beyond."""

    def __init__(self, cfg: RopeConfig) -> None:
        self.cfg = cfg
        self._cos = np.zeros((0, cfg.n_rot // 2), np.float32)
        self._sin = self._cos
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # positions, cos, sin

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions)
        need = int(np.max(positions)) + 1 if len(positions) else 0
        if need > TABLE_POSITIONS:
            return self._computed(positions)
        if need > len(self._cos):
            self._cos, self._sin = self._table(np.arange(min(max(need, 2 * len(self._cos), 64), TABLE_POSITIONS)))
        return self._cos[positions], self._sin[positions]

    def _computed(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        last = self._last
        if last is not None and np.array_equal(last[0], positions):
            return last[1], last[2]
        cos, sin = self._table(positions)
        if len(positions) <= MEMO_TOKENS:
            self._last = (positions.copy(), cos, sin)
        return cos, sin

    def _table(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = rope_angles(self.cfg, positions)
        m = self.cfg.magnitude
        return (m * np.cos(theta)).astype(np.float32), (m * np.sin(theta)).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[2i], x[2i+1]) of the last axis. x [T, ..., n_rot]; cos/sin [T, P] (NumPy or CuPy, alike)."""
    shape = x.shape
    pairs = x.reshape(shape[0], -1, shape[-1] // 2, 2)  # [T, *, P, 2]
    c = cos[:, None, :]
    s = sin[:, None, :]
    x0 = pairs[..., 0]
    x1 = pairs[..., 1]
    out = array_module(x).empty_like(pairs)
    out[..., 0] = x0 * c - x1 * s
    out[..., 1] = x0 * s + x1 * c
    return out.reshape(shape)

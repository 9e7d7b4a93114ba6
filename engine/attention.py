"""Causal softmax attention over cached keys, computed in query chunks so scratch memory stays bounded.

Legend: T queries, S keys, H heads, D key width, V value width.
"""

from __future__ import annotations

import numpy as np

from engine.ops import array_module


def _chunk_rows(n_heads: int, n_keys: int, max_bytes: int) -> int:
    """Queries per chunk so that one [H, Tc, S] float32 score block fits max_bytes (like -amb)."""
    return max(1, max_bytes // max(1, 4 * n_heads * n_keys))


def causal_attention(
    q: np.ndarray,  # [T, H, D]
    k: np.ndarray,  # [S, H, D] per-head keys, or [S, D] one key head shared by all heads (MQA)
    v: np.ndarray,  # [S, H, V] or [S, V]
    q_pos: np.ndarray,  # [T] absolute positions
    scale: float,
    max_bytes: int = 256 << 20,
) -> np.ndarray:  # [T, H, V]
    """softmax(scale * q.k + causal mask) @ v; key s sits at absolute position s. NumPy or CuPy arrays (q_pos on
    the host either way)."""
    xp = array_module(q)
    T, H, _ = q.shape
    S = k.shape[0]
    shared = k.ndim == 2
    out = xp.empty((T, H, v.shape[-1]), np.float32)
    key_pos = xp.arange(S)
    step = _chunk_rows(H, S, max_bytes)
    for t0 in range(0, T, step):
        qc = q[t0 : t0 + step]  # [Tc, H, D]
        tc = qc.shape[0]
        if shared:
            scores = (qc.reshape(tc * H, -1) @ k.T).reshape(tc, H, S)  # [Tc, H, S]
        else:
            scores = xp.matmul(qc.transpose(1, 0, 2), k.transpose(1, 2, 0)).transpose(1, 0, 2)  # [Tc, H, S]
        scores *= np.float32(scale)
        if q_pos[t0 : t0 + step].min() < S - 1:  # some key lies in some query's future (never in decode)
            masked = key_pos[None, :] > xp.asarray(q_pos[t0 : t0 + step])[:, None]  # [Tc, S]
            scores += xp.where(masked, np.float32(-np.inf), np.float32(0))[:, None, :]  # alike on CPU and GPU
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        if shared:
            out[t0 : t0 + tc] = (scores.reshape(tc * H, S) @ v).reshape(tc, H, -1)
        else:
            out[t0 : t0 + tc] = xp.matmul(scores.transpose(1, 0, 2), v.transpose(1, 0, 2)).transpose(1, 0, 2)
    return out

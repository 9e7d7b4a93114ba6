"""Causal softmax attention over cached keys, computed in query chunks so scratch memory stays bounded.

Legend: T queries, S keys, H heads, D key width, V value width, Hkv key/value heads (G = H / Hkv queries each).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from engine.ops import array_module
from engine.simd import _half_to_f32


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


def _f32(x: np.generic) -> np.float32:
    """A cache element as float32: uint16 elements are IEEE half bits (numba's CPU target has no float16)."""
    raise NotImplementedError("compiled only")


@overload(_f32, inline="always")
def _f32_impl(x):
    if isinstance(x, types.Integer):
        return lambda x: _half_to_f32(x)
    return lambda x: np.float32(x)


# Below this many multiply-adds a decode attention runs on the calling thread: a parallel region costs a hand-over
# to the pool and back, and when a core is busy elsewhere (a client, the server's event loop) one late thread stalls
# it by a scheduler tick, ~100x a short context's work. 1M is ~0.1 ms of one core's work.
SERIAL_MACS = 1 << 20


def _decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_kv: int, scale: float, out: np.ndarray) -> None:
    """out[h] = softmax(scale * q[h] . k[s, head j]) @ v[s, head j] over all S cached rows, j = h // G.

    q [H, D] float32; k [S, Hkv * D] and v [S, Hkv * V] float32, or uint16 (f16 bits, converted as read), all
    C-contiguous. Unsigned flat indices: numba then drops its negative-index wraparound and the inner loops
    vectorise."""
    H, D = q.shape
    S = k.shape[0]
    Dv = out.shape[1]
    G = H // n_kv
    kf, vf, qf = k.ravel(), v.ravel(), q.ravel()
    for h in prange(H):
        j = h // G
        scores = np.empty(S, np.float32)
        o = np.zeros(Dv, np.float32)
        best = np.float32(-np.inf)
        qo = np.uint64(h * D)
        for s in range(S):
            ko = np.uint64((s * n_kv + j) * D)
            acc = np.float32(0.0)
            for d in range(np.uint64(D)):
                acc += qf[qo + d] * _f32(kf[ko + d])
            scores[s] = acc * np.float32(scale)
            best = max(best, scores[s])
        total = np.float32(0.0)
        for s in range(S):
            scores[s] = np.exp(scores[s] - best)
            total += scores[s]
        for s in range(S):
            p = scores[s] / total
            vo = np.uint64((s * n_kv + j) * Dv)
            for d in range(np.uint64(Dv)):
                o[d] += p * _f32(vf[vo + d])
        out[h] = o


_FLAGS = {"cache": True, "nogil": True, "fastmath": {"reassoc", "contract"}}
_decode_parallel = njit(parallel=True, **_FLAGS)(_decode)
_decode_serial = njit(**_FLAGS)(_decode)  # the same loop, prange as range


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_kv_heads: int, scale: float) -> np.ndarray:
    """One query's attention over the whole cache, as causal_attention gives it, for grouped heads.

    q [H, D] float32, k [S, Hkv * D] and v [S, Hkv * V] float16 or float32 (read where they lie: an f16 cache is
    not converted to a float32 copy first) -> [H, V] float32. A decode step's cache rows are all in its past."""
    H, D = q.shape
    if H % n_kv_heads or k.shape[1] != n_kv_heads * D or v.shape[1] % n_kv_heads:
        raise ValueError(f"{H} query heads of {D} do not fit keys {k.shape} in {n_kv_heads} heads")

    def rows(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        return a.view(np.uint16) if a.dtype == np.float16 else a

    out = np.empty((H, v.shape[1] // n_kv_heads), np.float32)
    kernel = _decode_serial if H * k.shape[0] * (D + out.shape[1]) < SERIAL_MACS else _decode_parallel
    kernel(np.ascontiguousarray(q, dtype=np.float32), rows(k), rows(v), n_kv_heads, float(scale), out)
    return out

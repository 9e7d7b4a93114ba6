"""engine.attention against a float64 NumPy softmax attention written here.

Legend: H query heads, Hkv key/value heads, D key width, V value width, S cached rows.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.attention import SERIAL_MACS, causal_attention, decode_attention


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_kv: int, scale: float) -> np.ndarray:
    """One query per head over all S rows, query head h reading kv head h // (H / Hkv), in float64."""
    H, D = q.shape
    S = k.shape[0]
    G = H // n_kv
    kh = k.astype(np.float64).reshape(S, n_kv, D)
    vh = v.astype(np.float64).reshape(S, n_kv, -1)
    out = []
    for h in range(H):
        s = scale * kh[:, h // G] @ q[h].astype(np.float64)  # [S]
        p = np.exp(s - s.max())
        out.append(p @ vh[:, h // G] / p.sum())
    return np.stack(out)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("H", "n_kv", "D", "V", "S"),
                         [(9, 3, 64, 64, 300), (4, 4, 32, 48, 1), (8, 1, 576, 512, 77), (16, 2, 128, 128, 600)])
def test_decode_attention_equals_the_float64_softmax(dtype: type, H: int, n_kv: int, D: int, V: int, S: int) -> None:
    rng = np.random.default_rng(S)
    q = rng.standard_normal((H, D)).astype(np.float32)
    k = (rng.standard_normal((S, n_kv * D)) * 2).astype(dtype)
    v = rng.standard_normal((S, n_kv * V)).astype(dtype)
    y = decode_attention(q, k, v, n_kv, 1 / np.sqrt(D))
    assert (H * S * (D + V) < SERIAL_MACS) == (S < 600)  # the last case takes the parallel kernel
    assert y.shape == (H, V) and y.dtype == np.float32
    np.testing.assert_allclose(y, reference(q, k, v, n_kv, 1 / np.sqrt(D)), rtol=0, atol=2e-5)


def test_decode_attention_agrees_with_causal_attention_at_the_last_position() -> None:
    """The decode kernel and the chunked NumPy path give one query the same result (the f16 cache read in place
    equals the float32 copy NumPy makes of it)."""
    rng = np.random.default_rng(0)
    S, n_kv, G, D = 130, 2, 3, 16
    q = rng.standard_normal((n_kv * G, D)).astype(np.float32)
    k = rng.standard_normal((S, n_kv * D)).astype(np.float16)
    v = rng.standard_normal((S, n_kv * D)).astype(np.float16)
    y = decode_attention(q, k, v, n_kv, 0.25)
    for j in range(n_kv):
        ref = causal_attention(q[None, j * G : (j + 1) * G], k[:, j * D : (j + 1) * D].astype(np.float32),
                               v[:, j * D : (j + 1) * D].astype(np.float32), np.array([S - 1]), 0.25)[0]
        np.testing.assert_allclose(y[j * G : (j + 1) * G], ref, rtol=1e-5, atol=1e-6)


def test_decode_attention_refuses_heads_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="query heads"):
        decode_attention(np.zeros((9, 64), np.float32), np.zeros((5, 2 * 64), np.float16),
                         np.zeros((5, 2 * 64), np.float16), 2, 0.1)

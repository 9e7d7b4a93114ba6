"""The fused integer kernels for ik_llama.cpp's types (engine.block_dots) against a float64 reference.

Legend: R rows, C columns, T tokens, G rows per interleaved group.

The reference is engine.ik_decoders' float32 values (bit-identical to ik_llama.cpp's, test_ik_types) in float64
times the activations that the integer codes stand for (test_int8_kernels.q8_reference): the kernels must agree
to float32 rounding. Weights are random bytes with their float scale fields set to finite values, so every code,
scale bit and book half occurs; rows cover one block, several, and the long rows summed a span at a time.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import kernels as K
from engine.block_dots import BLOCK_DOT_TYPES
from engine.ik_decoders import IK_DECODED
from engine.ik_types import quant_type, type_id, type_name
from tests.engine.int8_reference import RTOL, q8_reference, rel, tokens
from tests.engine.test_ik_types import CASES, _case_id, _ref

IK_FUSED = sorted(t for t in BLOCK_DOT_TYPES if t in IK_DECODED)
# Offsets of the f16 scales within one (interleaved) block, per type; the row header is set separately.
F16_AT = {"IQ4_KS": (), "IQ2_K_R4": (0, 2, 4, 6), "IQ4_K": (0,), "IQ2_K": (0,), "IQ5_KS": (), "IQ3_K": (0,),
          "IQ4_KT": (), "IQ2_KT": (), "IQ3_KT": (), "IQ1_KT": (),
          "Q8_0_R8": tuple(range(0, 16, 2)), "Q4_0_R8": tuple(range(0, 16, 2)),
          "Q4_K_R4": tuple(range(0, 16, 2)), "Q5_K_R4": tuple(range(0, 16, 2)), "Q6_K_R4": (0, 2, 4, 6),
          "IQ4_NL_R4": (0, 2, 4, 6), "Q5_0_R4": (0, 2, 4, 6), "Q6_0_R4": (0, 2, 4, 6),
          "Q2_K_R4": tuple(range(0, 16, 2)), "Q3_K_R4": (0, 2, 4, 6),
          "IQ5_K": (0,), "IQ6_K": (0,), "IQ2_KS": (), "IQ3_KS": (), "IQ4_KSS": (), "IQ2_KL": (), "Q6_0": (0,),
          "Q8_KV": (), "IQ4_KS_R4": (), "IQ4_K_R4": (0, 2, 4, 6), "IQ3_K_R4": (0, 2, 4, 6), "IQ5_K_R4": (0, 2, 4, 6),
          "IQ5_KS_R4": (), "IQ4_XS_R8": tuple(range(0, 16, 2)),
          "IQ1_S_R4": (), "IQ1_M_R4": (), "IQ2_XXS_R4": (0, 2, 4, 6), "IQ3_XXS_R4": (0, 2, 4, 6),
          "IQ2_XS_R4": (0, 2, 4, 6), "IQ2_S_R4": (0, 2, 4, 6), "IQ3_S_R4": (0, 2, 4, 6), "Q8_KV_R8": ()}


def random_ik_rows(qtype: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, row bytes] of random codes with finite scales of both signs and magnitudes 1e-3..1e-1."""
    qt = quant_type(qtype)
    rng = np.random.default_rng(seed)

    def scales(n: int, dtype: type) -> np.ndarray:
        return (rng.uniform(1e-3, 1e-1, n) * rng.choice([-1.0, 1.0], n)).astype(dtype)

    raw = rng.integers(0, 256, (rows // qt.group, qt.group * qt.row_bytes(cols)), dtype=np.uint8)
    head = {0: None, 2: np.float16, 4: np.float32, 8: np.float32}[qt.meta]  # Q8_KV: a float32, then its code sum
    meta = qt.group * qt.meta  # an interleaved group's header holds its rows' headers
    if head is not None:
        size = np.dtype(head).itemsize
        rows_head = raw[:, :meta].reshape(raw.shape[0], qt.group, qt.meta)
        rows_head[:, :, :size] = scales(raw.shape[0] * qt.group, head).view(np.uint8).reshape(-1, qt.group, size)
    blocks = raw[:, meta:].reshape(raw.shape[0], cols // qt.qk, -1)
    for o in F16_AT[qt.name]:
        blocks[:, :, o : o + 2] = scales(blocks.shape[0] * blocks.shape[1], np.float16).view(np.uint8).reshape(
            blocks.shape[0], blocks.shape[1], 2)
    return raw.reshape(rows, -1)


def close(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> bool:
    """y == x @ w.T to float32 rounding: the error within RTOL of the largest sum of |products| (the scale of a
    float32 sum's rounding; these random weights reach |1600| and rows 10^4 values, so sums cancel a lot)."""
    return float(np.abs(y - x @ w.T).max()) < RTOL * float((np.abs(x) @ np.abs(w).T).max())


def reference(raw: np.ndarray, qtype: int, rows: int, cols: int) -> np.ndarray:
    with K.activations(int8=False):
        return K.dequantize_rows(raw, qtype, (rows, cols)).astype(np.float64)


def ik_products() -> dict[str, list]:
    """Each fused ik type's matvec and gathered product on fixed inputs (test_int8_kernels' cross-build check)."""
    out = {}
    for qtype in IK_FUSED:
        R, C = 8, 8 * quant_type(qtype).qk
        raw = random_ik_rows(qtype, R, C)
        with K.activations(int8=True):
            out[type_name(qtype)] = K.matmul_t(raw, qtype, (R, C), tokens(3, C)).tolist()
            out[type_name(qtype) + "/gather"] = K.gather_matvec(raw[None], qtype, (1, R, C),
                                                                np.zeros(3, np.int64), tokens(3, C)).tolist()
    return out


def test_the_recipes_types_have_fused_kernels() -> None:
    """The figures' recipes (IQ4_KS, IQ2_K_R4) read their blocks in place, and bench --json says so."""
    assert {type_name(t) for t in IK_FUSED} >= {"IQ4_KS", "IQ2_K_R4"}
    assert all(K.fused(t) and K.takes_int8(t) for t in IK_FUSED)
    assert not K.fused(min(IK_DECODED - set(IK_FUSED)))


def _shapes(qtype: int) -> list[tuple[int, int]]:
    """(R, C): one block (two of 32 values: tokens() zeroes the first 32), an odd number of blocks, and a long row
    whose last span is short."""
    qt = quant_type(qtype)
    long = qt.qk * (K._LONG_ROW // qt.qk + K._COL_SPAN // qt.qk // 2 + 1)
    assert long > K._LONG_ROW
    return [(3 * qt.group * 8, max(qt.qk, 64)), (2 * max(qt.group, 4) + 24, 3 * qt.qk), (qt.group * 5, long)]


@pytest.mark.parametrize("qtype", IK_FUSED, ids=type_name)
def test_fused_matvec_equals_decode_then_multiply(qtype: int) -> None:
    for R, C in _shapes(qtype):
        raw = random_ik_rows(qtype, R, C, seed=C)
        w = reference(raw, qtype, R, C)
        for T in (1, 3, 9, K.MATVEC_MAX_T):
            x = tokens(T, C)
            with K.activations(int8=True):
                y = K.matmul_t(raw, qtype, (R, C), x)
            assert close(y, q8_reference(x)[0], w), (R, C, T)
            with K.activations(int8=False):  # the float decoder path, exact up to the activations' rounding
                exact = K.matmul_t(raw, qtype, (R, C), x)
            # the 1e3 block's rounding over rows that cancel reaches 4e-4 (IQ4_KSS's long rows)
            assert 1e-9 < rel(y, exact) < 1e-3


@pytest.mark.parametrize("qtype", IK_FUSED, ids=type_name)
def test_fused_gathered_experts_equal_decode_then_multiply(qtype: int) -> None:
    qt = quant_type(qtype)
    E, R, C = 4, 3 * max(qt.group, 8), 2 * qt.qk
    stacked = np.stack([random_ik_rows(qtype, R, C, seed=e) for e in range(E)])
    ids = np.array([3, 0, 3, 3, 1, 2])
    x = tokens(len(ids), C)
    with K.activations(int8=True):
        y = K.gather_matvec(stacked, qtype, (E, R, C), ids, x)
    xr = q8_reference(x)[0]
    for n, e in enumerate(ids):
        assert close(y[n : n + 1], xr[n : n + 1], reference(stacked[e], qtype, R, C)), n


@pytest.mark.parametrize("case", [c for c in CASES if type_id(c[0]) in IK_FUSED], ids=_case_id)
def test_fused_kernels_on_ik_llamas_own_quantization(case: tuple[str, int, int]) -> None:
    """Rows quantized by ik_llama.cpp, against the values its own dequantizer gives (not ours)."""
    name, rows, cols = case
    raw, w = _ref(name, rows, cols)
    for T in (1, 5):
        x = tokens(T, cols, seed=T)
        with K.activations(int8=True):
            y = K.matmul_t(raw, type_id(name), (rows, cols), x)
        assert close(y, q8_reference(x)[0], w.astype(np.float64)), T


@pytest.mark.parametrize("name", ["IQ4_KS", "IQ2_K_R4", "Q4_K"])
def test_prompt_batches_up_to_fused_max_t_take_the_fused_kernel(name: str) -> None:
    """matmul_t keeps a type with a fused kernel on it up to FUSED_MAX_T tokens (the tiled BLAS path is slower
    there), and tiles one token more; without integer activations the boundary stays at MATVEC_MAX_T."""
    qtype = type_id(name)
    R, C = 8, 2 * quant_type(qtype).qk
    if name == "Q4_K":  # mainline: random 144-byte blocks with finite d, dmin
        raw = np.random.default_rng(0).integers(0, 256, (R, C // 256 * 144), dtype=np.uint8)
        raw.reshape(R, -1, 144)[:, :, :4] = np.array([0.01, 0.002], np.float16).view(np.uint8)
    else:
        raw = random_ik_rows(qtype, R, C)
    for T, fused in ((K.FUSED_MAX_T, True), (K.FUSED_MAX_T + 1, False)):
        x = tokens(T, C)
        with K.activations(int8=True):
            assert K.matvec_max_tokens(qtype) == K.FUSED_MAX_T
            y = K.matmul_t(raw, qtype, (R, C), x)
            want = K.matvec(raw, qtype, (R, C), x) if fused else K.matmul_tiled(raw, qtype, (R, C), x)
        assert np.array_equal(y, want), (T, fused)
    with K.activations(int8=False):
        assert K.matvec_max_tokens(qtype) == K.MATVEC_MAX_T


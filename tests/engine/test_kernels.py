"""engine.kernels' float32 path against gguf's NumPy decoders: bit-exact decode, products within float32 rounding.

Legend: R rows, C columns, T tokens, QK values per block.

Blocks are random bytes with sane f16 scales written over the scale fields, so every bit pattern of the
quants, packed sub-block scales and high-bit planes is exercised. R is odd, C is an odd number of blocks,
and the large C spans two matvec chunks (the kernel decodes 4096 values at a time).
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import pytest

from engine import block_decoders as D
from engine import kernels as K

GT = gguf.GGMLQuantizationType

# Byte offsets of the f16 scale fields inside one block (docs/deepseek2.md §6).
F16_FIELDS = {
    D.Q4_0: (0,),
    D.Q4_1: (0, 2),
    D.Q5_0: (0,),
    D.Q5_1: (0, 2),
    D.Q8_0: (0,),
    D.IQ4_NL: (0,),
    D.Q2_K: (80, 82),
    D.Q3_K: (108,),
    D.Q4_K: (0, 2),
    D.Q5_K: (0, 2),
    D.Q6_K: (208,),
    D.IQ4_XS: (0,),
}
ALL_TYPES = [*F16_FIELDS, D.F16, D.BF16]

# |y - y_ref| / max|y_ref| for the float32 kernels against a float64 product of the same decoded weights:
# float32 rounding of the partial sums is ~1e-7 at these sizes, a wrong value or block is >= 1e-3.
RTOL = 1e-5


@pytest.fixture(autouse=True)
def float_activations() -> Iterator[None]:
    """These are the float32-activation kernels' tests (tests/engine/test_int8_kernels.py has the int8 ones)."""
    with K.activations(int8=False):
        yield


def random_rows(qtype: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, row bytes] of valid blocks: random bytes, f16 scales of either sign in [1e-3, 1e-1]."""
    rng = np.random.default_rng(seed)
    if qtype in (D.F16, D.BF16):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == D.F16:
            return w.astype(np.float16).view(np.uint8)
        return gguf.quants.quantize(w, GT.BF16).view(np.uint8).reshape(rows, -1)
    qk, nbytes = D.BLOCK[qtype]
    raw = rng.integers(0, 256, (rows, cols // qk, nbytes), dtype=np.uint8)
    for o in F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 1e-1, (rows, cols // qk)) * rng.choice([-1.0, 1.0], (rows, cols // qk))
        raw[:, :, o : o + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: int, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, GT(qtype)).astype(np.float32).reshape(rows, cols)


def columns(qtype: int, large: bool) -> int:
    """An odd number of blocks: 9 (one chunk) or 131 / 17 (two chunks of the matvec)."""
    qk = D.BLOCK[qtype][0]
    if qk == 1:
        return 4099 if large else 291
    if qk == 32:
        return 32 * (131 if large else 9)
    return 256 * (17 if large else 3)


def name(qtype: int) -> str:
    return GT(qtype).name


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=name)
def test_dequantize_rows_is_bit_exact(qtype: int) -> None:
    R, C = 5, columns(qtype, large=False)
    raw = random_rows(qtype, R, C, seed=1)
    got = K.dequantize_rows(raw, qtype, (R, C))
    assert got.dtype == np.float32 and got.shape == (R, C)
    np.testing.assert_array_equal(got, reference(raw, qtype, R, C))


@pytest.mark.parametrize("large", [False, True], ids=["C1chunk", "C2chunks"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=name)
def test_matmul_t_matches_float64_reference(qtype: int, large: bool) -> None:
    R, C = 7, columns(qtype, large)
    raw = random_rows(qtype, R, C, seed=2)
    w = reference(raw, qtype, R, C).astype(np.float64)
    rng = np.random.default_rng(3)
    for T in (1, 3, 40):  # 1 and 3 take the matvec kernel, 40 the tiled BLAS path
        x = rng.standard_normal((T, C)).astype(np.float32)
        want = x.astype(np.float64) @ w.T
        got = K.matmul_t(raw, qtype, (R, C), x)
        assert got.dtype == np.float32 and got.shape == (T, R)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < RTOL, f"T={T}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", [D.Q8_0, D.Q4_K, D.Q6_K, D.IQ4_XS], ids=name)
def test_matvec_and_tiled_paths_agree_for_every_token_count(qtype: int) -> None:
    R, C = 37, columns(qtype, large=False)
    raw = random_rows(qtype, R, C, seed=4)
    x = np.random.default_rng(5).standard_normal((9, C)).astype(np.float32)
    want = x.astype(np.float64) @ reference(raw, qtype, R, C).astype(np.float64).T
    scale = np.abs(want).max()
    for T in range(1, 10):  # covers the 4-token inner blocking and its remainders
        for path in (K.matvec, K.matmul_tiled):
            err = np.abs(path(raw, qtype, (R, C), x[:T]) - want[:T]).max() / scale
            assert err < RTOL, f"{path.__name__} T={T}: relative error {err:.2e}"


def test_reader_layouts_are_accepted() -> None:
    """F16 comes as float16 [R, C], quantized types as read-only uint8 (a memory map); x may be 1-D or 3-D."""
    R, C = 3, 288
    raw16 = random_rows(D.F16, R, C).view(np.float16)
    x = np.random.default_rng(6).standard_normal((2, 2, C)).astype(np.float32)
    want = x @ raw16.astype(np.float32).T
    np.testing.assert_allclose(K.matmul_t(raw16, D.F16, (R, C), x), want, rtol=1e-5, atol=1e-5)
    assert K.matmul_t(raw16, D.F16, (R, C), x[0, 0]).shape == (R,)

    raw = random_rows(D.Q8_0, R, C)
    raw.flags.writeable = False
    w = reference(raw, D.Q8_0, R, C)
    np.testing.assert_allclose(K.matmul_t(raw, D.Q8_0, (R, C), x[0]), x[0] @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(K.dequantize_rows(raw[[2, 0]], D.Q8_0, (2, C)), w[[2, 0]])

    w32 = np.random.default_rng(8).standard_normal((R, C)).astype(np.float32)
    np.testing.assert_array_equal(K.dequantize_rows(w32, D.F32, (R, C)), w32)
    np.testing.assert_allclose(K.matmul_t(w32, D.F32, (R, C), x), x @ w32.T, rtol=1e-5, atol=1e-5)


def test_f16_special_values_decode_exactly() -> None:
    values = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504, -65504, np.inf, -np.inf, np.nan], np.float16)
    got = K.dequantize_rows(values.reshape(1, -1), D.F16, (1, values.size))
    np.testing.assert_array_equal(got[0], values.astype(np.float32))
    assert np.array_equal(np.signbit(got[0]), np.signbit(values))


def test_supports_and_rejects() -> None:
    assert all(K.supports(t) for t in ALL_TYPES)
    assert not K.supports(GT.IQ2_XXS)
    with pytest.raises(ValueError, match="multiple"):
        K.matmul_t(np.zeros((1, 34), np.uint8), D.Q8_0, (1, 33), np.zeros((1, 33), np.float32))
    with pytest.raises(ValueError, match="no kernel"):
        K.dequantize_rows(np.zeros((1, 66), np.uint8), GT.IQ2_XXS, (1, 256))


def test_set_threads_is_clipped_and_results_do_not_depend_on_it() -> None:
    R, C = 33, 512
    raw = random_rows(D.Q4_K, R, C)
    x = np.random.default_rng(7).standard_normal((2, C)).astype(np.float32)
    before = K.get_threads()
    try:
        assert K.set_threads(0) == 1
        one = K.matmul_t(raw, D.Q4_K, (R, C), x)
        K.set_threads(10**6)
        many = K.matmul_t(raw, D.Q4_K, (R, C), x)
    finally:
        K.set_threads(before)
    np.testing.assert_array_equal(one, many)

"""K-quant writers (engine.kquants) checked by decoding their blocks with gguf's own dequantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine import kquants

QT = gguf.GGMLQuantizationType
# Relative RMS error on Gaussian data; measured 0.0715 / 0.0359 / 0.0173 (llama.cpp: ~0.07 / 0.035 / 0.017).
BOUNDS = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.018}
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def roundtrip(x: np.ndarray, name: str) -> np.ndarray:
    q = kquants.quantize(x, name)
    return gguf.quants.dequantize(q, QT[name]).reshape(x.shape)


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((96, 1024), dtype=np.float32) * np.float32(0.02)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_gaussian_roundtrip_within_bound(name: str, gaussian: np.ndarray) -> None:
    q = kquants.quantize(gaussian, name)
    assert q.dtype == np.uint8 and q.shape == (96, 1024 // 256 * BLOCK_BYTES[name])
    assert q.shape[1] // 4 == gguf.GGML_QUANT_SIZES[QT[name]][1]
    err = rel_rms(roundtrip(gaussian, name), gaussian)
    assert err < BOUNDS[name], f"{name}: relative RMS {err:.4f}"


@pytest.mark.parametrize(("name", "legacy"), [("Q4_K", "Q4_1"), ("Q5_K", "Q5_1"), ("Q6_K", "Q5_1")])
def test_beats_the_32_block_type_of_fewer_bits(name: str, legacy: str, gaussian: np.ndarray) -> None:
    ref = gguf.quants.dequantize(gguf.quants.quantize(gaussian, QT[legacy]), QT[legacy])
    assert rel_rms(roundtrip(gaussian, name), gaussian) < rel_rms(ref.reshape(gaussian.shape), gaussian)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_blocks_are_scaled_independently(name: str) -> None:
    # each row a different magnitude; a shared or mis-indexed scale would wreck the small rows
    rng = np.random.default_rng(3)
    scales = np.array([1e-2, 1.0, 50.0, 3e-1], dtype=np.float32)[:, None]
    x = rng.standard_normal((4, 512), dtype=np.float32) * scales
    # an offset sub-block (all positive) and a skewed one exercise the mins
    x[1, 32:64] = np.abs(x[1, 32:64]) + 2.0
    x[2, 256:288] -= 80.0
    y = roundtrip(x, name)
    for row in range(4):
        assert rel_rms(y[row], x[row]) < 2 * BOUNDS[name], row


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_zero_and_constant_rows(name: str) -> None:
    x = np.zeros((3, 256), dtype=np.float32)
    x[1] = 0.75
    x[2] = -1.25
    y = roundtrip(x, name)
    assert np.all(y[0] == 0)
    np.testing.assert_allclose(y[1:], x[1:], rtol=2e-3)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_every_level_reachable(name: str) -> None:
    # a ramp decodes monotonically within each sub-block (sub-blocks have their own grids) and close
    # everywhere: catches swapped nibbles, bit planes or sub-block order
    x = np.linspace(-1, 1, 256, dtype=np.float32)[None, :]
    y = roundtrip(x, name)[0]
    sub = 16 if name == "Q6_K" else 32
    assert np.all(np.diff(y.reshape(-1, sub), axis=1) >= 0)
    assert np.abs(y - x[0]).max() < 0.04


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_chunking_and_shape(name: str, gaussian: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = kquants.quantize(gaussian, name)
    monkeypatch.setattr(kquants, "_CHUNK_VALUES", 3000)  # forces 2-row chunks, the last one short
    assert np.array_equal(kquants.quantize(gaussian, name), whole)
    assert np.array_equal(kquants.quantize(gaussian, name), kquants.quantize(gaussian.copy(), QT[name]))
    stacked = kquants.quantize(gaussian.reshape(4, 24, 1024), name)
    assert stacked.shape == (4, 24, whole.shape[1]) and np.array_equal(stacked.reshape(whole.shape), whole)


def test_rejects_bad_rows_and_types() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(np.zeros((2, 320), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="cannot write Q8_0"):
        kquants.quantize(np.zeros((2, 256), np.float32), "Q8_0")
    assert kquants.supported() == ("Q4_K", "Q5_K", "Q6_K")

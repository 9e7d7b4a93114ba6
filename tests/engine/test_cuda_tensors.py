"""engine.cuda.tensors without a GPU: CudaTensor's launches (arguments, offsets, views, tiles, the cuBLAS call)
run the kernels' own source on the host (tests/engine/cuda_emulator.py) over the strict CuPy stand-in, and must
give engine.quant's results; then a whole model on "CUDA0" against the CPU.

Legend: E experts, R rows, C columns, T tokens.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import engine.cuda.tensors as cuda_tensors
from engine import load_model, synth
from engine.cuda import kernels as K
from engine.cuda.tensors import CudaTensor, as_device
from engine.quant import QTensor
from engine.synth import SynthSpec, write_model
from tests.engine import cuda_emulator, strict_cupy

GT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cuda_emulator.EmulatedModule.lib = cuda_emulator.build(tmp_path_factory.mktemp("emulated"))
    yield cuda_emulator.EmulatedModule
    cuda_emulator.EmulatedModule.lib = None


@pytest.fixture
def gpu(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The stand-in as `cupy`, kernels from the emulator, cuBLAS's gemmEx emulated; fresh kernel caches."""
    monkeypatch.setattr(K, "_modules", {})
    monkeypatch.setattr(K, "_functions", {})
    monkeypatch.setattr(cuda_tensors, "_cublas", lambda: types.SimpleNamespace(gemmEx=cuda_emulator.gemmEx))
    with strict_cupy.installed(monkeypatch) as cp:
        yield cp


def _tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> QTensor:
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return QTensor("w", np.ascontiguousarray(synth.encode(values, name)), int(GT[name]), shape)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


KERNEL_TYPES = ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "F32"]


@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_decode_paths_match_the_cpu(gpu: Any, name: str) -> None:
    E, R, C = 3, 20, 512
    q = _tensor(name, (E, R, C))
    g = CudaTensor.upload(q, 0)
    assert g.qtype == q.qtype and g.nbytes == q.nbytes and g.shape == q.shape  # uploaded as it is in the file
    assert np.array_equal(g.dequantize().get(), q.dequantize())  # dq kernel, f32 out, all rows
    ref = q.dequantize().astype(np.float64)
    rng = np.random.default_rng(1)
    for T in (1, 3, 8):  # the t1 kernel, the t8 kernel part-filled and full
        x = rng.standard_normal((T, C)).astype(np.float32)
        y = g[2].matmul_t(x)  # an expert's view: a pointer offset into the stacked bytes
        assert isinstance(y, gpu.ndarray) and y.shape == (T, R)
        assert _rel(y.get(), x @ ref[2].T) < 1e-5
    x = rng.standard_normal((4, C)).astype(np.float32)
    ids = np.array([2, 0, 2, 1])
    y = g.gather_matmul_t(ids, gpu.asarray(x)).get()  # one launch, matrix ids[n] for row n
    assert _rel(y, np.stack([x[n] @ ref[e].T for n, e in enumerate(ids)])) < 1e-5
    rows = g[1].rows(np.array([7, 0, 19, 7]))
    assert np.array_equal(rows.get(), q[1].rows(np.array([7, 0, 19, 7])))
    with pytest.raises(ValueError, match="do not fit 3 experts"):
        g.gather_matmul_t(np.array([0, 3]), x[:2])


@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_prefill_tiles_and_gemm(gpu: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    R, C, T = 45, 512, 20
    q = _tensor(name, (R, C), seed=3)
    monkeypatch.setattr(cuda_tensors, "TILE_BYTES", 16 * 2 * C)  # 16 rows per tile: three tiles, the last short
    x = np.random.default_rng(4).standard_normal((T, C)).astype(np.float32)
    y = CudaTensor.upload(q, 0).matmul_t(x).get()
    w = q.dequantize()
    if name == "F32":  # F32 weights go to cuBLAS as they are
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
        return
    # f16 tiles and f16 activations, f32 accumulation: exactly what the rounded operands give
    rounded = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    np.testing.assert_allclose(y, rounded, rtol=1e-4, atol=1e-4 * np.abs(rounded).max())
    assert _rel(y, x.astype(np.float64) @ w.T) < 1e-2


def test_matmul_t_keeps_leading_axes_and_aligns_inputs(gpu: Any) -> None:
    q = _tensor("Q8_0", (16, 64))
    g = CudaTensor.upload(q, 0)
    x = np.random.default_rng(5).standard_normal((2, 3, 64)).astype(np.float32)
    assert _rel(g.matmul_t(x).get(), x @ q.dequantize().T) < 1e-5
    padded = gpu.asarray(np.random.default_rng(6).standard_normal(65).astype(np.float32))
    view = padded[1:]  # 4 bytes past an aligned start: the kernels load float4
    assert view.data.ptr % 16 != 0 and as_device(view).data.ptr % 16 == 0
    assert _rel(g.matmul_t(view[None, :]).get(), view.get()[None, :] @ q.dequantize().T) < 1e-5


@pytest.mark.parametrize(("name", "limit", "kept"), [("Q5_0", None, GT.F32), ("IQ4_NL", 1024, GT.F16)])
def test_types_without_a_kernel_are_decoded_at_upload(gpu: Any, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, name: str, limit: int | None,
                                                      kept: int) -> None:
    if limit is not None:
        monkeypatch.setattr(cuda_tensors, "FALLBACK_F32_MAX_BYTES", limit)
    values = np.random.default_rng(8).standard_normal((2, 24, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, GT[name]) if name != "IQ4_NL" else _iq4_nl(values)
    q = QTensor("w", raw, int(GT[name]), values.shape)
    assert not K.supports(q.qtype)
    with caplog.at_level(logging.WARNING, logger="ikctl.cuda"):
        g = CudaTensor.upload(q, 0)
    assert g.qtype == kept and g.shape == q.shape
    assert ("no CUDA kernel for" in caplog.text) == (kept == GT.F16)
    tol = 1e-6 if kept == GT.F32 else 1e-3
    assert _rel(g.dequantize().get(), q.dequantize()) < tol
    x = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)
    assert _rel(g[1].matmul_t(x).get(), x @ q[1].dequantize().T) < tol
    assert _rel(g.gather_matmul_t(np.array([1, 0, 1]), x).get(),
                np.stack([x[n] @ q[e].dequantize().T for n, e in enumerate([1, 0, 1])])) < tol


def _iq4_nl(values: np.ndarray) -> np.ndarray:
    """IQ4_NL blocks with random nibbles and a sane scale (gguf cannot quantize to it)."""
    blocks = values.size // 32
    raw = np.random.default_rng(10).integers(0, 256, (blocks, 18), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(np.full(blocks, 0.01, np.float16).tobytes(), np.uint8).reshape(blocks, 2)
    return raw.reshape(*values.shape[:-1], values.shape[-1] // 32 * 18)


def test_float_rows_that_are_not_a_multiple_of_8(gpu: Any) -> None:
    """A router of 12 inputs, say: no kernel reads it, cuBLAS (cupy.matmul) does."""
    q = QTensor.from_array("gate", np.random.default_rng(11).standard_normal((5, 12)).astype(np.float32))
    g = CudaTensor.upload(q, 0)
    x = np.random.default_rng(12).standard_normal((2, 12)).astype(np.float32)
    np.testing.assert_allclose(g.matmul_t(x).get(), x @ q.data.T, rtol=1e-6)
    assert np.array_equal(g.rows(np.array([4, 1])).get(), q.data[[4, 1]])


def test_kernels_are_looked_up_once_per_device(gpu: Any) -> None:
    q = _tensor("Q4_K", (8, 256))
    g = CudaTensor.upload(q, 0)
    for _ in range(3):
        g.matmul_t(np.ones((1, 256), np.float32))
    fn = K.function("mv_q4_k_t1", 0)
    assert fn.calls == 3 and K.function("mv_q4_k_t1", 0) is fn and len(K._modules) == 1


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SynthSpec(layers=2, dense_layers=1, heads=2, experts=4, top_k=2, expert_ffn=32, dense_ffn=64, vocab=300,
                     q_lora_rank=32, dtype="Q8_0", seed=21)
    return write_model(tmp_path_factory.mktemp("cudamodel") / "q8.gguf", spec)


def test_whole_model_on_emulated_gpu(gpu: Any, q8_model: Path) -> None:
    """-ngl 99: every layer and the head as CudaTensors on "CUDA0"; prefill (tiles + gemm) and decode (matvec,
    gathered experts, absorbed MLA on the device cache) against the CPU."""
    cpu = load_model(q8_model, ctx_size=32, float_activations=True)  # the GPU kernels multiply in f32
    dev = load_model(q8_model, ctx_size=32, n_gpu_layers=99)
    runner = dev.net.gpu[1]
    assert isinstance(runner.net.layers[1].experts[0], CudaTensor) and runner.net.xp is gpu
    prompt = [3, 141, 59, 26, 53, 58, 97, 93, 23, 84]  # T = 10 > 8: f16 tiles and cuBLAS
    a, b = cpu.logits(prompt), dev.logits(prompt)
    assert _rel(b, a) < 2e-2 and (b.argmax(-1) == a.argmax(-1)).mean() >= 0.9
    caches = [cpu.new_cache(32), dev.new_cache(32)]
    for m, c in zip((cpu, dev), caches, strict=True):
        m.eval(prompt[:4], c)  # T = 4: the t8 matvec kernel
    steps = [[m.eval([t], c) for t in (7, 8, 9)] for m, c in zip((cpu, dev), caches, strict=True)]
    assert all(_rel(g, c) < 1e-4 for c, g in zip(*steps, strict=True))

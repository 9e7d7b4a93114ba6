"""Quantized weights are used as stored: a quantized model equals its own dequantized-F32 copy."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine import load_model
from engine.synth import SynthSpec, write_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_rewrite import rewrite_gguf

# 256-wide rows so K-quants apply to most matrices (the rest fall back to 32-block types, as in llama.cpp)
SPEC = SynthSpec(hidden=256, layers=2, dense_layers=1, heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope=32,
                 qk_rope=16, v_head=32, experts=8, top_k=2, shared_experts=1, expert_ffn=256, dense_ffn=512,
                 vocab=320, gating="sigmoid", expert_weights_norm=True, yarn=True, seed=7)
IDS = [318, 5, 77, 190, 12, 260, 44, 101, 9, 230, 150, 33, 3, 7, 250, 99]


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """The same file with every non-F32 tensor replaced by its exact float32 decoding."""
    r = gguf.GGUFReader(src)
    repl = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            repl[t.name] = (gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32),
                            gguf.GGMLQuantizationType.F32)
    assert repl, "the model has no quantized tensor"
    return rewrite_gguf(src, dst, tensors=repl)


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_K", "Q6_K", "Q4_0", "Q5_1", "F16", "BF16"])
def test_quantized_model_equals_its_dequantized_f32_model(tmp_path: Path, dtype: str) -> None:
    """Tolerance: relative error <= 2e-5 (float32 summation order only; the weights are identical)."""
    q_path = write_model(tmp_path / f"m-{dtype}.gguf", replace(SPEC, dtype=dtype))
    f_path = _dequantized_copy(q_path, tmp_path / "f32.gguf")
    types = {t.tensor_type.name for t in gguf.GGUFReader(q_path).tensors}
    assert dtype in types
    assert {t.tensor_type.name for t in gguf.GGUFReader(f_path).tensors} == {"F32"}
    ours = load_model(q_path, cache_type_k="f32", float_activations=True).logits(IDS)
    ref = load_model(f_path, cache_type_k="f32").logits(IDS)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 2e-5


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0"])
def test_fast_kernels_equal_the_generic_path(tmp_path: Path, dtype: str) -> None:
    """Prefill (tiled kernels) and decode (matvec + gathered experts): relative error <= 1e-5 vs gguf decode."""
    from engine import quant

    path = write_model(tmp_path / f"m-{dtype}.gguf", replace(SPEC, dtype=dtype))
    results = {}
    for fast in (False, True):
        quant.use_kernels(fast)
        try:
            model = load_model(path, cache_type_k="f32", float_activations=True)
            batch = model.logits(IDS * 3)  # 48 tokens: prefill takes the tiled path
            cache = model.new_cache()
            model.eval(IDS[:-4], cache)
            steps = np.concatenate([model.eval([t], cache) for t in IDS[-4:]])
            results[fast] = (batch, steps)
        finally:
            quant.use_kernels(True)
    for generic, fast in zip(results[False], results[True], strict=True):
        assert np.linalg.norm(fast - generic) / np.linalg.norm(generic) <= 1e-5

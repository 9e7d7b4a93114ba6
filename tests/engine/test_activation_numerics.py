"""The stated numerics of the int8 path: next-token distributions against the float32-activation path.

Over a few hundred positions, fed 16 tokens per forward pass (the decode kernels' batch, so every quantized
product runs on integer activation codes): top-1 agreement >= 99 % and mean KL(float || int8) <= 1e-3 for
SmolLM2 (Q4_1, a real model) and DeepSeek-architecture models in Q4_K and Q8_0. The measured values are printed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.kernels import MATVEC_MAX_T
from engine.synth import DEFAULT_SPEC, write_model

TEXT = (
    "The river starts in the mountains, where snow melts each spring and feeds a hundred small streams. By the "
    "time it reaches the plain it is wide and slow, and the towns along its banks have used it for trade, for "
    "mills and for water since long before anyone wrote down their names. In the old harbour the boats still "
    "come in at dawn, and the market opens as soon as the first crates of fish are on the quay. Children walk "
    "to school along the embankment, past the bridge that was rebuilt after the flood of 1911, and the bakers "
    "have their bread in the windows before seven. Every year in September there is a festival with music, a "
    "race for rowing boats and a long table in the main square where the whole town eats together."
)
POSITIONS = 256


def step_logits(path: Path, ids: list[int], float_activations: bool) -> np.ndarray:
    model = load_model(path, ctx_size=512, ubatch_size=MATVEC_MAX_T, cache_type_k="f32",
                       float_activations=float_activations)
    return model.eval(ids, model.new_cache(512), all_logits=True).astype(np.float64)


def compare(path: Path, ids: list[int]) -> tuple[float, float]:
    """(top-1 agreement, mean KL(float || int8)) over the positions of ids."""
    exact, fast = step_logits(path, ids, True), step_logits(path, ids, False)
    lp, lq = (z - z.max(-1, keepdims=True) for z in (exact, fast))
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    assert not np.array_equal(exact, fast)  # the two paths really differ
    return float((exact.argmax(-1) == fast.argmax(-1)).mean()), float(kl.mean())


@pytest.mark.slow
def test_smollm2_int8_path_against_float(smollm2_path: Path) -> None:
    model = load_model(smollm2_path, ctx_size=512)
    ids = model.tokenize(TEXT)[:POSITIONS]
    assert len(ids) >= 128
    top1, kl = compare(smollm2_path, ids)
    print(f"SmolLM2 Q4_1: top-1 {top1:.4f}, mean KL {kl:.2e} over {len(ids)} positions")
    assert top1 >= 0.99 and kl <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["Q4_K", "Q8_0"])
def test_deepseek2_int8_path_against_float(tmp_path: Path, dtype: str) -> None:
    spec = dataclasses.replace(DEFAULT_SPEC, dtype=dtype, init_std=0.05)  # larger weights: peaked distributions
    path = write_model(tmp_path / f"m-{dtype}.gguf", spec)
    ids = np.random.default_rng(5).integers(0, spec.vocab, POSITIONS).tolist()
    top1, kl = compare(path, ids)
    print(f"deepseek2 {dtype}: top-1 {top1:.4f}, mean KL {kl:.2e} over {len(ids)} positions")
    assert top1 >= 0.99 and kl <= 1e-3

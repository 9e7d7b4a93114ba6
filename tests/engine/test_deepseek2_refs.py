"""The deepseek2 forward pass against llama.cpp's own logits and layer-1 intermediates (shared/refs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine import load_model
from engine.batch import Batch
from engine.deepseek2 import DeepSeek2
from engine.gguf_file import GGUFFile
from engine.moe import route
from engine.ops import rms_norm
from tests.refs import REFS

MODELS = ["open-v2", "open-v3"]


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return json.loads((REFS / "tokens.json").read_text())["tokens"]


def test_refs_are_present() -> None:
    # The reference set ships beside the repository (../shared/refs); without it these tests prove nothing.
    assert (REFS / "open-v3.gguf").is_file(), f"missing {REFS}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mla", [0, 1, 3])
def test_batch_logits_match_llama_cpp(name: str, mla: int, ids: list[int]) -> None:
    model = load_model(REFS / f"{name}.gguf", cache_type_k="f32", mla=mla)
    ref = np.load(REFS / f"{name}.logits.batch.npy")
    ours = model.logits(ids)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mla", [0, 1, 3])
def test_step_logits_match_llama_cpp(name: str, mla: int, ids: list[int]) -> None:
    model = load_model(REFS / f"{name}.gguf", cache_type_k="f32", mla=mla)
    ref = np.load(REFS / f"{name}.logits.step.npy")
    cache = model.new_cache(64)
    ours = np.concatenate([model.eval([t], cache) for t in ids])
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_layer1_intermediates(name: str, ids: list[int]) -> None:
    """Layer by layer through the model's own pieces: attn_norm, routing (ids as sets, weights), l_out."""
    inter = REFS / f"{name}.inter"
    net = DeepSeek2(GGUFFile(REFS / f"{name}.gguf"), mla=1)
    cache = net.new_cache(64, "f32")
    positions = np.arange(len(ids))
    cache.reserve(len(ids))
    batch = Batch.of([cache], [len(ids)])
    x0 = net.token_embd.rows(np.array(ids))

    def layer(i: int, x: np.ndarray) -> np.ndarray:  # the layer's ops, as a forward pass runs them
        state = {"x": x}
        for op in (op for op in net.ops() if op[0] == i):
            net.run_op(op, state, positions, batch)
        return state["x"]

    x1 = layer(0, x0)
    L = net.layers[1]
    h = rms_norm(x1, L.attn_norm, net.cfg.rms_norm_eps)
    assert np.abs(h - np.load(inter / "attn_norm-1.npy")).max() <= 1e-4
    x_attn = x1 + net._attention(1, L, h, positions, batch)
    h2 = rms_norm(x_attn, L.ffn_norm, net.cfg.rms_norm_eps)
    idx, w = route(net.router, L.gate_inp.matmul_t(h2), L.probs_bias)
    ref_idx = np.load(inter / "ffn_moe_topk-1.npy")
    wname = "ffn_moe_weights_scaled-1.npy" if name == "open-v3" else "ffn_moe_weights-1.npy"
    ref_w = np.load(inter / wname)[..., 0]
    for t in range(len(ids)):
        assert set(idx[t]) == set(ref_idx[t]), f"token {t}: experts {idx[t]} vs llama.cpp {ref_idx[t]}"
        ours = dict(zip(idx[t].tolist(), w[t].tolist(), strict=True))
        for e, rw in zip(ref_idx[t].tolist(), ref_w[t].tolist(), strict=True):
            assert abs(ours[e] - rw) <= 1e-5
    x2 = layer(1, x1)  # rewrites the same layer-1 cache rows
    assert np.abs(x2 - np.load(inter / "l_out-1.npy")).max() <= 1e-4


"""A tiny deepseek2 model quantized by ik_llama.cpp itself with a mixed recipe (ik_refs/model/, made by
ik_refs/make_model_ref.sh): ikctl reads it in its encoding and its logits match ik_llama.cpp's."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from engine import kernels, load_model
from engine.gguf_file import GGUFFile
from engine.ik_types import is_ik

MODEL_DIR = Path(__file__).parent / "ik_refs" / "model"
MODEL = MODEL_DIR / "ik-mixed.gguf"
# ik_llama.cpp quantizes activations to 8 bits in its products, ikctl's decoder path does not: the logits differ
# by that rounding (mean KL ~7e-5 at the time of writing), far below what a wrong decoder or row order gives (a
# reversed row-group order in one expert tensor: KL ~0.08; ignoring quantization altogether: ~9e-3).
MAX_MEAN_KL = 1e-3
MIN_TOP1 = 0.99


def ik_tokens() -> list[int]:
    return [int(t) for t in (MODEL_DIR / "ik-mixed.tokens.txt").read_text().split()]


def ik_logits() -> np.ndarray:
    """ik_llama.cpp's float32 logits [positions, vocab] of ik_tokens(), from one batch."""
    raw = gzip.decompress((MODEL_DIR / "ik-mixed.logits.f32.gz").read_bytes())
    return np.frombuffer(raw, "<f4").reshape(len(ik_tokens()), -1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(want || got)) over positions."""
    p, q = _log_softmax(want), _log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(axis=1)
    return float((got.argmax(axis=1) == want.argmax(axis=1)).mean()), float(kl.mean())


def test_the_file_holds_ik_types_in_their_encoding() -> None:
    f = GGUFFile(MODEL)
    types = {n: t.qtype_name for n, t in f.tensors.items()}
    assert types["blk.1.ffn_gate_exps.weight"] == "IQ4_KS" and types["blk.2.ffn_up_exps.weight"] == "IQ2_K_R4"
    assert types["blk.1.ffn_down_exps.weight"] == "Q6_0" and types["blk.0.ffn_down.weight"] == "Q6_0_R4"
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q_a.weight"] == "Q8_0"
    ik = {name: t.qtype_name for name, t in f.tensors.items() if is_ik(t.qtype)}
    assert len(ik) == 15 and len(set(ik.values())) == 9, ik  # every FFN matrix; nine ik types


def test_logits_match_ik_llama() -> None:
    want = ik_logits()
    got = load_model(MODEL, ctx_size=512).logits(ik_tokens())
    assert got.shape == want.shape == (256, 288)
    top1, kl = agreement(got, want)
    assert top1 >= MIN_TOP1 and kl <= MAX_MEAN_KL, (top1, kl)


def test_step_logits_match_ik_llama() -> None:
    """Token by token: the decode-sized products run on the fused integer kernels (IQ4_KS, IQ2_K_R4, IQ4_K,
    IQ3_K, IQ5_KS, Q6_0 here) and the rest on the decoder path, and still match ik_llama.cpp's batch logits."""
    model = load_model(MODEL, ctx_size=512)
    fused = {t.qtype_name for t in model.gguf.tensors.values() if is_ik(t.qtype) and kernels.fused(t.qtype)}
    assert fused >= {"IQ4_KS", "IQ2_K_R4", "IQ4_K", "IQ3_K", "IQ5_KS", "Q6_0"}
    ids = ik_tokens()
    cache = model.new_cache()
    got = np.stack([model.eval([t], cache)[-1] for t in ids])
    top1, kl = agreement(got, ik_logits()[: len(ids)])
    assert top1 >= MIN_TOP1 and kl <= MAX_MEAN_KL, (top1, kl)

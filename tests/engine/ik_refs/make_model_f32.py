"""Writes the F32 source of the ik_llama.cpp-quantized test model (run by make_model_ref.sh, never by tests).

usage: python tests/engine/ik_refs/make_model_f32.py OUT.gguf TOKENS.txt

A seeded deepseek2 model from engine.synth in the shape ik_llama.cpp loads with -mla 0 (q_lora present, legacy
attn_kv_b, expert_weights_scale written), every matrix row a multiple of 256 or 32 values so the ik types apply.
Random weights give near-tied top-2 logits at a few percent of positions, and ik_llama.cpp quantizes activations
to 8 bits in its products, which flips such ties; so output.weight gets TIE times token_embd.weight added (a copy
bias, as trained models have clearly separated top tokens), keeping the rest of the distribution random.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from engine.gguf_file import GGUFFile
from engine.synth import SynthSpec, write_model

SPEC = SynthSpec(
    hidden=256, layers=3, dense_layers=1, heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope=24, qk_rope=8,
    v_head=16, experts=4, top_k=4, shared_experts=1, expert_ffn=64, dense_ffn=64, vocab=288, gating="softmax",
    expert_weights_scale=1.5, kv_b_form="legacy", dtype="F32", init_std=0.05, seed=18, name="ik-mixed",
)
TIE = 0.15
EMBED_SCALE = 6.0
N_TOKENS = 256


def main(out: Path, tokens: Path) -> None:
    write_model(out, SPEC)
    f = GGUFFile(out)
    emb, head = f.tensors["token_embd.weight"], f.tensors["output.weight"]
    assert emb.shape == head.shape and emb.qtype_name == head.qtype_name == "F32"
    data = np.memmap(out, np.float32, "r+")
    data[emb.offset // 4 : (emb.offset + emb.n_bytes) // 4] *= np.float32(EMBED_SCALE)
    e = np.array(data[emb.offset // 4 : (emb.offset + emb.n_bytes) // 4])
    data[head.offset // 4 : (head.offset + head.n_bytes) // 4] += np.float32(TIE) * e
    data.flush()
    del data, f
    ids = [SPEC.vocab - 2, *np.random.default_rng(18).integers(0, SPEC.vocab - 2, N_TOKENS - 1).tolist()]  # BOS first
    tokens.write_text(" ".join(map(str, ids)) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""The tensors of a synthetic deepseek2 model: which ones, in llama.cpp's converter order, their seeded values and
their on-disk encoding (engine.synth writes them).

Legend: D hidden, H heads, dn/dr/dv nope/rope/value head dims, r kv_lora_rank, E experts, Fe expert FFN.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, NamedTuple

import gguf
import numpy as np

from engine import kquants

if TYPE_CHECKING:
    from engine.synth import SynthSpec

# llama-quant.cpp's substitutes for rows that are not a multiple of 256 (F16 if still not a block multiple).
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class TensorPlan(NamedTuple):
    """One tensor to write: NumPy shape (ggml ne reversed) and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    kind: str  # weight | norm | bias | k_b | v_b (the last two are cut from one attn_kv_b draw)


def tensor_plan(s: SynthSpec) -> list[TensorPlan]:
    """The tensors in llama.cpp's converter order."""
    D, H, r, dn, dr, dv = s.hidden, s.heads, s.kv_lora_rank, s.qk_nope, s.qk_rope, s.v_head
    out = [TensorPlan("token_embd.weight", (s.vocab, D), "weight"),
           TensorPlan("output_norm.weight", (D,), "norm"),
           TensorPlan("output.weight", (s.vocab, D), "weight")]
    for i in range(s.layers):
        p = f"blk.{i}."

        def t(name: str, shape: tuple[int, ...], kind: str = "weight", p: str = p) -> None:
            out.append(TensorPlan(p + name, shape, kind))

        t("attn_norm.weight", (D,), "norm")
        if s.q_lora_rank:
            t("attn_q_a_norm.weight", (s.q_lora_rank,), "norm")
            t("attn_q_a.weight", (s.q_lora_rank, D))
            t("attn_q_b.weight", (H * (dn + dr), s.q_lora_rank))
        else:
            t("attn_q.weight", (H * (dn + dr), D))
        t("attn_kv_a_norm.weight", (r,), "norm")
        t("attn_kv_a_mqa.weight", (r + dr, D))
        if s.kv_b_form == "split":
            t("attn_k_b.weight", (H, r, dn), "k_b")
            t("attn_v_b.weight", (H, dv, r), "v_b")
        else:
            t("attn_kv_b.weight", (H * (dn + dv), r))
        t("attn_output.weight", (D, H * dv))
        t("ffn_norm.weight", (D,), "norm")
        if i < s.dense_layers:
            t("ffn_gate.weight", (s.dense_ffn, D))
            t("ffn_up.weight", (s.dense_ffn, D))
            t("ffn_down.weight", (D, s.dense_ffn))
            continue
        E, Fe, Fs = s.experts, s.expert_ffn, s.shared_experts * s.expert_ffn
        t("ffn_gate_inp.weight", (E, D))
        if s.gating == "sigmoid":
            t("exp_probs_b.bias", (E,), "bias")
        t("ffn_gate_exps.weight", (E, Fe, D))
        t("ffn_up_exps.weight", (E, Fe, D))
        t("ffn_down_exps.weight", (E, D, Fe))
        if Fs:
            t("ffn_gate_shexp.weight", (Fs, D))
            t("ffn_up_shexp.weight", (Fs, D))
            t("ffn_down_shexp.weight", (D, Fs))
    return out


def param_count(s: SynthSpec) -> int:
    return sum(int(np.prod(t.shape)) for t in tensor_plan(s))


def _normal(s: SynthSpec, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    rng = np.random.default_rng([s.seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def tensor_values(s: SynthSpec, t: TensorPlan) -> np.ndarray:
    """The float32 values of one tensor (a pure function of the spec's seed and the tensor name)."""
    if t.kind == "norm":  # 1 + noise, so that swapping two norm tensors changes the output
        return np.float32(1) + _normal(s, t.name, t.shape, s.norm_noise)
    if t.kind == "bias":
        return _normal(s, t.name, t.shape, s.probs_bias_std)
    if t.kind in ("k_b", "v_b"):
        # cut from the legacy tensor's draw, so both forms hold the same function (llama.cpp's convert split)
        H, dn, dv, r = s.heads, s.qk_nope, s.v_head, s.kv_lora_rank
        kv_name = t.name.replace("attn_k_b", "attn_kv_b").replace("attn_v_b", "attn_kv_b")
        kv = _normal(s, kv_name, (H * (dn + dv), r), s.init_std).reshape(H, dn + dv, r)
        part = kv[:, :dn].transpose(0, 2, 1) if t.kind == "k_b" else kv[:, dn:]  # [H, r, dn] / [H, dv, r]
        return np.ascontiguousarray(part)
    return _normal(s, t.name, t.shape, s.init_std)


def tensor_qtype(s: SynthSpec, t: TensorPlan) -> str:
    """The GGML type name for a tensor: norms, biases and the router stay F32 (as llama.cpp keeps them)."""
    if len(t.shape) == 1 or t.name.endswith("ffn_gate_inp.weight"):
        return "F32"
    name = s.dtype
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]
    if t.shape[-1] % block:
        name = _FALLBACK.get(name, "F16")
        if t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]:
            name = "F16"
    return name


def encode(values: np.ndarray, qtype: str) -> np.ndarray:
    """Values in the on-disk encoding of `qtype` (float arrays for F32/F16, uint8 blocks otherwise)."""
    if qtype == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype in kquants.supported():
        return kquants.quantize(values, qtype)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])


def encoded_bytes(shape: tuple[int, ...], qtype: str) -> int:
    block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return int(np.prod(shape[:-1])) * shape[-1] // block * type_bytes

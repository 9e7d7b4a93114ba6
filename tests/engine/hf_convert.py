"""Hugging Face DeepseekV2/V3ForCausalLM (state_dict + config) -> `deepseek2` GGUF, for tests.

It writes the metadata keys and tensor names of llama.cpp's converter (`conversion/deepseek.py`,
`DeepseekV2Model.set_gguf_parameters` / `modify_tensors`, plus the generic keys of
`conversion/base.py` `TextModel.set_gguf_parameters`), with the HF -> GGUF names taken from
`gguf.get_tensor_name_map(MODEL_ARCH.DEEPSEEK2)` exactly as the converter does:

- experts are stacked on a new axis 0 (`ffn_{gate,up,down}_exps`, NumPy (E, F, D) / (E, D, F));
- `mlp.gate.e_score_correction_bias` -> `blk.N.exp_probs_b.bias`;
- `kv_b_proj` is written either in the current **split** form (`attn_k_b` (H, r, dn) = k part transposed,
  `attn_v_b` (H, dv, r), `head_count_kv` 1, key/value_length r+dr / r, plus key/value_length_mla) or in
  the pre-April-2025 **legacy** form (one `attn_kv_b`, `head_count_kv` H, key/value_length dk / dv, no
  *_mla keys);
- nothing is permuted: HF V2's complex-pair RoPE and HF V3's `rope_interleave=True` both rotate adjacent pairs
  (x[2i], x[2i+1]) of the original weights' outputs, which is llama.cpp's NORM rope (spec §3.1).

All tensors are written as F32. A minimal byte-level `gpt2` vocabulary (256 byte tokens, a few merges,
BOS/EOS, `[PAD{i}]` up to vocab_size) makes the file complete.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

ARCH = "deepseek2"
KV_B_FORMS = ("split", "legacy")
BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
_MERGES = [("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"), ("Ġt", "he"), ("e", "r")]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token spelling)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor
        t = t.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def _hparams(config: Any) -> dict[str, Any]:
    h = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return h


def rope_parameters(h: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings: transformers 5 `rope_parameters` (with rope_theta), 4.x `rope_scaling` + rope_theta."""
    rp = dict(h.get("rope_parameters") or {})
    if not rp:
        rp = dict(h.get("rope_scaling") or {})
        if "rope_theta" in h:
            rp.setdefault("rope_theta", h["rope_theta"])
    if "rope_type" not in rp and "type" in rp:
        rp["rope_type"] = rp["type"]
    return rp


def _write_metadata(w: gguf.GGUFWriter, h: Mapping[str, Any], kv_b_form: str, name: str, is_v3: bool) -> None:
    n_layer = int(h["num_hidden_layers"])
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # ---- TextModel.set_gguf_parameters (generic keys) ----
    w.add_block_count(n_layer)
    w.add_context_length(int(h["max_position_embeddings"]))
    w.add_embedding_length(int(h["hidden_size"]))
    w.add_feed_forward_length(int(h["intermediate_size"]))
    w.add_head_count(int(h["num_attention_heads"]))
    if kv_b_form == "split":
        w.add_head_count_kv(1)  # the converter overwrites num_key_value_heads with 1 (MLA runs as MQA)
    else:
        w.add_head_count_kv(int(h.get("num_key_value_heads") or h["num_attention_heads"]))
    rp = rope_parameters(h)
    rope_type = rp.get("rope_type")
    factor = rp.get("factor")
    if rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        if (ext := rp.get("extrapolation_factor")) is not None:
            w.add_rope_scaling_yarn_ext_factor(float(ext))
        if (af := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(float(af))
        if (bf := rp.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(float(bf))
        if (bs := rp.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(float(bs))
    elif rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type not in (None, "default"):
        raise ValueError(f"rope type {rope_type!r} is not handled by this test converter")
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(h.get("rms_norm_eps") or 1e-6))
    w.add_expert_used_count(int(h["num_experts_per_tok"]))
    if h.get("n_group") is not None:
        w.add_expert_group_count(int(h["n_group"]))
    if h.get("topk_group") is not None:
        w.add_expert_group_used_count(int(h["topk_group"]))
    # A real config.json carries scoring_func ("softmax" for V2, "sigmoid" for V3); transformers' config
    # classes drop it because their routers hard-code it (V2: softmax, V3: sigmoid + e_score_correction_bias).
    score = h.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
    if score == "sigmoid":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    elif score == "softmax":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    else:
        raise ValueError(f"scoring_func {score!r}")
    # ---- DeepseekV2Model.set_gguf_parameters ----
    fkd = h.get("first_k_dense_replace")
    w.add_leading_dense_block_count(int(fkd) if fkd is not None else 0)
    r = int(h["kv_lora_rank"])
    dn, dr, dv = int(h["qk_nope_head_dim"]), int(h["qk_rope_head_dim"]), int(h["v_head_dim"])
    w.add_vocab_size(int(h["vocab_size"]))
    if h.get("q_lora_rank") is not None:
        w.add_q_lora_rank(int(h["q_lora_rank"]))
    w.add_kv_lora_rank(r)
    if kv_b_form == "split":
        w.add_key_length(r + dr)
        w.add_value_length(r)
        w.add_key_length_mla(dn + dr)
        w.add_value_length_mla(dv)
    else:  # what the converter wrote before ggml-org/llama.cpp PR #12801
        w.add_key_length(dn + dr)
        w.add_value_length(dv)
    w.add_expert_feed_forward_length(int(h["moe_intermediate_size"]))
    w.add_expert_count(int(h["n_routed_experts"]))
    w.add_expert_shared_count(int(h.get("n_shared_experts") or 0))
    if h.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(float(h["routed_scaling_factor"]))
    if h.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(dr)
    if (m_all := rp.get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * float(m_all))  # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]


def _write_vocab(w: gguf.GGUFWriter, vocab_size: int, is_v3: bool) -> None:
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    types = [gguf.TokenType.NORMAL] * 256
    merges = []
    for a, b in _MERGES:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(gguf.TokenType.NORMAL)
    bos = len(tokens)
    tokens += [BOS_TEXT, EOS_TEXT]
    types += [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < {len(tokens)} tokens of the minimal vocabulary")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3" if is_v3 else "deepseek-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(bos + 1)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def gguf_tensors(
    state_dict: Mapping[str, Any], config: Any, kv_b_form: str = "split"
) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (NumPy shape = reversed ggml ne), in the converter's order."""
    if kv_b_form not in KV_B_FORMS:
        raise ValueError(f"kv_b_form must be one of {KV_B_FORMS}")
    h = _hparams(config)
    n_layer = int(h["num_hidden_layers"])
    H = int(h["num_attention_heads"])
    dn, dv = int(h["qk_nope_head_dim"]), int(h["v_head_dim"])
    n_exp = int(h["n_routed_experts"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layer)
    out: dict[str, np.ndarray] = {}

    def put(hf_name: str, data: np.ndarray) -> None:
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"cannot map tensor {hf_name!r}")
        if new in out:
            raise ValueError(f"duplicate tensor {new!r} (from {hf_name!r})")
        out[new] = data

    experts: dict[int, dict[str, np.ndarray]] = {}
    for name, t in state_dict.items():
        if name.endswith("rotary_emb.inv_freq") or ".rotary_emb." in name:
            continue
        if h.get("tie_word_embeddings") and name in ("lm_head.weight", "model.lm_head.weight"):
            continue
        m = re.match(r"model\.layers\.(\d+)\.", name)
        bid = int(m.group(1)) if m else None
        if bid is not None and bid >= n_layer:
            continue  # MTP layers
        data = _np(t)
        if name.endswith("e_score_correction_bias"):
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # conversion/base.py
        if bid is not None and ".mlp.experts." in name:
            slot = experts.setdefault(bid, {})
            if name.endswith("mlp.experts.gate_up_proj"):  # transformers >= 5 fused form: (E, 2F, D)
                F = data.shape[1] // 2
                slot["gate_proj"], slot["up_proj"] = data[:, :F], data[:, F:]
            elif name.endswith("mlp.experts.down_proj"):  # fused form: (E, D, F)
                slot["down_proj"] = data
            else:
                em = re.search(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
                if em is None:
                    raise ValueError(f"unexpected expert tensor {name!r}")
                slot[f"{em.group(2)}.{int(em.group(1))}"] = data
            if _experts_complete(slot, n_exp):
                for w_name in ("down_proj", "gate_proj", "up_proj"):
                    if w_name in slot:
                        stacked = np.ascontiguousarray(slot.pop(w_name))
                    else:
                        stacked = np.stack([slot.pop(f"{w_name}.{e}") for e in range(n_exp)], axis=0)
                    assert stacked.shape[0] == n_exp
                    put(f"model.layers.{bid}.mlp.experts.{w_name}.weight", stacked)
            continue
        if name.endswith("kv_b_proj.weight") and kv_b_form == "split":
            assert data.shape[0] == H * (dn + dv), data.shape
            kv_b = data.reshape(H, dn + dv, data.shape[-1])
            k_b = np.ascontiguousarray(kv_b[:, :dn].transpose(0, 2, 1))  # (H, r, dn)
            v_b = np.ascontiguousarray(kv_b[:, dn:])  # (H, dv, r)
            put(name.replace("kv_b_proj", "k_b_proj"), k_b)
            put(name.replace("kv_b_proj", "v_b_proj"), v_b)
            continue
        put(name, data)
    left = {b: sorted(s) for b, s in experts.items() if s}
    if left:
        raise ValueError(f"unprocessed experts: {left}")
    if "output.weight" not in out and not h.get("tie_word_embeddings"):
        raise ValueError("lm_head.weight is missing and the embeddings are not tied")
    return out


def _experts_complete(slot: Mapping[str, np.ndarray], n_exp: int) -> bool:
    for w_name in ("down_proj", "gate_proj", "up_proj"):
        if w_name not in slot and not all(f"{w_name}.{e}" in slot for e in range(n_exp)):
            return False
    return True


def convert(
    state_dict: Mapping[str, Any],
    config: Any,
    path: str | os.PathLike[str],
    kv_b_form: str = "split",
    name: str = "hf-deepseek-test",
) -> dict[str, np.ndarray]:
    """Write `path`; returns the tensors written (GGUF names -> arrays)."""
    h = _hparams(config)
    archs = h.get("architectures") or []
    is_v3 = h.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in archs
    if is_v3 and h.get("rope_interleave") is False:
        # llama.cpp's converter does not permute anything; with rope_interleave=False HF V3 rotates halves
        # (NEOX), which a deepseek2 GGUF (NORM rope) cannot express without permuting q_pe / k_pe rows.
        raise ValueError("rope_interleave=False is not what llama.cpp's deepseek2 conversion assumes")
    tensors = gguf_tensors(state_dict, config, kv_b_form)
    w = gguf.GGUFWriter(os.fspath(path), ARCH)
    try:
        _write_metadata(w, h, kv_b_form, name, is_v3)
        _write_vocab(w, int(h["vocab_size"]), is_v3)
        for tname, data in tensors.items():
            w.add_tensor(tname, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return tensors

"""Seeded random-weight deepseek2 GGUF models, written tensor by tensor in llama.cpp's converter layout.

The layout (metadata keys and their order, tensor names, shapes and types) mirrors the generator that made
the llama.cpp reference GGUFs in shared/refs; with that generator's flags `write_model` reproduces those files
byte for byte. Every tensor is drawn from `numpy.random.default_rng([seed, zlib.crc32(name)])`, so each one
can be made alone and a 0.7B-parameter model never needs all its weights in memory at once.

Legend: D hidden, H heads, dn/dr/dv nope/rope/value head dims, r kv_lora_rank, rq q_lora_rank, E experts,
Fe expert FFN, F dense FFN, V vocab.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from engine.synth_tensors import (  # noqa: F401  (part of this module's interface)
    TensorPlan,
    encode,
    encoded_bytes,
    param_count,
    tensor_plan,
    tensor_qtype,
    tensor_values,
)
from engine.synth_vocab import BOS_TEXT, EOS_TEXT, Vocab, bpe_merges, byte_tokens, make_vocab  # noqa: F401
from engine.user_cache import cache_dir

if TYPE_CHECKING:
    import gguf

ARCH = "deepseek2"
# DeepSeek-V3's prompt format with its role markers as plain text (they are not tokens of this vocabulary).
CHAT_TEMPLATE_V3 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<｜Assistant｜>' + message['content'] + '" + EOS_TEXT + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"none": "", "deepseek-v3": CHAT_TEMPLATE_V3}

# Types the writer can encode: gguf's own quantizers, plus engine.kquants for the K-quants.
DTYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# general.file_type is MOSTLY_<dtype> but for these; all-Q4_K/Q5_K files are closest to llama.cpp's "_S" mixes
_FILE_TYPES = {"F32": "ALL_F32", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}
_MIN_VOCAB = 256 + 30 + 2  # bytes, the fixed merges, BOS and EOS
# Part of the cached default model's name: bump it when the same spec would give different bytes.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SynthSpec:
    """Hyper-parameters of a synthetic model; field names follow the generator's flags (`--q-lora-rank` ...).

    The defaults are the reference models' shared shape (hidden 128, 3 layers, 8 experts...).
    """

    hidden: int = 128
    layers: int = 3
    dense_layers: int = 1
    heads: int = 4
    q_lora_rank: int = 0  # 0: plain attn_q
    kv_lora_rank: int = 32
    qk_nope: int = 24
    qk_rope: int = 8
    v_head: int = 16
    experts: int = 8
    top_k: int = 2
    shared_experts: int = 1
    expert_ffn: int = 48
    dense_ffn: int = 192
    vocab: int = 288
    gating: str = "softmax"  # softmax | sigmoid (sigmoid adds the exp_probs_b selection bias)
    expert_groups: int = 1
    expert_groups_used: int = 1
    expert_weights_norm: bool = False
    expert_weights_scale: float = 1.0  # written only when it changes the weights (not 0 or 1)
    yarn: bool = False
    yarn_factor: float = 40.0
    yarn_orig_ctx: int = 4096
    yarn_mscale_all_dim: float = 1.0
    context_length: int = 0  # 0: yarn_factor * yarn_orig_ctx with YaRN, else 4096
    kv_b_form: str = "split"  # split: attn_k_b + attn_v_b (current llama.cpp); legacy: attn_kv_b
    dtype: str = "F32"
    init_std: float = 0.02
    norm_noise: float = 0.1
    probs_bias_std: float = 0.05
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    seed: int = 0
    name: str = "synth-ds2"
    tokenizer_pre: str = "default"
    chat_template: str = ""  # Jinja text; empty: no tokenizer.chat_template key

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError("SynthSpec: " + "; ".join(problems))

    @property
    def n_ctx_train(self) -> int:
        if self.context_length:
            return self.context_length
        return int(self.yarn_factor * self.yarn_orig_ctx) if self.yarn else 4096

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers


def _spec_problems(s: SynthSpec) -> list[str]:
    positive = ("hidden", "layers", "heads", "kv_lora_rank", "qk_nope", "qk_rope", "v_head")
    out = [f"{k} = {getattr(s, k)} must be positive" for k in positive if getattr(s, k) <= 0]
    counts = ("dense_layers", "q_lora_rank", "experts", "shared_experts", "context_length")
    out += [f"{k} = {getattr(s, k)} must not be negative" for k in counts if getattr(s, k) < 0]
    if s.qk_rope % 2:
        out.append(f"qk_rope = {s.qk_rope} must be even (RoPE rotates pairs)")
    if s.vocab < _MIN_VOCAB:
        out.append(f"vocab = {s.vocab} is below {_MIN_VOCAB} (256 bytes, 30 merges, BOS, EOS)")
    if s.dense_layers > s.layers:
        out.append(f"dense_layers = {s.dense_layers} exceeds layers = {s.layers}")
    if s.dense_layers and s.dense_ffn <= 0:
        out.append(f"dense_ffn = {s.dense_ffn} must be positive with {s.dense_layers} dense layers")
    if s.layers > s.dense_layers:
        if s.experts <= 0 or s.expert_ffn <= 0 or not 0 < s.top_k <= s.experts:
            out.append(f"MoE layers need experts > 0, expert_ffn > 0 and 0 < top_k <= experts "
                       f"(got {s.experts}, {s.expert_ffn}, {s.top_k})")
        elif s.expert_groups > 1 and (
            s.experts % s.expert_groups
            or not 0 < s.expert_groups_used <= s.expert_groups
            or s.top_k > s.expert_groups_used * (s.experts // s.expert_groups)
        ):
            out.append(f"expert_groups {s.expert_groups} / used {s.expert_groups_used} must divide "
                       f"{s.experts} experts and leave at least top_k = {s.top_k} of them")
    if s.gating not in ("softmax", "sigmoid"):
        out.append(f"gating = {s.gating!r} must be 'softmax' or 'sigmoid'")
    if s.kv_b_form not in ("split", "legacy"):
        out.append(f"kv_b_form = {s.kv_b_form!r} must be 'split' or 'legacy'")
    if s.dtype not in DTYPES:
        out.append(f"dtype = {s.dtype!r} is not one of {', '.join(DTYPES)}")
    if s.yarn and (s.yarn_factor <= 1 or s.yarn_orig_ctx <= 0):
        out.append(f"YaRN needs yarn_factor > 1 and yarn_orig_ctx > 0 ({s.yarn_factor}, {s.yarn_orig_ctx})")
    return out


DEFAULT_SPEC = SynthSpec(
    hidden=256, layers=4, dense_layers=1, heads=8, q_lora_rank=96, kv_lora_rank=64, qk_nope=32, qk_rope=16,
    v_head=32, experts=16, top_k=4, shared_experts=1, expert_ffn=128, dense_ffn=512, vocab=1024,
    gating="sigmoid", expert_groups=4, expert_groups_used=2, expert_weights_norm=True,
    expert_weights_scale=2.5, yarn=True, yarn_factor=4.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0,
    kv_b_form="split", dtype="Q8_0", seed=20260, name="ikctl-tiny-v3", chat_template=CHAT_TEMPLATE_V3,
)
# A scaled-down DeepSeek-V2-Lite (same head dims ratio, softmax routing, 2 shared experts): ~0.70B parameters.
BENCH_SPEC = SynthSpec(
    hidden=1024, layers=12, dense_layers=1, heads=16, q_lora_rank=0, kv_lora_rank=256, qk_nope=64, qk_rope=32,
    v_head=64, experts=32, top_k=6, shared_experts=2, expert_ffn=512, dense_ffn=2816, vocab=32000,
    gating="softmax", yarn=True, yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=0.707,
    kv_b_form="split", dtype="Q8_0", seed=20261, name="ikctl-bench-v2lite", chat_template=CHAT_TEMPLATE_V3,
)
# DeepSeek-V3's per-layer shapes (attention, expert and dense FFN sizes, sigmoid routing with 8 groups / top 4,
# 8 routed experts + 1 shared, weights scale 2.5), cut to 4 layers (1 dense + 3 MoE) and 16 routed experts: ~3.9B
# parameters, ~2.5B active per token.
# kv_lora 512 / rope 64 is the only split-MLA (attn_k_b/attn_v_b) shape ik_llama.cpp loads.
V3_BENCH_SPEC = SynthSpec(
    hidden=7168, layers=4, dense_layers=1, heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope=128, qk_rope=64,
    v_head=128, experts=16, top_k=8, shared_experts=1, expert_ffn=2048, dense_ffn=18432, vocab=32000,
    gating="sigmoid", expert_groups=8, expert_groups_used=4, expert_weights_norm=True, expert_weights_scale=2.5,
    yarn=True, yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0,
    kv_b_form="split", dtype="F16", seed=20262, name="ikctl-bench-v3", chat_template=CHAT_TEMPLATE_V3,
)
PRESETS = {"refs": SynthSpec(), "default": DEFAULT_SPEC, "bench": BENCH_SPEC, "v3bench": V3_BENCH_SPEC}


# ---- writing -----------------------------------------------------------------------------------------------


def _add_metadata(w: gguf.GGUFWriter, s: SynthSpec) -> None:
    w.add_name(s.name)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES.get(s.dtype, "MOSTLY_" + s.dtype)])
    if s.dtype not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(s.layers)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.dense_ffn)
    w.add_head_count(s.heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_expert_count(s.experts)
    w.add_expert_used_count(s.top_k)
    if s.expert_groups > 1:
        w.add_expert_group_count(s.expert_groups)
        w.add_expert_group_used_count(s.expert_groups_used)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType[s.gating.upper()])
    w.add_leading_dense_block_count(s.dense_layers)
    w.add_vocab_size(s.vocab)
    w.add_q_lora_rank(s.q_lora_rank)
    w.add_kv_lora_rank(s.kv_lora_rank)
    if s.kv_b_form == "split":  # llama.cpp's MLA form: one latent "head" of width r + dr
        w.add_head_count_kv(1)
        w.add_key_length(s.kv_lora_rank + s.qk_rope)
        w.add_value_length(s.kv_lora_rank)
        w.add_key_length_mla(s.qk_nope + s.qk_rope)
        w.add_value_length_mla(s.v_head)
    else:
        w.add_head_count_kv(s.heads)
        w.add_key_length(s.qk_nope + s.qk_rope)
        w.add_value_length(s.v_head)
    w.add_expert_feed_forward_length(s.expert_ffn)
    w.add_expert_shared_count(s.shared_experts)
    if s.expert_weights_scale not in (0.0, 1.0):
        w.add_expert_weights_scale(s.expert_weights_scale)
    if s.expert_weights_norm:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(s.qk_rope)
    if s.yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(s.yarn_orig_ctx)
        w.add_rope_scaling_yarn_log_mul(0.1 * s.yarn_mscale_all_dim)  # llama.cpp divides it by 0.1 again
    v = make_vocab(s.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(s.tokenizer_pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    w.add_bos_token_id(v.bos)
    w.add_eos_token_id(v.eos)
    w.add_pad_token_id(v.eos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if s.chat_template:
        w.add_chat_template(s.chat_template)


def write_model(path: str | os.PathLike[str], spec: SynthSpec) -> Path:
    """Write the model to `path` (atomically: a temp file beside it, renamed when complete) and return it."""
    path = Path(path)
    plan = [(t, tensor_qtype(spec, t)) for t in tensor_plan(spec)]
    w = gguf.GGUFWriter(None, ARCH)
    _add_metadata(w, spec)
    for t, qt in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), encoded_bytes(t.shape, qt),
                          raw_dtype=gguf.GGMLQuantizationType[qt])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, qt in plan:  # one tensor in memory at a time
            w.write_tensor_data(encode(tensor_values(spec, t), qt))
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path


def spec_digest(spec: SynthSpec) -> str:
    """A short name for the bytes `write_model` gives this spec (the spec and the generator version)."""
    key = json.dumps({"generator": GENERATOR_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _write_once(path: Path, spec: SynthSpec) -> Path:
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        write_model(path, spec)
    return path


def bench_model(directory: Path, dtype: str) -> Path:
    """The benchmark model (BENCH_SPEC) in `dtype` under `directory`, written once (used by benchmarks/)."""
    return _write_once(directory / f"bench-v2lite-{dtype.lower()}.gguf", dataclasses.replace(BENCH_SPEC, dtype=dtype))


def v3_bench_model(directory: Path, dtype: str = "F16") -> Path:
    """The DeepSeek-V3-shaped benchmark model (V3_BENCH_SPEC) in `dtype` under `directory`, written once."""
    spec = dataclasses.replace(V3_BENCH_SPEC, dtype=dtype)
    return _write_once(directory / f"bench-v3-{dtype.lower()}.gguf", spec)


def default_model_path() -> Path:
    """The embedded default model in the cache dir, made on first use (its name changes with the spec)."""
    path = cache_dir() / f"{DEFAULT_SPEC.name}-{DEFAULT_SPEC.dtype.lower()}-{spec_digest(DEFAULT_SPEC)}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, DEFAULT_SPEC)
    return path


# ---- CLI ---------------------------------------------------------------------------------------------------

_CHOICES = {"gating": ("softmax", "sigmoid"), "kv_b_form": ("split", "legacy"), "dtype": DTYPES}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.synth", description="Write a seeded deepseek2 GGUF.")
    p.add_argument("out", type=Path, help="output .gguf path")
    p.add_argument("--preset", choices=sorted(PRESETS), default="refs",
                   help="starting spec: refs (the reference models' shape), default (ikctl's embedded "
                        "model), bench (~0.7B, V2-Lite-like), v3bench (~3.9B, DeepSeek-V3's layer shapes); "
                        "flags override it")
    for f in dataclasses.fields(SynthSpec):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(PRESETS["refs"], f.name)
        if f.name == "chat_template":
            p.add_argument(flag, choices=sorted(CHAT_TEMPLATES), default=None)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=type(default), choices=_CHOICES.get(f.name), default=None,
                           metavar=None if f.name in _CHOICES else f.name.upper())
    return p


def spec_from_args(args: argparse.Namespace) -> SynthSpec:
    names = [f.name for f in dataclasses.fields(SynthSpec)]
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if "chat_template" in given:
        given["chat_template"] = CHAT_TEMPLATES[given["chat_template"]]
    return dataclasses.replace(PRESETS[args.preset], **given)


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        p.error(str(e))
    path = write_model(args.out, spec)
    n = param_count(spec)
    size = path.stat().st_size
    print(f"{path}: {spec.name}, {n:,} parameters ({n / 1e9:.3f} B), {spec.dtype}, {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model hyper-parameters read from GGUF metadata into frozen dataclasses, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypeVar

from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile

# Decoded float32 Wk/Wv of all layers are kept when they fit this together (DeepSeek2.kv_weights).
KV_F32_BUDGET = 256 << 20

GATING_SOFTMAX = 1
GATING_SIGMOID = 2


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of `n_rot` dims (adjacent pairs, llama.cpp's NORM type) with optional scaling."""

    n_rot: int
    freq_base: float = 10000.0
    scaling_type: str = "none"  # none | linear | yarn
    factor: float = 1.0
    orig_ctx: int = 0
    yarn_log_multiplier: float | None = None  # GGUF value (= 0.1 * mscale_all_dim); None if absent
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @property
    def is_yarn(self) -> bool:
        return self.scaling_type == "yarn" and self.factor > 1.0

    @property
    def magnitude(self) -> float:
        """Scale applied to cos/sin (llama.cpp cancels YaRN's factor when the log-multiplier key exists)."""
        if self.is_yarn and self.yarn_log_multiplier is None:
            return self.attn_factor * (1.0 + 0.1 * math.log(self.factor))
        return self.attn_factor

    @property
    def attention_mscale(self) -> float:
        """Multiplier of the softmax scale's square root (DeepSeek's mscale)."""
        if not self.is_yarn:
            return 1.0
        if self.yarn_log_multiplier is None:
            return self.attn_factor * (1.0 + 0.1 * math.log(self.factor))
        m_all = self.yarn_log_multiplier / 0.1
        return self.attn_factor * (1.0 + 0.1 * m_all * math.log(self.factor))


def _rope_from_gguf(f: GGUFFile, arch: str, n_rot: int) -> RopeConfig:
    stype = str(f.get(f"{arch}.rope.scaling.type", "none"))
    factor = float(f.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if stype not in ("none", "linear", "yarn"):
        raise ModelFileError(f"{f.path}: rope scaling type '{stype}' is not supported (none, linear, yarn)")
    if stype == "linear" and factor == 1.0:
        stype = "none"
    log_mul = f.get(f"{arch}.rope.scaling.yarn_log_multiplier", None)
    return RopeConfig(
        n_rot=n_rot,
        freq_base=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        scaling_type=stype,
        factor=factor,
        orig_ctx=int(f.get(f"{arch}.rope.scaling.original_context_length", f.get(f"{arch}.context_length"))),
        yarn_log_multiplier=None if log_mul is None else float(log_mul),
        attn_factor=float(f.get(f"{arch}.rope.scaling.attn_factor", 1.0)),
    )


Shape = tuple[int, ...]
ANY = -1  # a dimension of an expected tensor shape that the config does not fix (the vocabulary's rows)


def _ends(D: int) -> dict[str, tuple[Shape, ...]]:
    return {"token_embd.weight": ((ANY, D),), "output.weight": ((ANY, D),), "output_norm.weight": ((D,),)}


def _ffn(D: int, F: int) -> dict[str, tuple[Shape, ...]]:
    return {"ffn_norm.weight": ((D,),), "ffn_gate.weight": ((F, D),), "ffn_up.weight": ((F, D),),
            "ffn_down.weight": ((D, F),)}


def shape_problem(cfg: DeepSeek2Config | LlamaConfig, name: str, shape: Shape) -> str | None:
    """Why tensor `name` cannot have `shape` under cfg (its expected shapes), or None; names cfg does not know
    pass (they are never read)."""
    base = name.split(".", 2)[2] if name.startswith("blk.") and name.count(".") >= 2 else name
    allowed = cfg.tensor_shapes().get(base)
    if allowed is None or any(len(a) == len(shape) and all(e in (ANY, d) for e, d in zip(a, shape, strict=True))
                              for a in allowed):
        return None
    return f"tensor '{name}' has shape {list(shape)}; the model config makes it " + \
        " or ".join(str([("any" if e == ANY else e) for e in a]) for a in allowed)


Config = TypeVar("Config", "DeepSeek2Config", "LlamaConfig")


def checked_against(f: GGUFFile, cfg: Config) -> Config:
    """cfg, once its rope dims and the file's tensor shapes agree with it (a ModelFileError naming the first that
    does not: the forward pass would otherwise fail deep inside, or size its tables by a wrong number)."""
    problem = cfg.rope_problem() or next(
        (p for p in (shape_problem(cfg, n, t.shape) for n, t in f.tensors.items()) if p), None)
    if problem:
        raise ModelFileError(f"{f.path}: {problem}; the file's metadata and tensors disagree")
    return cfg


def _positive(f: GGUFFile, key: str, value: int) -> int:
    if value <= 0:
        raise ModelFileError(f"{f.path}: metadata '{key}' = {value} must be positive")
    return value


@dataclass(frozen=True)
class DeepSeek2Config:
    """DeepSeek-V2/V3 (`deepseek2`) hyper-parameters, DeepSeek's field names."""

    n_vocab: int
    hidden_size: int
    n_layers: int
    n_heads: int
    q_lora_rank: int  # 0: plain attn_q
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int  # dense FFN
    moe_intermediate_size: int
    n_routed_experts: int
    n_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    gating_func: int
    n_group: int
    topk_group: int
    rms_norm_eps: float
    context_length: int
    rope: RopeConfig

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kq_scale(self) -> float:
        return self.rope.attention_mscale**2 / math.sqrt(self.qk_head_dim)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and self.n_routed_experts > 0

    def with_expert_count(self, count: int) -> DeepSeek2Config:
        """The config a worker holding `count` of each layer's experts (a range of a split) runs its segment
        with: its expert tensors have `count` rows and its expert ids count from its range's first."""
        return replace(self, n_routed_experts=count)

    def layer_parts(self, i: int) -> tuple[str, ...]:
        """Layer i's ops in pass order (engine.forward_pass): routed experts after the router's ffn op."""
        return ("attn", "ffn", "moe_experts") if self.is_moe_layer(i) else ("attn", "ffn")

    def kv_weights_bytes(self) -> int:
        """One layer's decoded per-head Wk and Wv (DeepSeek2.kv_weights) in float32."""
        return 4 * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim) * self.kv_lora_rank

    def kept_attn_bytes(self) -> int:
        """What a network keeps decoded per attention layer once made: every layer's Wk/Wv when they fit
        KV_F32_BUDGET together, else nothing (decoded at each use)."""
        kv = self.kv_weights_bytes()
        return kv if self.n_layers * kv <= KV_F32_BUDGET else 0

    def cache_widths(self, mla: int) -> dict[str, int]:
        """Row widths of one layer's KV cache: per-head K and V (-mla 0), else MLA's latent + roped key."""
        if mla == 0:
            return {"k": self.n_heads * self.qk_head_dim, "v": self.n_heads * self.v_head_dim}
        return {"ckv": self.kv_lora_rank + self.qk_rope_head_dim}

    def rope_problem(self) -> str | None:
        """Why the rope dims cannot be these (a peer's program carries them apart from the tensors), or None."""
        if self.rope.n_rot != self.qk_rope_head_dim:
            return f"rope dims {self.rope.n_rot} differ from qk_rope_head_dim {self.qk_rope_head_dim}"
        return None if self.rope.n_rot % 2 == 0 else f"rope dims {self.rope.n_rot} are odd"

    def tensor_shapes(self) -> dict[str, tuple[Shape, ...]]:
        """The NumPy shapes each tensor may have under these hyper-parameters, by name without its `blk.N.`
        (ANY: a dimension the config does not fix); split attn_k_b/attn_v_b come per head or stacked."""
        D, H, r, dn, dr, dv = (self.hidden_size, self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim,
                               self.qk_rope_head_dim, self.v_head_dim)
        q, F, E, Fe = self.q_lora_rank, self.intermediate_size, self.n_routed_experts, self.moe_intermediate_size
        Fs = Fe * self.n_shared_experts
        return {
            **_ends(D), "attn_norm.weight": ((D,),), "attn_q.weight": ((H * (dn + dr), D),),
            "attn_q_a.weight": ((q, D),), "attn_q_a_norm.weight": ((q,),), "attn_q_b.weight": ((H * (dn + dr), q),),
            "attn_kv_a_mqa.weight": ((r + dr, D),), "attn_kv_a_norm.weight": ((r,),),
            "attn_kv_b.weight": ((H * (dn + dv), r),), "attn_k_b.weight": ((H, r, dn), (H * r, dn)),
            "attn_v_b.weight": ((H, dv, r), (H * dv, r)), "attn_output.weight": ((D, H * dv),),
            **_ffn(D, F), "ffn_gate_inp.weight": ((E, D),), "exp_probs_b.bias": ((E,),),
            "ffn_gate_exps.weight": ((E, Fe, D),), "ffn_up_exps.weight": ((E, Fe, D),),
            "ffn_down_exps.weight": ((E, D, Fe),), "ffn_gate_shexp.weight": ((Fs, D),),
            "ffn_up_shexp.weight": ((Fs, D),), "ffn_down_shexp.weight": ((D, Fs),),
        }

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> DeepSeek2Config:
        a = "deepseek2"
        g = f.get
        n_heads = _positive(f, f"{a}.attention.head_count", _scalar(f, f"{a}.attention.head_count"))
        kv_lora = _positive(f, f"{a}.attention.kv_lora_rank", int(g(f"{a}.attention.kv_lora_rank")))
        n_rot = _positive(f, f"{a}.rope.dimension_count", int(g(f"{a}.rope.dimension_count")))
        key_len = int(g(f"{a}.attention.key_length_mla", g(f"{a}.attention.key_length")))
        val_len = int(g(f"{a}.attention.value_length_mla", g(f"{a}.attention.value_length")))
        if f"{a}.attention.key_length_mla" not in f.metadata and key_len == kv_lora + n_rot:
            # split-form file without the *_mla keys (made by the unmerged PR #11446): derive from tensors
            k_b = f.tensors.get("blk.0.attn_k_b.weight")
            v_b = f.tensors.get("blk.0.attn_v_b.weight")
            if k_b is None or v_b is None:
                raise ModelFileError(f"{f.path}: key_length {key_len} = kv_lora + rope but no attn_k_b/attn_v_b")
            key_len = k_b.shape[-1] + n_rot
            val_len = v_b.shape[-2] if len(v_b.shape) == 3 else v_b.shape[0] // n_heads
        if key_len <= n_rot:
            raise ModelFileError(f"{f.path}: key length {key_len} must exceed rope dims {n_rot}")
        n_experts = int(g(f"{a}.expert_count", 0))
        n_used = int(g(f"{a}.expert_used_count", 0))
        if n_experts and not 0 < n_used <= n_experts:
            raise ModelFileError(f"{f.path}: expert_used_count {n_used} must be in 1..expert_count ({n_experts})")
        n_group = int(g(f"{a}.expert_group_count", 0))
        topk_group = int(g(f"{a}.expert_group_used_count", 0))
        if n_group > 1 and (n_experts % n_group or not 0 < topk_group <= n_group):
            raise ModelFileError(
                f"{f.path}: expert groups {n_group}/{topk_group} do not divide {n_experts} experts"
            )
        gating = int(g(f"{a}.expert_gating_func", GATING_SOFTMAX))
        if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise ModelFileError(f"{f.path}: expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
        q_lora = int(g(f"{a}.attention.q_lora_rank", 0)) if "blk.0.attn_q_a.weight" in f.tensors else 0
        return checked_against(f, cls(
            n_vocab=int(g(f"{a}.vocab_size", len(g("tokenizer.ggml.tokens", [])) or 0))
            or f.tensors["token_embd.weight"].shape[0],
            hidden_size=_positive(f, f"{a}.embedding_length", int(g(f"{a}.embedding_length"))),
            n_layers=_positive(f, f"{a}.block_count", int(g(f"{a}.block_count"))),
            n_heads=n_heads,
            q_lora_rank=q_lora,
            kv_lora_rank=kv_lora,
            qk_nope_head_dim=key_len - n_rot,
            qk_rope_head_dim=n_rot,
            v_head_dim=val_len,
            intermediate_size=_scalar(f, f"{a}.feed_forward_length", 0),
            moe_intermediate_size=_scalar(f, f"{a}.expert_feed_forward_length", 0),
            n_routed_experts=n_experts,
            n_experts_per_tok=n_used,
            n_shared_experts=int(g(f"{a}.expert_shared_count", 0)),
            first_k_dense_replace=int(g(f"{a}.leading_dense_block_count", 0)),
            routed_scaling_factor=float(g(f"{a}.expert_weights_scale", 0.0)),
            norm_topk_prob=bool(g(f"{a}.expert_weights_norm", False)),
            gating_func=gating,
            n_group=n_group if n_group > 1 else 1,
            topk_group=topk_group if n_group > 1 else 1,
            rms_norm_eps=float(g(f"{a}.attention.layer_norm_rms_epsilon")),
            context_length=int(g(f"{a}.context_length")),
            rope=_rope_from_gguf(f, a, n_rot),
        ))


def _scalar(f: GGUFFile, key: str, default: int | None = None) -> int:
    """A u32 key that llama.cpp also accepts as a per-layer array; ikctl needs it uniform."""
    v = f.get(key) if default is None else f.get(key, default)
    if isinstance(v, list):
        if len(set(v)) > 1:
            raise ModelFileError(f"{f.path}: per-layer values for '{key}' ({sorted(set(v))}) are not supported")
        v = v[0]
    return int(v)


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-architecture hyper-parameters (dense, grouped-query attention, SwiGLU)."""

    n_vocab: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    context_length: int
    rope: RopeConfig

    def cache_widths(self, mla: int = 0) -> dict[str, int]:
        w = self.n_kv_heads * self.head_dim
        return {"k": w, "v": w}

    def layer_parts(self, i: int) -> tuple[str, ...]:
        return ("attn", "ffn")

    def kept_attn_bytes(self) -> int:
        return 0

    def rope_problem(self) -> str | None:
        """Why the rope dims cannot be these (see DeepSeek2Config.rope_problem), or None."""
        if self.rope.n_rot > self.head_dim or self.rope.n_rot % 2:
            return f"rope dims {self.rope.n_rot} must be even and <= {self.head_dim}"
        return None

    def tensor_shapes(self) -> dict[str, tuple[Shape, ...]]:
        """As DeepSeek2Config.tensor_shapes."""
        D, hd = self.hidden_size, self.head_dim
        return {**_ends(D), "attn_norm.weight": ((D,),), "attn_q.weight": ((self.n_heads * hd, D),),
                "attn_k.weight": ((self.n_kv_heads * hd, D),), "attn_v.weight": ((self.n_kv_heads * hd, D),),
                "attn_output.weight": ((D, self.n_heads * hd),), "rope_freqs.weight": ((self.rope.n_rot // 2,),),
                **_ffn(D, self.intermediate_size)}

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> LlamaConfig:
        a = "llama"
        g = f.get
        hidden = _positive(f, f"{a}.embedding_length", int(g(f"{a}.embedding_length")))
        n_heads = _positive(f, f"{a}.attention.head_count", _scalar(f, f"{a}.attention.head_count"))
        n_kv = _scalar(f, f"{a}.attention.head_count_kv", n_heads)
        if n_heads % n_kv:
            raise ModelFileError(f"{f.path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
        head_dim = int(g(f"{a}.attention.key_length", hidden // n_heads))
        n_rot = int(g(f"{a}.rope.dimension_count", head_dim))
        return checked_against(f, cls(
            n_vocab=int(g(f"{a}.vocab_size", 0)) or f.tensors["token_embd.weight"].shape[0],
            hidden_size=hidden,
            n_layers=_positive(f, f"{a}.block_count", int(g(f"{a}.block_count"))),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=_scalar(f, f"{a}.feed_forward_length"),
            rms_norm_eps=float(g(f"{a}.attention.layer_norm_rms_epsilon")),
            context_length=int(g(f"{a}.context_length")),
            rope=_rope_from_gguf(f, a, n_rot),
        ))

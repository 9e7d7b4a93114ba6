"""The DeepSeek-V2/V3 (`deepseek2`) forward pass: MLA attention (naive or absorbed) and MoE FFN.

Legend: T new tokens, S cached positions, D hidden, H heads, dn/dr/dv nope/rope/value head dims,
r kv_lora_rank, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.attention import causal_attention
from engine.config import GATING_SOFTMAX, DeepSeek2Config
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.kv_cache import KVCache
from engine.moe import Router, moe_ffn, route, swiglu
from engine.ops import rms_norm
from engine.quant import QTensor
from engine.rope import RopeTable, apply_rope

MLA_MODES = (0, 1, 2, 3)
KV_F32_BUDGET = 256 << 20


@dataclass
class Layer:
    attn_norm: np.ndarray
    q: QTensor | None  # without q-LoRA
    q_a: QTensor | None
    q_a_norm: np.ndarray | None
    q_b: QTensor | None
    kv_a: QTensor  # [r + dr, D]
    kv_a_norm: np.ndarray
    kv_b: QTensor | None  # legacy [H * (dn + dv), r]
    k_b: QTensor | None  # split [H, r, dn]
    v_b: QTensor | None  # split [H, dv, r]
    wo: QTensor
    ffn_norm: np.ndarray
    ffn: tuple[QTensor, QTensor, QTensor] | None  # dense gate, up, down
    gate_inp: QTensor | None
    probs_bias: np.ndarray | None
    experts: tuple[QTensor, QTensor, QTensor] | None
    shared: tuple[QTensor, QTensor, QTensor] | None


def load_weight(f: GGUFFile, name: str) -> QTensor:
    info = f.tensors.get(name)
    if info is None:
        raise ModelFileError(f"{f.path}: tensor '{name}' is missing; the file is incomplete or not this architecture")
    return QTensor(name, f.raw(name), info.qtype, info.shape)


def load_vector(f: GGUFFile, name: str) -> np.ndarray:
    return load_weight(f, name).dequantize()


def _optional(f: GGUFFile, name: str) -> QTensor | None:
    return load_weight(f, name) if name in f.tensors else None


class DeepSeek2:
    """Weights of a deepseek2 GGUF, used in place (memory-mapped), and the forward pass over a KVCache."""

    def __init__(self, f: GGUFFile, mla: int = 3, amb_bytes: int = 256 << 20) -> None:
        if mla not in MLA_MODES:
            raise ModelFileError(f"-mla {mla} is not a mode; use 0 (naive), 1/2 (absorbed) or 3 (both)")
        self.cfg = cfg = DeepSeek2Config.from_gguf(f)
        self.mla = mla
        self.amb_bytes = amb_bytes
        self.rope = RopeTable(cfg.rope)
        self.token_embd = load_weight(f, "token_embd.weight")
        self.output_norm = load_vector(f, "output_norm.weight")
        self.output = _optional(f, "output.weight") or self.token_embd
        self.router = Router(
            n_experts_per_tok=cfg.n_experts_per_tok,
            gating_func=cfg.gating_func,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            group_score="max" if cfg.gating_func == GATING_SOFTMAX else "sum2",
        )
        self.layers = [self._load_layer(f, i) for i in range(cfg.n_layers)]
        # Decoded Wk/Wv per layer, kept when all of them fit the budget; otherwise decoded at each use.
        kv_f32_bytes = 4 * cfg.n_layers * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank
        self._kv_f32: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if kv_f32_bytes <= KV_F32_BUDGET else None

    def _load_layer(self, f: GGUFFile, i: int) -> Layer:
        p = f"blk.{i}."
        cfg = self.cfg
        kv_b = _optional(f, p + "attn_kv_b.weight")
        k_b = _optional(f, p + "attn_k_b.weight")
        v_b = _optional(f, p + "attn_v_b.weight")
        if kv_b is None and (k_b is None or v_b is None):
            raise ModelFileError(f"{f.path}: layer {i} has neither attn_kv_b nor attn_k_b + attn_v_b")
        moe = cfg.is_moe_layer(i)
        has_q_a = cfg.q_lora_rank > 0
        return Layer(
            attn_norm=load_vector(f, p + "attn_norm.weight"),
            q=None if has_q_a else load_weight(f, p + "attn_q.weight"),
            q_a=load_weight(f, p + "attn_q_a.weight") if has_q_a else None,
            q_a_norm=load_vector(f, p + "attn_q_a_norm.weight") if has_q_a else None,
            q_b=load_weight(f, p + "attn_q_b.weight") if has_q_a else None,
            kv_a=load_weight(f, p + "attn_kv_a_mqa.weight"),
            kv_a_norm=load_vector(f, p + "attn_kv_a_norm.weight"),
            kv_b=kv_b,
            k_b=k_b,
            v_b=v_b,
            wo=load_weight(f, p + "attn_output.weight"),
            ffn_norm=load_vector(f, p + "ffn_norm.weight"),
            ffn=None if moe else tuple(load_weight(f, p + f"ffn_{n}.weight") for n in ("gate", "up", "down")),
            gate_inp=load_weight(f, p + "ffn_gate_inp.weight") if moe else None,
            probs_bias=load_vector(f, p + "exp_probs_b.bias") if moe and p + "exp_probs_b.bias" in f.tensors else None,
            experts=tuple(load_weight(f, p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down")) if moe else None,
            shared=(
                tuple(load_weight(f, p + f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down"))
                if moe and cfg.n_shared_experts > 0
                else None
            ),
        )

    # ---- cache layout -------------------------------------------------------------------------
    def cache_widths(self) -> dict[str, int]:
        c = self.cfg
        if self.mla == 0:
            return {"k": c.n_heads * c.qk_head_dim, "v": c.n_heads * c.v_head_dim}
        return {"ckv": c.kv_lora_rank + c.qk_rope_head_dim}  # latent c, then the roped key

    def new_cache(self, n_ctx: int, cache_type: str) -> KVCache:
        return KVCache(self.cfg.n_layers, self.cache_widths(), n_ctx, cache_type)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T new tokens after the cached ones; logits [T, V] if all_logits else [1, V] (last token)."""
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        pos0 = cache.reserve(T)
        positions = np.arange(pos0, pos0 + T)
        x = self.token_embd.rows(ids)  # [T, D]
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, positions, cache)
        cache.advance(T)
        rows = x if all_logits else x[-1:]
        return self.output.matmul_t(rms_norm(rows, self.output_norm, self.cfg.rms_norm_eps))

    def _layer(self, i: int, L: Layer, x: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        c = self.cfg
        x = x + self._attention(i, L, rms_norm(x, L.attn_norm, c.rms_norm_eps), positions, cache)
        h = rms_norm(x, L.ffn_norm, c.rms_norm_eps)
        if L.ffn is not None:
            return x + swiglu(h, *L.ffn)
        assert L.gate_inp is not None and L.experts is not None
        idx, w = route(self.router, L.gate_inp.matmul_t(h), L.probs_bias)
        y = moe_ffn(h, idx, w, *L.experts)
        if L.shared is not None:
            y = y + swiglu(h, *L.shared)
        return x + y

    def kv_weights(self, i: int, L: Layer) -> tuple[np.ndarray, np.ndarray]:
        """Per-head decompression matrices Wk [H, dn, r] and Wv [H, dv, r] from whichever form the file has."""
        if self._kv_f32 is not None:
            if i not in self._kv_f32:
                self._kv_f32[i] = self._decode_kv_weights(L)
            return self._kv_f32[i]
        return self._decode_kv_weights(L)

    def _decode_kv_weights(self, L: Layer) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        H, dn, dv, r = c.n_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
        if L.kv_b is not None:
            kv = L.kv_b.dequantize().reshape(H, dn + dv, r)
            return np.ascontiguousarray(kv[:, :dn]), np.ascontiguousarray(kv[:, dn:])
        assert L.k_b is not None and L.v_b is not None
        wk = np.ascontiguousarray(L.k_b.dequantize().reshape(H, r, dn).transpose(0, 2, 1))
        wv = L.v_b.dequantize().reshape(H, dv, r)
        return wk, wv

    def _attention(self, i: int, L: Layer, h: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        c = self.cfg
        T = h.shape[0]
        H, dn, dr, dv, r = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        if L.q is not None:
            q = L.q.matmul_t(h)
        else:
            assert L.q_a is not None and L.q_b is not None
            q = L.q_b.matmul_t(rms_norm(L.q_a.matmul_t(h), L.q_a_norm, c.rms_norm_eps))
        q = q.reshape(T, H, dn + dr)
        kv = L.kv_a.matmul_t(h)  # [T, r + dr]
        latent = rms_norm(kv[:, :r], L.kv_a_norm, c.rms_norm_eps)  # [T, r]
        cos, sin = self.rope.cos_sin(positions)
        q_pe = apply_rope(np.ascontiguousarray(q[..., dn:]), cos, sin)  # [T, H, dr]
        k_pe = apply_rope(np.ascontiguousarray(kv[:, r:]), cos, sin)  # [T, dr], one head shared by all
        q_nope = q[..., :dn]
        wk, wv = self.kv_weights(i, L)
        pos0 = int(positions[0])
        S = pos0 + T
        if self.mla == 0:  # cache decompressed per-head K and V (llama.cpp's legacy MHA path)
            k_nope = (latent @ wk.reshape(H * dn, r).T).reshape(T, H, dn)
            k = np.concatenate([k_nope, np.broadcast_to(k_pe[:, None, :], (T, H, dr))], axis=-1)
            cache.write(i, "k", pos0, k.reshape(T, -1))
            cache.write(i, "v", pos0, latent @ wv.reshape(H * dv, r).T)
            k_all = cache.read(i, "k", S).reshape(S, H, dn + dr)
            v_all = cache.read(i, "v", S).reshape(S, H, dv)
            q_full = np.concatenate([q_nope, q_pe], -1)
            o = causal_attention(q_full, k_all, v_all, positions, c.kq_scale, self.amb_bytes)
        else:
            cache.write(i, "ckv", pos0, np.concatenate([latent, k_pe], axis=-1))
            ckv = cache.read(i, "ckv", S)  # [S, r + dr]
            if self.mla == 3 and T > 1:  # prefill: decompress K/V from the latent cache (fewer FLOPs)
                lat = ckv[:, :r]
                k_nope = (lat @ wk.reshape(H * dn, r).T).reshape(S, H, dn)
                k_all = np.concatenate([k_nope, np.broadcast_to(ckv[:, None, r:], (S, H, dr))], axis=-1)
                v_all = (lat @ wv.reshape(H * dv, r).T).reshape(S, H, dv)
                o = causal_attention(
                    np.concatenate([q_nope, q_pe], -1), k_all, v_all, positions, c.kq_scale, self.amb_bytes
                )
            else:  # absorbed: attention is an MQA over [c | k_pe] rows; V is c itself
                q_abs = np.matmul(q_nope.transpose(1, 0, 2), wk).transpose(1, 0, 2)  # [T, H, r]
                o_lat = causal_attention(
                    np.concatenate([q_abs, q_pe], -1), ckv, ckv[:, :r], positions, c.kq_scale, self.amb_bytes
                )  # [T, H, r]
                o = np.matmul(o_lat.transpose(1, 0, 2), wv.transpose(0, 2, 1)).transpose(1, 0, 2)  # [T, H, dv]
        return L.wo.matmul_t(o.reshape(T, H * dv))

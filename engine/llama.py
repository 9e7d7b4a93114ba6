"""The dense Llama (`llama`) forward pass: RMSNorm, grouped-query attention with RoPE, SwiGLU FFN.

Legend: T new tokens, S cached positions, D hidden, H query heads, Hkv key/value heads,
G = H / Hkv query heads per kv head, hd head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.attention import causal_attention, decode_attention
from engine.batch import Batch, Span
from engine.config import LlamaConfig
from engine.deepseek2 import (
    Getter,
    ends_from_parts,
    gguf_getter,
    load_vector,
    load_weight,
    output_op,
    parts_by_layer,
    required,
)
from engine.errors import ModelFileError
from engine.forward_pass import Op, State, model_ops, run_local
from engine.gguf_file import GGUFFile
from engine.kv_cache import KVCache
from engine.moe import swiglu
from engine.ops import rms_norm
from engine.quant import QTensor
from engine.rope import RopeTable, apply_rope

# Tensors of llama-architecture variants this module does not implement; failing beats wrong logits.
_UNSUPPORTED = {
    "blk.0.ffn_gate_inp.weight": "mixture-of-experts llama (Mixtral-style) layers",
    "blk.0.attn_q.bias": "attention biases",
    "blk.0.attn_k.bias": "attention biases",
    "blk.0.attn_v.bias": "attention biases",
    "blk.0.attn_output.bias": "attention biases",
    "rope_freqs.weight": "per-dimension RoPE frequency factors (Llama 3.1 rope scaling)",
}


@dataclass
class Layer:
    """One layer's weights; a worker's segment holds only its ops' part (the other fields are None)."""

    attn_norm: np.ndarray | None  # [D]
    wq: QTensor | None  # [H * hd, D]
    wk: QTensor | None  # [Hkv * hd, D]
    wv: QTensor | None  # [Hkv * hd, D]
    wo: QTensor | None  # [D, H * hd]
    ffn_norm: np.ndarray | None  # [D]
    ffn: tuple[QTensor, QTensor, QTensor] | None  # gate [F, D], up [F, D], down [D, F]


def load_layer(get: Getter, i: int, parts: Container[str] = ("attn", "ffn"), where: str = "") -> Layer:
    """Layer i from tensors by name (a GGUF file or a worker's cache), only the parts asked for."""
    p = f"blk.{i}."

    def need(name: str) -> QTensor:
        return required(get, p + name, where)

    attn, ffn = "attn" in parts, "ffn" in parts
    return Layer(
        attn_norm=need("attn_norm.weight").dequantize() if attn else None,
        wq=need("attn_q.weight") if attn else None,
        wk=need("attn_k.weight") if attn else None,
        wv=need("attn_v.weight") if attn else None,
        wo=need("attn_output.weight") if attn else None,
        ffn_norm=need("ffn_norm.weight").dequantize() if ffn else None,
        ffn=tuple(need(f"ffn_{n}.weight") for n in ("gate", "up", "down")) if ffn else None,  # type: ignore[arg-type]
    )


def check_supported(f: GGUFFile) -> None:
    """Refuse files that use llama-architecture features this forward pass would silently ignore."""
    for name, what in _UNSUPPORTED.items():
        if name in f.tensors:
            raise ModelFileError(f"{f.path}: {what} ('{name}') are not supported by ikctl's llama forward")


def rope_head(x: np.ndarray, n_rot: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """RoPE on the first n_rot dims of every head, x [T, H, hd]; llama.cpp leaves the rest unrotated."""
    if n_rot == x.shape[-1]:
        return apply_rope(x, cos, sin)
    out = x.copy()
    out[..., :n_rot] = apply_rope(np.ascontiguousarray(x[..., :n_rot]), cos, sin)
    return out


class Llama:
    """Weights of a llama GGUF, used in place (memory-mapped), and the forward pass over a KVCache."""

    xp = np  # activations and KV caches are host arrays (no GPU llama path yet)
    OP_PARTS = ("embd", "attn", "ffn", "output")  # what run_op runs

    def __init__(self, f: GGUFFile, amb_bytes: int = 256 << 20) -> None:
        check_supported(f)
        self._setup(LlamaConfig.from_gguf(f), amb_bytes, where=f"{f.path}: ")
        self.token_embd = load_weight(f, "token_embd.weight")
        self.output_norm = load_vector(f, "output_norm.weight")
        # tied embeddings (SmolLM2, Llama 3.2 1B/3B): the file has no separate output head
        self.output = load_weight(f, "output.weight") if "output.weight" in f.tensors else self.token_embd
        get = gguf_getter(f)
        self.layers = [load_layer(get, i, where=f"{f.path}: ") for i in range(self.cfg.n_layers)]

    @classmethod
    def load(cls, f: GGUFFile, mla: int, amb_bytes: int) -> Llama:
        """The network of a llama file (mla: DeepSeek's attention modes, nothing to choose here)."""
        return cls(f, amb_bytes)

    @classmethod
    def from_parts(cls, cfg: LlamaConfig, get: Getter, ops: Iterable[tuple[int, str]], mla: int = 0,
                   amb_bytes: int = 256 << 20, xp: Any = np) -> Llama:
        """A network holding only the weights of `ops` (a worker's segment); other layers are None. Host arrays
        only (xp NumPy); mla is DeepSeek's and ignored."""
        if xp is not np:
            raise ModelFileError("llama layers cannot run on a GPU yet (CUDA runs deepseek2 models); keep them on "
                                 "the CPU or on CPU workers")
        net = cls.__new__(cls)
        net._setup(cfg, amb_bytes)
        parts = parts_by_layer(ops)
        net.token_embd, net.output_norm, net.output = ends_from_parts(get, cfg.n_layers, parts)
        net.layers = [load_layer(get, i, parts[i]) if i in parts else None  # type: ignore[misc]
                      for i in range(cfg.n_layers)]
        return net

    def _setup(self, cfg: LlamaConfig, amb_bytes: int, where: str = "") -> None:
        problem = cfg.rope_problem()
        if problem:
            raise ModelFileError(f"{where}{problem}")
        self.cfg = cfg
        self.amb_bytes = amb_bytes
        self.rope = RopeTable(cfg.rope)

    # ---- cache layout -------------------------------------------------------------------------
    def cache_widths(self) -> dict[str, int]:
        return self.cfg.cache_widths()

    def new_cache(self, n_ctx: int, cache_type: str) -> KVCache:
        return KVCache(self.cfg.n_layers, self.cache_widths(), n_ctx, cache_type)

    # ---- the pass as ops (engine/forward_pass.py) ----------------------------------------------------------
    def ops(self) -> list[Op]:
        return model_ops(self.cfg.n_layers, self.cfg.layer_parts)

    @staticmethod
    def attention_scratch(c: LlamaConfig, T: int, S: int, kv_decode: bool) -> tuple[int, int]:
        """(floats, heads per key head) that _attention keeps alive at once for T queries over S keys besides its
        score chunk (engine.segments.run_scratch_bytes): projections, rope, the cache read as f32."""
        H, hd, Hkv = c.n_heads, c.head_dim, c.n_kv_heads
        return T * (7 * H * hd + 5 * Hkv * hd) + S * 2 * Hkv * hd, H // max(Hkv, 1)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T new tokens after the cached ones; logits [T, V] if all_logits else [1, V] (last token)."""
        return run_local(self.run_op, self.ops(), [(ids, cache)], all_logits)

    def forward_batch(self, items: Sequence[tuple[np.ndarray, KVCache]]) -> np.ndarray:
        """One pass over several sequences (new token ids, own cache each): each one's last logits [N, V]."""
        return run_local(self.run_op, self.ops(), items)

    def run_op(self, op: Op, state: State, positions: np.ndarray,
               batch: Batch, defer_shared: bool = False) -> None:
        """Apply one op to the pass state in place, as DeepSeek2.run_op: "x" the hidden state [T, D]; "ids" before
        embd; "n_out" (rows of logits wanted per sequence) before output, which leaves only "logits"; `positions`
        and `batch` place the rows. No shared experts here, so defer_shared changes nothing."""
        i, part = op
        eps = self.cfg.rms_norm_eps
        if part == "embd":
            state["x"] = self.token_embd.rows(state.pop("ids"))
        elif part == "output":
            output_op(state, self.output, self.output_norm, eps, batch)
        elif part == "attn":
            L, x = self.layers[i], state["x"]
            cos, sin = self.rope.cos_sin(positions)
            state["x"] = x + self._attention(i, L, rms_norm(x, L.attn_norm, eps), positions, cos, sin, batch)
        elif part == "ffn":
            L, x = self.layers[i], state["x"]
            state["x"] = x + swiglu(rms_norm(x, L.ffn_norm, eps), *L.ffn)
        else:
            raise ValueError(f"unknown op {op} for a llama model")

    def _attention(
        self,
        i: int,
        L: Layer,
        h: np.ndarray,  # [T, D]
        positions: np.ndarray,  # [T]
        cos: np.ndarray,
        sin: np.ndarray,
        batch: Batch,
    ) -> np.ndarray:  # [T, D]
        """Projections over all rows at once; each sequence's cache and attention its own (batch.spans)."""
        c = self.cfg
        T = h.shape[0]
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        q = rope_head(L.wq.matmul_t(h).reshape(T, H, hd), c.rope.n_rot, cos, sin)
        k = rope_head(L.wk.matmul_t(h).reshape(T, Hkv, hd), c.rope.n_rot, cos, sin).reshape(T, Hkv * hd)
        v = L.wv.matmul_t(h)  # [T, Hkv * hd]
        o = np.empty((T, H, hd), np.float32)
        for s in batch.spans:
            assert s.cache is not None, "an attention op needs a KV cache"
            pos0 = int(positions[s.start])
            s.cache.write(i, "k", pos0, k[s.rows])
            s.cache.write(i, "v", pos0, v[s.rows])
            o[s.rows] = self._attend(i, s, q[s.rows], positions[s.rows])
        return L.wo.matmul_t(o.reshape(T, H * hd))

    def _attend(self, i: int, s: Span, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One sequence's queries q [n, H, hd] over its cached rows -> [n, H, hd]."""
        c = self.cfg
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        assert s.cache is not None
        S = int(positions[-1]) + 1
        scale = 1.0 / math.sqrt(hd)
        k_rows, v_rows = s.cache.stored(i, "k", S), s.cache.stored(i, "v", S)
        if s.n == 1 and k_rows is not None and v_rows is not None and isinstance(k_rows, np.ndarray):
            # decode on the host: one kernel reads the f16/f32 cache in place (NumPy would convert all of it)
            return decode_attention(q[0], k_rows, v_rows, Hkv, scale)[None]
        k_all = s.cache.read(i, "k", S).reshape(S, Hkv, hd)
        v_all = s.cache.read(i, "v", S).reshape(S, Hkv, hd)
        # GQA: query head j*G + g reads kv head j (llama.cpp's mapping); each group is an MQA over one
        # shared key head, which avoids materialising G copies of the cache.
        G = H // Hkv
        o = np.empty((s.n, H, hd), np.float32)
        for j in range(Hkv):
            o[:, j * G : (j + 1) * G] = causal_attention(
                q[:, j * G : (j + 1) * G], k_all[:, j], v_all[:, j], positions, scale, self.amb_bytes
            )
        return o

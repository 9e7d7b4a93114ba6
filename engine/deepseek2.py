"""The DeepSeek-V2/V3 (`deepseek2`) forward pass: MLA attention (naive or absorbed) and MoE FFN.

Legend: T new tokens, S cached positions, D hidden, H heads, dn/dr/dv nope/rope/value head dims,
r kv_lora_rank, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.attention import causal_attention
from engine.batch import Batch, Span
from engine.config import GATING_SOFTMAX, DeepSeek2Config
from engine.errors import ModelFileError
from engine.forward_pass import Op, State, model_ops, run_local
from engine.gguf_file import GGUFFile
from engine.kernels import MATVEC_MAX_T, takes_int8
from engine.kv_cache import KVCache
from engine.moe import Router, moe_ffn, route, swiglu
from engine.ops import array_module, rms_norm
from engine.quant import QTensor
from engine.rope import RopeTable, apply_rope

MLA_MODES = (0, 1, 2, 3)


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


LAYER_PARTS = frozenset({"attn", "ffn", "moe_experts"})
Getter = Callable[[str], QTensor | None]


def gguf_getter(f: GGUFFile) -> Getter:
    """name -> QTensor over the file's memory map, None when the file has no such tensor."""
    return lambda name: _optional(f, name)


def required(get: Getter, name: str, where: str = "") -> QTensor:
    """The tensor `name`; its absence is a one-line ModelFileError (`where` names the file)."""
    t = get(name)
    if t is None:
        raise ModelFileError(f"{where}tensor '{name}' is missing; the file is incomplete or not this architecture")
    return t


def output_op(state: dict[str, Any], output: QTensor, output_norm: Any, eps: float, batch: Batch) -> None:
    """The output op on a pass state: logits of each sequence's last "n_out" rows of "x" (one sequence after
    another), and nothing else left."""
    x = state.pop("x")
    n_out = state.pop("n_out")
    if np.ndim(n_out) != 0:  # from a peer: int() of a 1-element array is a TypeError, not a refusal
        raise ValueError(f"n_out must be one number, got an array of shape {list(np.shape(n_out))}")
    rows = batch.out_rows(int(n_out))
    rows = rows if isinstance(rows, slice) else array_module(x).asarray(rows)  # a GPU array takes device indices
    state.clear()
    state["logits"] = output.matmul_t(rms_norm(x[rows], output_norm, eps))


def parts_by_layer(ops: Iterable[tuple[int, str]]) -> dict[int, set[str]]:
    """Ops as {layer: its parts}; -1 is the embedding, n_layers the output."""
    parts: dict[int, set[str]] = {}
    for i, part in ops:
        parts.setdefault(i, set()).add(part)
    return parts


def ends_from_parts(get: Getter, n_layers: int, parts: Container[int]) -> tuple[Any, Any, Any]:
    """(token_embd, output_norm as floats, output) for a segment's ops, None where it has no such op; with tied
    embeddings (no output.weight) the output op reads token_embd."""
    tied = get("output.weight") is None
    # required: a segment program (a peer's) may leave the tensor out, and the op would then run on None
    token_embd = required(get, "token_embd.weight") if -1 in parts or (n_layers in parts and tied) else None
    if n_layers not in parts:
        return token_embd, None, None
    return token_embd, required(get, "output_norm.weight").dequantize(), get("output.weight") or token_embd


def load_layer(get: Getter, cfg: DeepSeek2Config, i: int, parts: Container[str] = LAYER_PARTS,
               where: str = "") -> Layer:
    """Layer i from tensors by name (a GGUF file or a worker's cache); fields of parts not asked for are None."""
    p = f"blk.{i}."

    def need(name: str) -> QTensor:
        return required(get, p + name, where)

    def vector(name: str) -> np.ndarray:
        return need(name).dequantize()

    attn, ffn, exps = "attn" in parts, "ffn" in parts, "moe_experts" in parts
    kv_b, k_b, v_b = (get(p + f"attn_{n}.weight") if attn else None for n in ("kv_b", "k_b", "v_b"))
    if attn and kv_b is None and (k_b is None or v_b is None):
        raise ModelFileError(f"{where}layer {i} has neither attn_kv_b nor attn_k_b + attn_v_b")
    moe = cfg.is_moe_layer(i)
    q_a = attn and cfg.q_lora_rank > 0
    bias = get(p + "exp_probs_b.bias") if ffn and moe else None
    return Layer(
        attn_norm=vector("attn_norm.weight") if attn else None,  # type: ignore[arg-type]
        q=need("attn_q.weight") if attn and not q_a else None,
        q_a=need("attn_q_a.weight") if q_a else None,
        q_a_norm=vector("attn_q_a_norm.weight") if q_a else None,
        q_b=need("attn_q_b.weight") if q_a else None,
        kv_a=need("attn_kv_a_mqa.weight") if attn else None,  # type: ignore[arg-type]
        kv_a_norm=vector("attn_kv_a_norm.weight") if attn else None,  # type: ignore[arg-type]
        kv_b=kv_b,
        k_b=k_b,
        v_b=v_b,
        wo=need("attn_output.weight") if attn else None,  # type: ignore[arg-type]
        ffn_norm=vector("ffn_norm.weight") if ffn else None,  # type: ignore[arg-type]
        ffn=tuple(need(f"ffn_{n}.weight") for n in ("gate", "up", "down")) if ffn and not moe else None,
        gate_inp=need("ffn_gate_inp.weight") if ffn and moe else None,
        probs_bias=bias.dequantize() if bias is not None else None,
        experts=tuple(need(f"ffn_{n}_exps.weight") for n in ("gate", "up", "down")) if exps and moe else None,
        shared=(
            tuple(need(f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down"))
            if ffn and moe and cfg.n_shared_experts > 0
            else None
        ),
    )


class DeepSeek2:
    """Weights of a deepseek2 GGUF, used in place (memory-mapped), and the forward pass over a KVCache."""

    OP_PARTS = ("embd", "attn", "ffn", "moe_experts", "output")  # what run_op runs

    def __init__(self, f: GGUFFile, mla: int = 3, amb_bytes: int = 256 << 20) -> None:
        self._setup(DeepSeek2Config.from_gguf(f), mla, amb_bytes)
        self.token_embd = load_weight(f, "token_embd.weight")
        self.output_norm = load_vector(f, "output_norm.weight")
        self.output = _optional(f, "output.weight") or self.token_embd
        self.layers = [self._load_layer(f, i) for i in range(self.cfg.n_layers)]

    @classmethod
    def load(cls, f: GGUFFile, mla: int, amb_bytes: int) -> DeepSeek2:
        return cls(f, mla, amb_bytes)

    @classmethod
    def from_parts(cls, cfg: DeepSeek2Config, get: Getter, ops: Iterable[tuple[int, str]], mla: int = 3,
                   amb_bytes: int = 256 << 20, xp: Any = np) -> DeepSeek2:
        """A network holding only the weights of `ops` (a worker's segment); other layers are None. With a GPU
        getter (engine.cuda.tensors.upload_getter) and xp=cupy, the same math runs on the GPU."""
        net = cls.__new__(cls)
        net._setup(cfg, mla, amb_bytes, xp)
        parts = parts_by_layer(ops)
        net.token_embd, net.output_norm, net.output = ends_from_parts(get, cfg.n_layers, parts)
        net.layers = [load_layer(get, cfg, i, parts[i]) if i in parts else None  # type: ignore[misc]
                      for i in range(cfg.n_layers)]
        # a segment's Wk/Wv are decoded for each call, never kept: kept, they would sit outside the worker's -m (up
        # to 256 MiB per segment, a peer may define many); decoded, they are the run's scratch, counted before it
        net._kv_f32 = None
        return net

    def _setup(self, cfg: DeepSeek2Config, mla: int, amb_bytes: int, xp: Any = np) -> None:
        if mla not in MLA_MODES:
            raise ModelFileError(f"-mla {mla} is not a mode; use 0 (naive), 1/2 (absorbed) or 3 (both)")
        self.cfg = cfg
        self.xp = xp  # the array module of activations and KV caches: numpy, or cupy for a GPU network
        self.mla = mla
        self.amb_bytes = amb_bytes
        self.rope = RopeTable(cfg.rope)
        self.router = Router(
            n_experts_per_tok=cfg.n_experts_per_tok,
            gating_func=cfg.gating_func,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            group_score="max" if cfg.gating_func == GATING_SOFTMAX else "sum2",
        )
        # Decoded Wk/Wv per layer, kept when all of them fit the budget; otherwise decoded at each use.
        self._kv_f32: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cfg.kept_attn_bytes() else None

    def _load_layer(self, f: GGUFFile, i: int) -> Layer:
        return load_layer(gguf_getter(f), self.cfg, i, where=f"{f.path}: ")

    # ---- cache layout -------------------------------------------------------------------------
    def cache_widths(self) -> dict[str, int]:
        return self.cfg.cache_widths(self.mla)

    def new_cache(self, n_ctx: int, cache_type: str) -> KVCache:
        return KVCache(self.cfg.n_layers, self.cache_widths(), n_ctx, cache_type, self.xp)

    # ---- the pass as ops (engine/forward_pass.py) ----------------------------------------------------------
    def ops(self) -> list[Op]:
        """The whole forward pass: every layer's attention and FFN, and its routed experts where it has them."""
        return model_ops(self.cfg.n_layers, self.cfg.layer_parts)

    @staticmethod
    def attention_scratch(c: DeepSeek2Config, T: int, S: int, kv_decode: bool) -> tuple[int, int]:
        """(floats, heads per key head) that _attention keeps alive at once for T queries over S keys besides its
        score chunk (engine.segments.run_scratch_bytes): projections, rope, concatenations; the cache read as f32,
        K and V decompressed; Wk/Wv decoded for this call (kv_decode). Every query head has its own key."""
        H, dn, dr, dv, r = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        floats = T * (H * (4 * dn + 9 * dr + 4 * r + 2 * dv) + 2 * c.q_lora_rank + 3 * r + 7 * dr)
        floats += S * ((r + dr) + H * (2 * dn + dr + dv))
        floats += 2 * H * (dn + dv) * r if kv_decode else 0
        return floats, H

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T new tokens after the cached ones; logits [T, V] if all_logits else [1, V] (last token)."""
        return run_local(self.run_op, self.ops(), [(ids, cache)], all_logits)

    def forward_batch(self, items: Sequence[tuple[np.ndarray, KVCache]]) -> np.ndarray:
        """One pass over several sequences (new token ids, own cache each): each one's last logits [N, V]."""
        return run_local(self.run_op, self.ops(), items)

    def run_op(self, op: Op, state: State, positions: np.ndarray,
               batch: Batch, defer_shared: bool = False) -> None:
        """Apply one op to the pass state in place: "x" the hidden state [T, D]; between a MoE layer's ffn and
        moe_experts ops also "h" (normed input), "idx"/"w" (routing) and "shared" (shared experts' output);
        "ids" before embd; "n_out" (rows of logits wanted) before output, which leaves only "logits".
        defer_shared: the ffn op leaves the shared experts to the caller, whose "shared_experts" op runs them while
        a worker runs the routed ones; "moe_combine" then adds the worker's "y". These two run only here: a
        worker's program holds OP_PARTS alone. `positions` [T] and `batch` (the pass's sequences, a cache each:
        engine.batch) place the rows."""
        i, part = op
        c = self.cfg
        if part == "embd":
            state["x"] = self.token_embd.rows(state.pop("ids"))
        elif part == "output":
            output_op(state, self.output, self.output_norm, c.rms_norm_eps, batch)
        elif part == "attn":
            L, x = self.layers[i], state["x"]
            state["x"] = x + self._attention(i, L, rms_norm(x, L.attn_norm, c.rms_norm_eps), positions, batch)
        elif part == "ffn":
            self._ffn_op(self.layers[i], state, shared=not defer_shared)
        elif part == "moe_experts":
            L = self.layers[i]
            assert L.experts is not None
            state["y"] = moe_ffn(state.pop("h"), state.pop("idx"), state.pop("w"), *L.experts)
            self._moe_combine(state)
        elif part == "shared_experts":  # local only: while a worker runs this layer's routed experts
            L = self.layers[i]
            if L.shared is not None:
                state["shared"] = swiglu(state["h"], *L.shared)
        elif part == "moe_combine":  # local only: a worker's routed experts came back as "y"
            self._moe_combine(state)
        else:
            raise ValueError(f"unknown op {op}")

    def _ffn_op(self, L: Layer, state: dict[str, np.ndarray], shared: bool = True) -> None:
        x = state["x"]
        h = rms_norm(x, L.ffn_norm, self.cfg.rms_norm_eps)
        if L.ffn is not None:
            state["x"] = x + swiglu(h, *L.ffn)
            return
        assert L.gate_inp is not None
        state["idx"], state["w"] = route(self.router, L.gate_inp.matmul_t(h), L.probs_bias)
        state["h"] = h
        if L.shared is not None and shared:
            state["shared"] = swiglu(h, *L.shared)

    @staticmethod
    def _moe_combine(state: State) -> None:
        """Add the routed experts' output "y" (+ the shared experts') to the residual; without a residual in the
        state (an expert-only remote segment) leave y as "y" for the coordinator's moe_combine."""
        y = state.pop("y")
        if "shared" in state:
            y = y + state.pop("shared")
        if "x" in state:
            state["x"] = state["x"] + y
        else:
            state["y"] = y

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
            return self.xp.ascontiguousarray(kv[:, :dn]), self.xp.ascontiguousarray(kv[:, dn:])
        assert L.k_b is not None and L.v_b is not None
        wk = self.xp.ascontiguousarray(L.k_b.dequantize().reshape(H, r, dn).transpose(0, 2, 1))
        wv = L.v_b.dequantize().reshape(H, dv, r)
        return wk, wv

    def _per_head(self, w: QTensor | None, x: np.ndarray) -> np.ndarray | None:
        """x [T, H, C] times each head's matrix of a split attn_k_b [H, r, dn] / attn_v_b [H, dv, r], read in its
        encoding with int8 activations (one gathered launch for all heads) -> [T, H, R]. None where the decoded
        float32 copy serves: the legacy attn_kv_b form, a GPU network, a prefill (one BLAS product per head) and
        float32 activations (whose results stay those of the float32 copy, bit for bit)."""
        T, H, C = x.shape
        if w is None or self.xp is not np or T > MATVEC_MAX_T or not takes_int8(w.qtype):
            return None
        R = w.shape[-2] if len(w.shape) == 3 else w.shape[0] // H  # [H, R, C] or stacked as [H * R, C]
        heads = QTensor(w.name, w.data.reshape(H, R, -1), w.qtype, (H, R, C))
        ids = np.tile(np.arange(H, dtype=np.int64), T)
        return heads.gather_matmul_t(ids, x.reshape(T * H, C)).reshape(T, H, R)

    def _attention(self, i: int, L: Layer, h: np.ndarray, positions: np.ndarray, batch: Batch) -> np.ndarray:
        """h [T, D] -> [T, D]: the projections run over all rows at once; each sequence's cache and attention core
        its own (batch.spans), one sequence at a time (so one sequence's cache is read as float32 at once)."""
        c, xp = self.cfg, self.xp
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
        cos, sin = (xp.asarray(a) for a in self.rope.cos_sin(positions))  # the table stays on the host
        q_pe = apply_rope(xp.ascontiguousarray(q[..., dn:]), cos, sin)  # [T, H, dr]
        k_pe = apply_rope(xp.ascontiguousarray(kv[:, r:]), cos, sin)  # [T, dr], one head shared by all
        q_nope = q[..., :dn]
        o = xp.empty((T, H, dv), np.float32)
        if self.mla == 0:  # cache decompressed per-head K and V (llama.cpp's legacy MHA path)
            wk, wv = self.kv_weights(i, L)
            k_nope = (latent @ wk.reshape(H * dn, r).T).reshape(T, H, dn)
            k = xp.concatenate([k_nope, xp.broadcast_to(k_pe[:, None, :], (T, H, dr))], axis=-1)
            v = latent @ wv.reshape(H * dv, r).T  # [T, H * dv]
            q_full = xp.concatenate([q_nope, q_pe], -1)
            for s in batch.spans:
                _write(i, s, int(positions[s.start]), {"k": k[s.rows].reshape(s.n, -1), "v": v[s.rows]})
                o[s.rows] = self._mha(i, s, q_full[s.rows], positions[s.rows])
            return L.wo.matmul_t(o.reshape(T, H * dv))
        ckv_new = xp.concatenate([latent, k_pe], axis=-1)  # [T, r + dr]
        for s in batch.spans:
            _write(i, s, int(positions[s.start]), {"ckv": ckv_new[s.rows]})
        # mla 3: a sequence's prompt chunk decompresses K/V from its latent cache (fewer FLOPs than absorbed); decode
        # steps (and every step of mla 1/2) attend absorbed
        decompress = [self.mla == 3 and s.n > 1 for s in batch.spans]
        weights = self.kv_weights(i, L) if any(decompress) else None  # decoded once for the pass
        for s, d in zip(batch.spans, decompress, strict=True):
            if d:
                assert weights is not None
                q_full = xp.concatenate([q_nope[s.rows], q_pe[s.rows]], -1)
                o[s.rows] = self._decompressed(i, s, q_full, positions[s.rows], weights)
        absorbed = [s for s, d in zip(batch.spans, decompress, strict=True) if not d]
        if absorbed:
            rows = batch.rows_where([not d for d in decompress])
            rows = rows if isinstance(rows, slice) else xp.asarray(rows)
            o[rows] = self._absorbed(i, L, q_nope[rows], q_pe[rows], absorbed, positions, weights)
        return L.wo.matmul_t(o.reshape(T, H * dv))

    def _mha(self, i: int, s: Span, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """mla 0: one sequence's queries q [n, H, dn + dr] over its per-head K/V rows -> [n, H, dv]."""
        c = self.cfg
        S = int(positions[-1]) + 1
        k_all = _read(i, s, "k", S).reshape(S, c.n_heads, -1)
        v_all = _read(i, s, "v", S).reshape(S, c.n_heads, c.v_head_dim)
        return causal_attention(q, k_all, v_all, positions, c.kq_scale, self.amb_bytes)

    def _decompressed(self, i: int, s: Span, q: np.ndarray, positions: np.ndarray,
                      weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """mla 3 prefill: one sequence's queries q [n, H, dn + dr] over K/V decompressed from its latent rows."""
        c, xp = self.cfg, self.xp
        H, dn, dr, dv, r = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        wk, wv = weights
        S = int(positions[-1]) + 1
        ckv = _read(i, s, "ckv", S)  # [S, r + dr]
        lat = ckv[:, :r]
        k_nope = (lat @ wk.reshape(H * dn, r).T).reshape(S, H, dn)
        k_all = xp.concatenate([k_nope, xp.broadcast_to(ckv[:, None, r:], (S, H, dr))], axis=-1)
        v_all = (lat @ wv.reshape(H * dv, r).T).reshape(S, H, dv)
        return causal_attention(q, k_all, v_all, positions, c.kq_scale, self.amb_bytes)

    def _latent(self, i: int, s: Span, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Absorbed: one sequence's queries q [n, H, r + dr] over its latent rows [S, r + dr] (an MQA whose V is the
        latent itself) -> [n, H, r]."""
        S = int(positions[-1]) + 1
        ckv = _read(i, s, "ckv", S)
        return causal_attention(q, ckv, ckv[:, : self.cfg.kv_lora_rank], positions, self.cfg.kq_scale,
                                self.amb_bytes)

    def _absorbed(self, i: int, L: Layer, q_nope: np.ndarray, q_pe: np.ndarray, spans: Sequence[Span],
                  positions: np.ndarray, weights: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Absorbed attention of the sequences `spans`, whose rows follow each other in q_nope [Ta, H, dn] and q_pe
        [Ta, H, dr] -> [Ta, H, dv]: Wk and Wv multiply all rows at once, each sequence attends over its own latent
        rows. `weights`: Wk/Wv if the pass decoded them already."""
        xp = self.xp
        q_abs = self._per_head(L.k_b, q_nope)  # [Ta, H, r]
        if q_abs is None:
            weights = weights or self.kv_weights(i, L)
            q_abs = xp.matmul(q_nope.transpose(1, 0, 2), weights[0]).transpose(1, 0, 2)
        q_cat = xp.concatenate([q_abs, q_pe], -1)  # [Ta, H, r + dr]
        if len(spans) == 1:  # one sequence, as a pass always was: no copy into a buffer
            o_lat = self._latent(i, spans[0], q_cat, positions[spans[0].rows])
        else:
            o_lat = xp.empty((*q_abs.shape,), np.float32)
            a = 0
            for s in spans:
                o_lat[a : a + s.n] = self._latent(i, s, q_cat[a : a + s.n], positions[s.rows])
                a += s.n
        o = self._per_head(L.v_b, o_lat)  # [Ta, H, dv]
        if o is None:
            _, wv = weights or self.kv_weights(i, L)
            o = xp.matmul(o_lat.transpose(1, 0, 2), wv.transpose(0, 2, 1)).transpose(1, 0, 2)
        return o


def _write(i: int, s: Span, pos0: int, new: dict[str, np.ndarray]) -> None:
    """A sequence's new rows of layer i's cache streams, at pos0.. of its cache."""
    assert s.cache is not None, "an attention op needs a KV cache"
    for name, rows in new.items():
        s.cache.write(i, name, pos0, rows)


def _read(i: int, s: Span, name: str, n: int) -> np.ndarray:
    """A sequence's first n rows of layer i's stream `name`, as float32."""
    assert s.cache is not None
    return s.cache.read(i, name, n)

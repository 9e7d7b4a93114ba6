"""Mixture-of-experts routing (a pure function of the router scores) and the expert FFN.

Legend: T tokens, D hidden, E experts, K experts per token, G expert groups, F expert FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import GATING_SIGMOID
from engine.kernels import MATVEC_MAX_T
from engine.ops import array_module, silu, softmax, to_host
from engine.quant import QTensor

# Up to this many tokens, experts run as gathered (token, expert) pairs rather than grouped by expert.
GATHER_MAX_TOKENS = 2
# An idx entry naming no expert here: a token's other experts sit on other devices (experts split by -ot).
NO_EXPERT = -1


@dataclass(frozen=True)
class Router:
    n_experts_per_tok: int
    gating_func: int  # 1 softmax, 2 sigmoid
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 0.0  # 0 or 1: no scaling (llama.cpp)
    # How a group is scored: "sum2" = sum of its two best biased scores (DeepSeek-V3 noaux_tc and llama.cpp
    # for every model), "max" = its best score (DeepSeek-V2 group_limited_greedy reference).
    group_score: str = "sum2"


def route(router: Router, logits: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [T, E] -> (expert ids [T, K] int64, weights [T, K] float32), on the host: the few scores of a
    GPU layer are copied here, since selection is branchy work on T x E numbers."""
    logits = to_host(logits).astype(np.float32, copy=False)
    bias = None if bias is None else to_host(bias)
    T, E = logits.shape
    if router.gating_func == GATING_SIGMOID:
        probs = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))
    else:
        probs = softmax(logits, axis=-1)
    select = probs + bias if bias is not None else probs.copy()  # the bias only steers selection
    if router.n_group > 1:
        grouped = select.reshape(T, router.n_group, E // router.n_group)  # [T, G, E/G]
        if router.group_score == "max":
            gscore = grouped.max(axis=-1)
        else:
            gscore = -np.sort(-grouped, axis=-1)[..., :2].sum(axis=-1)
        keep = np.argsort(-gscore, axis=-1, kind="stable")[:, : router.topk_group]  # [T, Gk]
        gmask = np.ones((T, router.n_group), bool)
        np.put_along_axis(gmask, keep, False, axis=-1)
        select = np.where(np.repeat(gmask, E // router.n_group, axis=-1), -np.inf, select)
    idx = np.argsort(-select, axis=-1, kind="stable")[:, : router.n_experts_per_tok]  # [T, K]
    w = np.take_along_axis(probs, idx, axis=-1)
    if router.norm_topk_prob:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), np.float32(6.103515625e-5))
    if router.routed_scaling_factor not in (0.0, 1.0):
        w = w * np.float32(router.routed_scaling_factor)
    return idx, w.astype(np.float32)


def swiglu(x: np.ndarray, gate: QTensor, up: QTensor, down: QTensor) -> np.ndarray:
    """down(silu(gate x) * up x) for x [T, D]."""
    return down.matmul_t(silu(gate.matmul_t(x)) * up.matmul_t(x))


def moe_ffn(
    x: np.ndarray,  # [T, D]
    idx: np.ndarray,  # [T, K]
    weights: np.ndarray,  # [T, K]
    gate_exps: QTensor,  # [E, F, D]
    up_exps: QTensor,  # [E, F, D]
    down_exps: QTensor,  # [E, D, F]
) -> np.ndarray:  # [T, D]
    """Sum of the selected experts' SwiGLU outputs; tokens are grouped by expert so each expert is read once.
    x may be a device array (idx and weights are host arrays from `route`); only selected experts are read.

    Each expert's weighted output is rounded to float32 and the K of a token are added in float64, which is exact
    for float32 terms (unless they differ by ~2^26 in size), so the sum does not depend on their order or grouping:
    a layer's experts split over devices (entries NO_EXPERT add nothing: each device sums its own) add up to
    the same float32 result. float64 weights (a split layer's part) return that sum unrounded, float64."""
    xp = array_module(x)
    K = idx.shape[1]
    E = gate_exps.shape[0]
    if idx.size and (idx.min() < NO_EXPERT or idx.max() >= E):  # routing from a peer: no id may wrap around
        raise ValueError(f"expert ids {idx.min()}..{idx.max()} do not fit {E} experts")
    w32 = xp.asarray(weights, dtype=np.float32)
    pairs_at_once = MATVEC_MAX_T if xp is np else GATHER_MAX_TOKENS  # tokens whose pairs run in one launch
    if len(idx) <= pairs_at_once:
        out = _grouped_ffn(x, idx, w32, gate_exps, up_exps, down_exps)
    else:
        out = xp.zeros(x.shape, dtype=np.float64)
        w_dev = w32.ravel()
        flat = idx.ravel()
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        bounds = [*starts[1:], len(order)]
        for e, a, b in zip(experts, starts, bounds, strict=True):
            if e == NO_EXPERT:
                continue
            sel = order[a:b]  # positions in the flattened [T*K] assignment
            tok = xp.asarray(sel // K)
            y = swiglu(x[tok], gate_exps[int(e)], up_exps[int(e)], down_exps[int(e)])
            out[tok] += y * w_dev[xp.asarray(sel)][:, None]  # a token picks an expert at most once: no repeated index
    return out if weights.dtype == np.float64 else out.astype(np.float32)


def _grouped_ffn(x: np.ndarray, idx: np.ndarray, w32: np.ndarray, gate_exps: QTensor, up_exps: QTensor,
                 down_exps: QTensor) -> np.ndarray:
    """moe_ffn's float64 sums for decode-sized T: the (token, expert) pairs sorted by expert in one kernel launch
    per matrix, each selected expert read once for all its tokens (engine.kernels.gather_matvec; per pair the
    kernels give the same products as one expert's matmul)."""
    xp = array_module(x)
    T, K = idx.shape
    flat = idx.ravel()
    order = np.argsort(flat, kind="stable")
    order = order[flat[order] != NO_EXPERT]  # the pairs here, by expert; a token picks an expert at most once
    at = xp.asarray(order)
    pairs, xs = flat[order], x[xp.asarray(order // K)]
    act = silu(gate_exps.gather_matmul_t(pairs, xs)) * up_exps.gather_matmul_t(pairs, xs)  # [pairs, F]
    y = xp.zeros((T * K, x.shape[1]), dtype=np.float32)
    y[at] = down_exps.gather_matmul_t(pairs, act) * w32.ravel()[at][:, None]
    return y.reshape(T, K, -1).sum(axis=1, dtype=np.float64)

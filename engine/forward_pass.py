"""A forward pass as an architecture's op list run over one pass state.

Legend: T new tokens, D hidden. An op is (layer, part): (-1, "embd"), per layer "attn", "ffn" and, for a layer
with routed experts, "moe_experts", then (n_layers, "output"). The pass state is a dict of host or device
arrays: "ids" and "n_out" (rows of logits wanted) at the start, "x" [T, D] the hidden state between ops (MoE
layers add "h", "idx", "w" and "shared" between their ffn and moe_experts ops), "logits" alone at the end.
An architecture's `run_op` applies one op; the local network runs all of them here, a distributed one hands
runs of them (segments) to the device holding their weights, and a worker runs its segment's ops the same way.
A coordinator whose worker holds a layer's routed experts alone also runs that layer's "shared_experts" (while
the worker computes) and "moe_combine" (adding the worker's "y"); no worker program holds those two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from engine.kv_cache import KVCache

Op = tuple[int, str]  # (layer, part)
State = dict[str, np.ndarray]
RunOp = Callable[[Op, State, np.ndarray, KVCache], None]


def model_ops(n_layers: int, layer_parts: Callable[[int], tuple[str, ...]]) -> list[Op]:
    """The whole pass: the embedding, each layer's parts in order, the output."""
    return [(-1, "embd"), *((i, part) for i in range(n_layers) for part in layer_parts(i)), (n_layers, "output")]


def begin(ids: np.ndarray, cache: KVCache, all_logits: bool) -> tuple[np.ndarray, State]:
    """Reserve the cache rows of T new tokens: their positions and the pass's first state."""
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    pos0 = cache.reserve(T)
    return np.arange(pos0, pos0 + T), {"ids": ids, "n_out": np.asarray(T if all_logits else 1, dtype=np.int64)}


def finish(cache: KVCache, positions: np.ndarray, state: State) -> np.ndarray:
    """Commit the pass's cache rows; its logits [n_out, V]."""
    cache.advance(len(positions))
    return state["logits"]


def run_local(run_op: RunOp, ops: Iterable[Op], ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
    """A whole pass on this device: logits [T, V] if all_logits else [1, V] (the last token)."""
    positions, state = begin(ids, cache, all_logits)
    for op in ops:
        run_op(op, state, positions, cache)
    return finish(cache, positions, state)

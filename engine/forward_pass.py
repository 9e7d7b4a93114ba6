"""A forward pass as an architecture's op list run over one pass state.

Legend: T new tokens, D hidden. An op is (layer, part): (-1, "embd"), per layer "attn", "ffn" and, for a layer
with routed experts, "moe_experts", then (n_layers, "output"). The pass state is a dict of host or device
arrays: "ids" and "n_out" (rows of logits wanted) at the start, "x" [T, D] the hidden state between ops (MoE
layers add "h", "idx", "w" and "shared" between their ffn and moe_experts ops), "logits" alone at the end.
An architecture's `run_op` applies one op; the local network runs all of them here, a distributed one hands
runs of them (segments) to the device holding their weights, and a worker runs its segment's ops the same way.
A pass may hold several sequences (engine.batch): their rows follow each other in the state, `positions` [T] gives
each row's position in its own sequence, and a Batch names each sequence's rows and KV cache.
A coordinator whose worker holds a layer's routed experts alone also runs that layer's "shared_experts" (while
the worker computes) and "moe_combine" (adding the worker's "y"); no worker program holds those two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from engine.batch import Batch, batch_positions
from engine.kv_cache import KVCache

Op = tuple[int, str]  # (layer, part)
State = dict[str, np.ndarray]
RunOp = Callable[[Op, State, np.ndarray, Batch], None]
Item = tuple[np.ndarray, KVCache]  # one sequence's new token ids and its cache


def model_ops(n_layers: int, layer_parts: Callable[[int], tuple[str, ...]]) -> list[Op]:
    """The whole pass: the embedding, each layer's parts in order, the output."""
    return [(-1, "embd"), *((i, part) for i in range(n_layers) for part in layer_parts(i)), (n_layers, "output")]


def begin(ids: np.ndarray, cache: KVCache, all_logits: bool) -> tuple[np.ndarray, State]:
    """Reserve the cache rows of T new tokens: their positions and the pass's first state."""
    positions, _, state = begin_batch([(ids, cache)], all_logits)
    return positions, state


def finish(cache: KVCache, positions: np.ndarray, state: State) -> np.ndarray:
    """Commit the pass's cache rows; its logits [n_out, V]."""
    return finish_batch(Batch.of([cache], [len(positions)]), state)


def begin_batch(items: Sequence[Item], all_logits: bool = False) -> tuple[np.ndarray, Batch, State]:
    """Reserve the cache rows of each sequence's new tokens: the pass's positions [T], its batch and first state.
    n_out (logits kept per sequence) is all of its rows with all_logits, else its last."""
    ids = [np.asarray(i, dtype=np.int64) for i, _ in items]
    counts = [len(i) for i in ids]
    starts = [cache.reserve(n) for (_, cache), n in zip(items, counts, strict=True)]
    n_out = max(counts) if all_logits else 1
    state = {"ids": np.concatenate(ids), "n_out": np.asarray(n_out, dtype=np.int64)}
    return batch_positions(starts, counts), Batch.of([c for _, c in items], counts), state


def finish_batch(batch: Batch, state: State) -> np.ndarray:
    """Commit the pass's cache rows; its logits: each sequence's n_out rows, one sequence after another."""
    for span in batch.spans:
        assert span.cache is not None
        span.cache.advance(span.n)
    return state["logits"]


def run_batch(run_op: RunOp, ops: Iterable[Op], items: Sequence[Item], all_logits: bool = False) -> np.ndarray:
    """A whole pass over several sequences on this device: logits of each one's last token [N, V] (of all its
    tokens with all_logits, for one sequence)."""
    positions, batch, state = begin_batch(items, all_logits)
    for op in ops:
        run_op(op, state, positions, batch)
    return finish_batch(batch, state)


def run_local(run_op: RunOp, ops: Iterable[Op], ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
    """A whole pass on this device: logits [T, V] if all_logits else [1, V] (the last token)."""
    return run_batch(run_op, ops, [(ids, cache)], all_logits)

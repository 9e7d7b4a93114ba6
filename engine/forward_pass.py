"""A forward pass as an architecture's op list run over one pass state.

Legend: T new tokens, D hidden. An op is (layer, part): (-1, "embd"), per layer "attn", "ffn" and, for a layer
with routed experts, "moe_experts", then (n_layers, "output"). The pass state is a dict of host or device
arrays: "ids" and "n_out" (rows of logits wanted) at the start, "x" [T, D] the hidden state between ops (MoE
layers add "h", "idx", "w" and "shared" between their ffn and moe_experts ops), "logits" alone at the end.
An architecture's `run_op` applies one op. An Executor runs segments (runs of consecutive ops) where their weights
are: `Here` on this process's network, engine.executors' `OnGpu` and `OnWorker` on a GPU of this machine and on a
worker; a local pass is one segment Here, a distributed one hands each segment to its device's executor.
A coordinator whose worker holds a layer's routed experts alone also runs that layer's "shared_experts" (while
the worker computes) and "moe_combine" (adding the worker's "y"); no worker program holds those two.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from engine.kv_cache import KVCache

Op = tuple[int, str]  # (layer, part)
State = dict[str, np.ndarray]
RunOp = Callable[..., None]  # (op, state, positions, cache, defer_shared=False): an architecture's run_op


class Executor(Protocol):
    """Runs a pass's segments where their weights are. `run(k, ...)` applies segment k's ops to the state in place
    (for the tokens at `positions` of sequence `seq_id`, whose rows here are in `cache`); `kv` clears or truncates
    a sequence's rows held elsewhere; `close` lets go of what the executor holds."""

    def run(self, k: int, state: State, positions: np.ndarray, cache: KVCache, seq_id: int) -> None: ...

    def kv(self, op: str, seq_id: int, n: int) -> None: ...

    def close(self) -> None: ...


class Here:
    """Segments on this process's network; their KV rows are the pass's own cache. A segment in `defer_shared`
    leaves its last MoE layer's shared experts to the next segment's executor (a worker's routed experts alone:
    the coordinator computes them while the worker computes)."""

    def __init__(self, run_op: RunOp, segments: Mapping[int, Sequence[Op]], defer_shared: Container[int] = ()) -> None:
        self.run_op, self.segments, self.defer_shared = run_op, segments, defer_shared

    def run(self, k: int, state: State, positions: np.ndarray, cache: KVCache, seq_id: int) -> None:
        ops = self.segments[k]
        for op in ops[:-1]:
            self.run_op(op, state, positions, cache)
        self.run_op(ops[-1], state, positions, cache, defer_shared=k in self.defer_shared)

    def kv(self, op: str, seq_id: int, n: int) -> None:
        """Nothing to do: the pass's cache is cleared and truncated by its owner."""

    def close(self) -> None:
        """Nothing held beyond the network."""


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


def run_pass(steps: Iterable[tuple[int, Executor]], ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
    """One pass: each segment k on its executor in order; logits [T, V] if all_logits else [1, V] (the last token)."""
    positions, state = begin(ids, cache, all_logits)
    seq_id = getattr(cache, "seq_id", 0)
    for k, executor in steps:
        executor.run(k, state, positions, cache, seq_id)
    return finish(cache, positions, state)


def run_local(run_op: RunOp, ops: Sequence[Op], ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
    """A whole pass on this process's network: one segment Here."""
    return run_pass([(0, Here(run_op, {0: ops}))], ids, cache, all_logits)

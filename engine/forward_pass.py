"""A forward pass as an architecture's op list run over one pass state.

Legend: T new tokens, D hidden. An op is (layer, part): (-1, "embd"), per layer "attn", "ffn" and, for a layer
with routed experts, "moe_experts", then (n_layers, "output"). The pass state is a dict of host or device
arrays: "ids" and "n_out" (rows of logits wanted per sequence) at the start, "x" [T, D] the hidden state between
ops (MoE layers add "h", "idx", "w" and "shared" between their ffn and moe_experts ops), "logits" alone at the end.
A pass may hold several sequences (engine.batch): their rows follow each other in the state, `positions` [T] gives
each row's position in its own sequence, and a Batch names each sequence's rows and KV cache.
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

from engine.batch import Batch, batch_positions
from engine.kv_cache import KVCache

Op = tuple[int, str]  # (layer, part)
State = dict[str, np.ndarray]
# (op, state, positions, cache or batch, defer_shared=False): an architecture's run_op
RunOp = Callable[..., None]
Item = tuple[np.ndarray, KVCache]  # one sequence's new token ids and its cache


class Executor(Protocol):
    """Runs a pass's segments where their weights are. `run(k, ...)` applies segment k's ops to the state in place
    (for the rows at `positions` of the batch's sequences, whose rows here are in their caches); `kv` clears or
    truncates a sequence's rows held elsewhere; `close` lets go of what the executor holds."""

    def run(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> None: ...

    def kv(self, op: str, seq_id: int, n: int) -> None: ...

    def close(self) -> None: ...


class Here:
    """Segments on this process's network; their KV rows are the pass's own caches. A segment in `defer_shared`
    leaves its last MoE layer's shared experts to the next segment's executor (a worker's routed experts alone:
    the coordinator computes them while the worker computes)."""

    def __init__(self, run_op: RunOp, segments: Mapping[int, Sequence[Op]], defer_shared: Container[int] = ()) -> None:
        self.run_op, self.segments, self.defer_shared = run_op, segments, defer_shared

    def run(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> None:
        ops = self.segments[k]
        for op in ops[:-1]:
            self.run_op(op, state, positions, batch)
        self.run_op(ops[-1], state, positions, batch, defer_shared=k in self.defer_shared)

    def kv(self, op: str, seq_id: int, n: int) -> None:
        """Nothing to do: the pass's caches are cleared and truncated by their owners."""

    def close(self) -> None:
        """Nothing held beyond the network."""


def model_ops(n_layers: int, layer_parts: Callable[[int], tuple[str, ...]]) -> list[Op]:
    """The whole pass: the embedding, each layer's parts in order, the output."""
    return [(-1, "embd"), *((i, part) for i in range(n_layers) for part in layer_parts(i)), (n_layers, "output")]


def begin(items: Sequence[Item], all_logits: bool = False) -> tuple[np.ndarray, Batch, State]:
    """Reserve the cache rows of each sequence's new tokens: the pass's positions [T], its batch and first state.
    n_out (logits kept per sequence) is all of its rows with all_logits, else its last."""
    ids = [np.asarray(i, dtype=np.int64) for i, _ in items]
    counts = [len(i) for i in ids]
    starts = [cache.reserve(n) for (_, cache), n in zip(items, counts, strict=True)]
    n_out = max(counts) if all_logits else 1
    state = {"ids": np.concatenate(ids), "n_out": np.asarray(n_out, dtype=np.int64)}
    return batch_positions(starts, counts), Batch.of([c for _, c in items], counts), state


def finish(batch: Batch, state: State) -> np.ndarray:
    """Commit the pass's cache rows; its logits: each sequence's n_out rows, one sequence after another."""
    for span in batch.spans:
        assert span.cache is not None
        span.cache.advance(span.n)
    return state["logits"]


def run_pass(steps: Iterable[tuple[int, Executor]], items: Sequence[Item], all_logits: bool = False) -> np.ndarray:
    """One pass over the items' sequences: each segment k on its executor in order; the logits of each sequence's
    last token [N, V], or of all its tokens with all_logits ([T, V] for one sequence)."""
    positions, batch, state = begin(items, all_logits)
    for k, executor in steps:
        executor.run(k, state, positions, batch)
    return finish(batch, state)


def run_local(run_op: RunOp, ops: Sequence[Op], items: Sequence[Item], all_logits: bool = False) -> np.ndarray:
    """A whole pass on this process's network: one segment Here."""
    return run_pass([(0, Here(run_op, {0: ops}))], items, all_logits)

"""A forward pass as an architecture's op list run over one pass state, and the executors that run its segments.

Legend: T new tokens, D hidden. An op is (layer, part): (-1, "embd"), per layer "attn", "ffn" and, for a layer
with routed experts, "moe_experts", then (n_layers, "output"). The pass state is a dict of host or device
arrays: "ids" and "n_out" (rows of logits wanted per sequence) at the start, "x" [T, D] the hidden state between
ops (MoE layers add "h", "idx", "w" and "shared" between their ffn and moe_experts ops), "logits" alone at the end.
A pass may hold several sequences (engine.batch): their rows follow each other in the state, `positions` [T] gives
each row's position in its own sequence, and a Batch names each sequence's rows and KV cache.
An architecture's `run_op` applies one op. An Executor runs segments (runs of consecutive ops) where their weights
are: `Here` on this process's network, `OnGpu` and `OnWorker` on a GPU of this machine and on a worker; a
local pass is one segment Here, a distributed one hands each segment to its device's executor.
A coordinator whose worker holds a layer's routed experts alone also runs that layer's "shared_experts" (while
the worker computes) and "moe_combine" (adding the worker's "y"); no worker program holds those two.
`ExpertsSplit` runs a layer whose routed experts are split over several devices: every device holding an expert
that some row picked computes those rows' part at the same time, and the coordinator adds the parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from engine.batch import Batch, SeqRun, batch_positions
from engine.kv_cache import KVCache
from engine.moe import NO_EXPERT
from rpcnode.client import Client, RPCError

if TYPE_CHECKING:  # both import this module
    from engine.placement import Segment
    from engine.segments import SegmentRunner

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


def begin(items: Sequence[Item], all_logits: bool = False,
          ahead: Mapping[int, int] | None = None) -> tuple[np.ndarray, Batch, State]:
    """Reserve the cache rows of each sequence's new tokens: the pass's positions [T], its batch and first state.
    n_out (logits kept per sequence) is all of its rows with all_logits, else its last. `ahead` (by id of the
    cache): rows that earlier passes still under way reserved (engine.pipeline), this pass's come after them."""
    ids = [np.asarray(i, dtype=np.int64) for i, _ in items]
    counts = [len(i) for i in ids]
    ahead = ahead or {}
    starts = [cache.reserve(n, ahead.get(id(cache), 0)) for (_, cache), n in zip(items, counts, strict=True)]
    n_out = max(counts) if all_logits else 1
    state = {"ids": np.concatenate(ids), "n_out": np.asarray(n_out, dtype=np.int64)}
    return batch_positions(starts, counts), Batch.of([c for _, c in items], counts, ids), state


def finish(batch: Batch, state: State) -> np.ndarray:
    """Commit the pass's cache rows (and their tokens); its logits: each sequence's n_out rows, one sequence after
    another."""
    for span in batch.spans:
        assert span.cache is not None
        span.cache.advance(span.n, span.ids)
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


# ---- the executors of segments elsewhere: a GPU of this machine, a worker ------------------------------------
# Both take a segment's inputs out of the pass state and put its outputs back, as over the wire; a pass of several
# sequences runs there in one call (one round trip), each sequence named by its cache's seq_id.

# Pass-state entries in the order they travel as payload sections: the hidden state (or what stands for it) first.
STATE_ORDER = ("x", "h", "ids", "logits", "y", "idx", "w", "shared", "n_out")


def ordered_state(state: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """State entries in wire order (STATE_ORDER, then any others by name)."""
    rank = {k: i for i, k in enumerate(STATE_ORDER)}
    return sorted(state.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def expert_only(seg: Segment) -> bool:
    """A segment of one layer's routed experts alone: the residual and the shared experts stay with the caller."""
    return len(seg.ops) == 1 and seg.ops[0][1] == "moe_experts"


def segment_inputs(seg: Segment, state: State) -> list[str]:
    """The state a segment run elsewhere needs, in wire order: expert-only segments get the routed input only."""
    first = seg.ops[0][1]
    if first == "embd":
        names = ["ids"]
    elif expert_only(seg):
        names = ["h", "idx", "w"]
    elif first == "moe_experts":
        names = [n for n in ("x", "h", "idx", "w", "shared") if n in state]
    else:
        names = ["x"]
    if any(p == "output" for _, p in seg.ops):
        names.append("n_out")
    return [n for n, _ in ordered_state({n: state[n] for n in names})]


def seq_runs(positions: np.ndarray, batch: Batch) -> list[SeqRun]:
    """The pass's sequences as a runner elsewhere knows them: the seq_id of each one's cache (0 for a cache that
    has none), its first position and token count."""
    return [SeqRun(getattr(s.cache, "seq_id", 0), int(positions[s.start]), s.n) for s in batch.spans]


def take_outputs(seg: Segment, state: State, sent: list[str], out: Mapping[str, np.ndarray], coordinator: RunOp,
                 positions: np.ndarray, batch: Batch) -> None:
    """Replace what a segment was sent by what it returned; routed experts' "y" joins the residual here."""
    for n in sent:
        state.pop(n, None)
    state.update(out)
    if "y" in out:
        coordinator((seg.ops[-1][0], "moe_combine"), state, positions, batch)


class OnGpu:
    """Segments on GPUs of this machine, one SegmentRunner each (engine.cuda.local.gpu_runners), in-process: host
    arrays in and out as over the wire."""

    def __init__(self, runners: Mapping[int, SegmentRunner], segments: Mapping[int, Segment],
                 coordinator: RunOp) -> None:
        self.runners, self.segments, self.coordinator = runners, segments, coordinator

    def run(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> None:
        seg = self.segments[k]
        send = segment_inputs(seg, state)
        out = self.runners[k].run_batch(seq_runs(positions, batch), {n: state[n] for n in send})
        take_outputs(seg, state, send, out, self.coordinator, positions, batch)

    def kv(self, op: str, seq_id: int, n: int) -> None:
        for runner in self.runners.values():
            runner.kv(op, seq_id, n)

    def close(self) -> None:
        """The runners' arrays go with them."""


class Sent(NamedTuple):
    """A segment run sent to a worker: its index, the state entries it took, its request id."""

    k: int
    inputs: list[str]
    request: int


class OnWorker:
    """A worker's segments, each defined there once under an id: a run is one RunSegment request and one reply.
    While the worker runs a layer's routed experts alone, the coordinator runs that layer's shared experts."""

    def __init__(self, client: Client, segment_ids: Mapping[int, int], segments: Mapping[int, Segment],
                 coordinator: RunOp) -> None:
        self.client, self.segment_ids, self.segments, self.coordinator = client, segment_ids, segments, coordinator

    def run(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> None:
        sent = self.start(k, state, positions, batch)
        try:
            self.overlap(sent, state, positions, batch)
        except BaseException:
            self.client.drop_runs()
            raise
        self.finish(sent, state, positions, batch)

    def start(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> Sent:
        """Send segment k's run; finish takes its reply."""
        send = segment_inputs(self.segments[k], state)
        request = self.client.start_segment(self.segment_ids[k], seq_runs(positions, batch),
                                            [(n, state[n]) for n in send])
        return Sent(k, send, request)

    def overlap(self, sent: Sent, state: State, positions: np.ndarray, batch: Batch) -> None:
        """The coordinator's share of a sent run, done while the worker computes: the shared experts beside a
        layer's routed experts alone."""
        seg = self.segments[sent.k]
        if expert_only(seg) and "shared" not in state:  # both machines busy
            self.coordinator((seg.ops[0][0], "shared_experts"), state, positions, batch)

    def finish(self, sent: Sent, state: State, positions: np.ndarray, batch: Batch) -> None:
        """Wait for a sent run's reply and put its outputs in the state."""
        out = self.client.finish_segment(sent.request)
        take_outputs(self.segments[sent.k], state, sent.inputs, out, self.coordinator, positions, batch)

    def kv(self, op: str, seq_id: int, n: int) -> None:
        self.client.kv_op(op, seq_id, n)

    def close(self) -> None:
        """Drop the segment programs and KV caches there (the worker keeps the tensors) and disconnect; at exit or
        on garbage collection too, so never wait long for the worker."""
        if self.client.connected:
            self.client.timeout = 2.0
            for segment_id in self.segment_ids.values():
                with contextlib.suppress(RPCError, OSError):
                    self.client.free(segment_id)
        self.client.close()


# ---- a layer's routed experts split over devices (expert parallel) -------------------------------------------


@dataclass(frozen=True)
class ExpertPart:
    """One device's share of a split layer, experts [first, first + count): on a worker (its client, and the id of
    the segment holding its range there, whose expert ids count from `first`), or here (client None: this
    process's network holds the whole expert tensors)."""

    first: int
    count: int
    client: Client | None = None
    segment_id: int = 0


def part_rows(part: ExpertPart, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows that picked at least one of the part's experts, and their idx with every other expert NO_EXPERT
    (a worker's ids counted from its first expert)."""
    mine = (idx >= part.first) & (idx < part.first + part.count)
    rows = np.flatnonzero(mine.any(axis=1))
    shift = part.first if part.client is not None else 0
    return rows, np.where(mine[rows], idx[rows] - shift, NO_EXPERT)


def rows_seqs(rows: np.ndarray, positions: np.ndarray, batch: Batch) -> list[SeqRun]:
    """The pass's sequences as seq_runs names them, each with only its rows among `rows` (sorted); sequences with
    none left out. Expert ops read no cache: the counts only have to match the rows sent."""
    out = []
    for s in batch.spans:
        n = int(np.count_nonzero((rows >= s.start) & (rows < s.start + s.n)))
        if n:
            out.append(SeqRun(getattr(s.cache, "seq_id", 0), int(positions[s.start]), n))
    return out


class ExpertsSplit:
    """Segments of one MoE layer's routed experts split over devices (engine.placement.ExpertSlice). Each device
    holding an expert that some row picked gets those rows at once (a worker one RunSegment); devices with none are
    not contacted. Meanwhile this process runs the shared experts and its own part; the parts (float64 sums, which
    add exactly: the result is the one device's) are then added and joined to the residual (moe_combine)."""

    def __init__(self, parts: Mapping[int, Sequence[ExpertPart]], segments: Mapping[int, Segment],
                 coordinator: RunOp) -> None:
        self.parts, self.segments, self.coordinator = parts, segments, coordinator

    def run(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> None:
        layer = self.segments[k].ops[0][0]
        h, idx = state["h"], state["idx"]
        wide = state["w"].astype(np.float64)  # float64 weights ask each part for its unrounded sum (engine.moe)
        chosen = [(part, *part_rows(part, idx)) for part in self.parts[k]]
        chosen = [(part, rows, ids) for part, rows, ids in chosen if len(rows)]
        sent: list[tuple[Client, int]] = []
        ys: dict[int, np.ndarray] = {}
        try:
            for part, rows, ids in chosen:
                if part.client is not None:
                    sent.append((part.client, part.client.start_segment(
                        part.segment_id, rows_seqs(rows, positions, batch), [("h", h[rows]), ("idx", ids),
                                                                             ("w", wide[rows])])))
            if "shared" not in state:  # every device busy
                self.coordinator((layer, "shared_experts"), state, positions, batch)
            for n, (part, rows, ids) in enumerate(chosen):
                if part.client is None:
                    here = {"h": h[rows], "idx": ids, "w": wide[rows]}
                    self.coordinator((layer, "moe_experts"), here, positions, batch)
                    ys[n] = here["y"]
        finally:
            replies = _finish_all(sent)
        remote = iter(replies)
        y = np.zeros(h.shape, dtype=np.float64)
        for n, (part, rows, _) in enumerate(chosen):
            y[rows] += ys[n] if part.client is None else next(remote)["y"]
        for name in ("h", "idx", "w"):
            state.pop(name)
        state["y"] = y.astype(np.float32)  # the float64 parts add exactly: the sum one device would make
        self.coordinator((layer, "moe_combine"), state, positions, batch)

    def clients(self, k: int) -> list[Client]:
        """The workers segment k asks."""
        return [p.client for p in self.parts[k] if p.client is not None]

    def kv(self, op: str, seq_id: int, n: int) -> None:
        """Nothing: expert segments keep no cache."""

    def close(self) -> None:
        """The workers' executors (OnWorker) free these segments with their own."""


def _finish_all(sent: Sequence[tuple[Client, int]]) -> list[dict[str, np.ndarray]]:
    """Every sent request's reply, in order; when one fails the others are still received (their connections
    stay in step) before the first error is raised."""
    replies, error = [], None
    for client, request in sent:
        try:
            replies.append(client.finish_segment(request))
        except (RPCError, OSError) as e:
            error = error or e
    if error is not None:
        raise error
    return replies

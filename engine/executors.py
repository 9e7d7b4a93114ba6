"""The executors of a distributed pass beyond this process's CPU (engine.forward_pass.Here): a GPU of this machine
and a worker. Both take a segment's inputs out of the pass state and put its outputs back, as over the wire; a
pass of several sequences runs there in one call (one round trip), each sequence named by its cache's seq_id."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np

from engine.batch import Batch
from engine.forward_pass import RunOp, State
from engine.placement import Segment
from engine.segments import SegmentRunner, SeqRun, ordered_state
from rpcnode.client import Client, RPCError


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


class OnWorker:
    """A worker's segments, each defined there once under an id: a run is one RunSegment request and one reply.
    While the worker runs a layer's routed experts alone, the coordinator runs that layer's shared experts."""

    def __init__(self, client: Client, segment_ids: Mapping[int, int], segments: Mapping[int, Segment],
                 coordinator: RunOp) -> None:
        self.client, self.segment_ids, self.segments, self.coordinator = client, segment_ids, segments, coordinator

    def run(self, k: int, state: State, positions: np.ndarray, batch: Batch) -> None:
        seg = self.segments[k]
        send = segment_inputs(seg, state)
        request = self.client.start_segment(self.segment_ids[k], seq_runs(positions, batch),
                                            [(n, state[n]) for n in send])
        try:
            if expert_only(seg) and "shared" not in state:  # both machines busy
                self.coordinator((seg.ops[0][0], "shared_experts"), state, positions, batch)
        finally:
            out = self.client.finish_segment(request)
        take_outputs(seg, state, send, out, self.coordinator, positions, batch)

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

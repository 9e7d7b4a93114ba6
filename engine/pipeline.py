"""A call's passes (its micro-batches) pipelined across devices: while a worker runs one pass's segment, this
thread runs other passes' segments here and sends others to idle workers.

Task (m, k) is pass m's segment k. It needs (m, k-1) done (its input state) and (m-1, k) started before it: each
sequence's KV rows are then written in order on every device (a segment here runs to its end once started; a
worker answers a connection's requests in order). Every task applies the same ops to the same rows as run_pass
does, so the logits are bit for bit those of the passes run one after another; only the order of independent
work changes.

A worker holds one run of ours at a time: it reads its next request only after sending its reply, so a second
large request could block on a full socket while that reply blocks on ours. One run per device still keeps every
device busy once as many passes as devices are in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.batch import Batch
from engine.forward_pass import Executor, ExpertsSplit, Item, OnWorker, Sent, State, begin, finish

Step = tuple[int, Executor]  # (segment index, the executor of its device)


@dataclass
class Flight:
    """A pass under way: its positions, batch and state, its next segment to start, its run on a worker."""

    positions: np.ndarray
    batch: Batch
    state: State
    next: int = 0
    sent: tuple[OnWorker, Sent] | None = None


def run_pipeline(steps: Sequence[Step], passes: Sequence[Sequence[Item]], all_logits: bool = False) -> list[np.ndarray]:
    """Each pass's logits, equal to run_pass's for the passes in order. At most one pass per device is under way
    (enough to keep all of them busy); a sequence's later passes reserve their cache rows after its earlier ones'."""
    window = len({id(ex) for _, ex in steps})
    todo = deque(passes)
    flights: list[Flight] = []  # passes begun and not finished, oldest first
    waiting: deque[Flight] = deque()  # passes whose run is on a worker, in the order sent
    logits: list[np.ndarray] = []
    try:
        while todo or flights:
            if todo and len(flights) < window:
                flights.append(Flight(*begin(todo.popleft(), all_logits, rows_ahead(flights))))
            elif (ready := next_task(steps, flights)) is not None:
                issue(steps[ready.next], ready, waiting)
            else:
                land(waiting.popleft())
            while flights and flights[0].next == len(steps) and flights[0].sent is None:
                done = flights.pop(0)
                logits.append(finish(done.batch, done.state))
    except BaseException:
        for f in waiting:  # another device failed: the replies still coming are of no use, but must not linger
            assert f.sent is not None
            f.sent[0].client.drop_runs()
        raise
    return logits


def rows_ahead(flights: Sequence[Flight]) -> dict[int, int]:
    """Cache rows the passes under way reserved and have not committed yet, by id of the cache."""
    ahead: dict[int, int] = {}
    for f in flights:
        for span in f.batch.spans:
            ahead[id(span.cache)] = ahead.get(id(span.cache), 0) + span.n
    return ahead


def next_task(steps: Sequence[Step], flights: Sequence[Flight]) -> Flight | None:
    """The pass whose next segment starts now: a run for an idle worker first (it computes meanwhile), else work
    here; the oldest pass first. None when every ready segment waits for a worker's reply."""
    busy = {id(f.sent[0]) for f in flights if f.sent is not None}
    busy_clients = {id(f.sent[0].client) for f in flights if f.sent is not None}
    here = None
    for i, f in enumerate(flights):
        k = f.next
        if f.sent is not None or k == len(steps) or (i > 0 and flights[i - 1].next <= k):
            continue
        executor = steps[k][1]
        if isinstance(executor, ExpertsSplit):  # it asks its workers itself: only those with no run of ours
            if not busy_clients & {id(c) for c in executor.clients(k)}:
                here = here or f
        elif not isinstance(executor, OnWorker):
            here = here or f
        elif id(executor) not in busy:
            return f
    return here


def issue(step: Step, f: Flight, waiting: deque[Flight]) -> None:
    """Start a pass's next segment: run it here, or send it to its worker and do the coordinator's share of it."""
    k, executor = step
    f.next += 1
    if not isinstance(executor, OnWorker):
        executor.run(k, f.state, f.positions, f.batch)
        return
    sent = executor.start(k, f.state, f.positions, f.batch)
    f.sent = executor, sent
    waiting.append(f)
    executor.overlap(sent, f.state, f.positions, f.batch)


def land(f: Flight) -> None:
    """Take the reply of a pass's run on a worker."""
    assert f.sent is not None
    executor, sent = f.sent
    f.sent = None
    executor.finish(sent, f.state, f.positions, f.batch)

"""The sequences of one forward pass: which rows of the pass state belong to which KV cache, and how a call's
tokens are packed into passes (micro-batches).

Legend: T rows of the pass (all sequences' new tokens, one after another), N sequences, n a sequence's rows.
A pass over N sequences runs every weight once over all T rows; only the attention core (cache write and read,
causal attention) runs per sequence, on that sequence's rows, cache and positions (the pass's `positions` [T]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from engine.kv_cache import KVCache

Rows = slice | np.ndarray  # rows of the pass state: a slice where they are consecutive, else their indices


@dataclass(frozen=True)
class Span:
    """One sequence's rows [start, stop) of a pass, whose K/V go to `cache` (None in a segment without attention)."""

    cache: KVCache | None
    start: int
    stop: int
    ids: np.ndarray | None = None  # its token ids, where the pass knows them (the coordinator's passes)

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class Batch:
    """The spans of a pass, in row order, covering its rows exactly; one span is the single-sequence pass."""

    spans: tuple[Span, ...]

    @classmethod
    def of(cls, caches: Sequence[KVCache | None], counts: Sequence[int],
           ids: Sequence[np.ndarray] | None = None) -> Batch:
        """Sequences of counts[k] rows each (token ids ids[k], where known), one after another."""
        ends = np.cumsum(counts).tolist()
        tokens = ids if ids is not None else [None] * len(counts)
        return cls(tuple(Span(c, e - n, e, i) for c, n, e, i in zip(caches, counts, ends, tokens, strict=True)))

    @property
    def n_rows(self) -> int:
        return self.spans[-1].stop if self.spans else 0

    def out_rows(self, n_out: int) -> Rows:
        """The last n_out rows of each sequence (at least one, at most all of its rows): those whose logits a pass
        keeps. One sequence: a slice, so its pass reads x exactly as a single-sequence pass always has."""
        picks = [slice(s.stop - min(max(n_out, 1), s.n), s.stop) for s in self.spans]
        return picks[0] if len(picks) == 1 else rows_of(picks)

    def rows_where(self, keep: Sequence[bool]) -> Rows:
        """The rows of the spans where keep[k] holds."""
        return rows_of([s.rows for s, k in zip(self.spans, keep, strict=True) if k])


def rows_of(slices: Sequence[slice]) -> Rows:
    """Consecutive slices (the common case: all of a pass's sequences) as one slice, others as indices."""
    if all(a.stop == b.start for a, b in pairwise(slices)):
        return slice(slices[0].start, slices[-1].stop) if slices else slice(0, 0)
    return np.concatenate([np.arange(s.start, s.stop) for s in slices])


def batch_positions(starts: Sequence[int], counts: Sequence[int]) -> np.ndarray:
    """Each row's position in its own sequence: starts[k], starts[k] + 1, ... for counts[k] rows."""
    return np.concatenate([np.arange(p, p + n) for p, n in zip(starts, counts, strict=True)]).astype(np.int64)


class SeqRun(NamedTuple):
    """One sequence's rows of a run: its id, the position of its first new token, its count of new tokens. A run's
    sequences' rows follow each other in its arrays, in the order of its SeqRuns."""

    seq_id: int
    pos_start: int
    n_tokens: int


Piece = tuple[int, int, int]  # (item, first token, end token): one item's tokens in one pass


def micro_batches(lengths: Sequence[int], ubatch: int, max_sequences: int | None = None) -> list[list[Piece]]:
    """Items of lengths[k] new tokens packed into passes of at most `ubatch` rows (and `max_sequences` items):
    each pass takes the items in order, from each as many of its next tokens as the pass has room for. So a
    prompt longer than a pass goes in consecutive chunks, and a call's total rows take the fewest passes; every
    item's logits come from the pass holding its last token."""
    todo = [[k, 0, n] for k, n in enumerate(lengths)]  # item, next token, length
    passes: list[list[Piece]] = []
    while todo:
        room, piece = ubatch, []
        for item in todo:
            if room == 0 or (max_sequences is not None and len(piece) == max_sequences):
                break
            k, a, n = item
            b = min(n, a + room)
            piece.append((k, a, b))
            room -= b - a
            item[1] = b
        passes.append(piece)
        todo = [item for item in todo if item[1] < item[2]]
    return passes


"""The coordinator's side of each worker link, for the Live view: segment round trips per second and what each
cost beyond the worker's own compute (the network both ways and both sides' overheads).

Workers cannot measure this themselves (they see only their compute and the gaps between requests); this
process's model can, from its clients' counters (engine.bench.worker_traffic). No Textual here."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine.bench import WorkerTraffic, worker_traffic

HISTORY = 60  # readings kept per worker, as tui.telemetry keeps samples


@dataclass(frozen=True)
class LinkRates:
    """One worker's link over the last reading's interval."""

    per_s: float | None  # round trips per second (None: the first reading, no interval yet)
    beyond_ms: float | None  # mean ms per round trip beyond the worker's compute (None: no round trip)
    history: tuple[float, ...] = ()  # beyond_ms of earlier intervals, oldest first; 0 for an idle one


def link_rates(prev: WorkerTraffic | None, cur: WorkerTraffic, dt: float | None) -> LinkRates:
    """The interval between two readings of one worker's counters; without a previous reading, everything so far."""
    base = prev if prev is not None else WorkerTraffic(cur.device, 0, 0.0, 0.0, 0, 0)
    n = cur.round_trips - base.round_trips
    if n <= 0:  # idle, or counters that went back (a new model): nothing to average
        return LinkRates(0.0 if prev is not None else None, None)
    beyond = (cur.run_seconds - base.run_seconds) - (cur.worker_seconds - base.worker_seconds)
    return LinkRates(n / dt if prev is not None and dt else None, max(0.0, beyond) / n * 1e3)


class LinkMonitor:
    """Reads a model's worker counters when asked (on the UI's clock) and keeps each link's recent history."""

    def __init__(self, history: int = HISTORY) -> None:
        self._model: Any = None
        self._last: dict[str, tuple[float, WorkerTraffic]] = {}
        self._history: dict[str, deque[float]] = {}
        self._size = history

    def update(self, model: Any) -> dict[str, LinkRates]:
        """RPC[host:port] -> its link since the previous update (a new model starts over); {} for no model."""
        if model is not self._model:
            self._model, self._last, self._history = model, {}, {}
        if model is None:
            return {}
        now = time.monotonic()
        return {t.device: self._read(t, now) for t in worker_traffic(model)}

    def _read(self, cur: WorkerTraffic, now: float) -> LinkRates:
        prev = self._last.get(cur.device)
        r = link_rates(prev[1] if prev else None, cur, now - prev[0] if prev else None)
        self._last[cur.device] = (now, cur)
        history = self._history.setdefault(cur.device, deque(maxlen=self._size))
        history.append(r.beyond_ms or 0.0)
        return LinkRates(r.per_s, r.beyond_ms, tuple(history))


def format_link(r: LinkRates | None) -> tuple[str, str]:
    """(value, detail) for the panel: `0.84 ms/rt`, `42 rt/s`; an idle or unused link says so."""
    if r is None:
        return "–", "no model here uses this worker"
    if r.beyond_ms is None:
        return "–", "idle"
    rate = "" if r.per_s is None else f"{r.per_s:.0f} rt/s"
    return f"{r.beyond_ms:.2f} ms/rt", rate

"""The coordinator's view of each worker link (tui/link_stats.py): interval maths and the panel text (the Live
screen test reads it from a real model's workers)."""

from __future__ import annotations

from engine.bench import WorkerTraffic
from tui.link_stats import LinkRates, format_link, link_rates

DEV = "RPC[198.51.100.7:50052]"


def traffic(round_trips: int, run_s: float, worker_s: float) -> WorkerTraffic:
    return WorkerTraffic(DEV, round_trips, run_s, worker_s, 1000 * round_trips, 900 * round_trips)


def test_link_rates_over_an_interval_and_since_the_start() -> None:
    a, b = traffic(100, 1.0, 0.6), traffic(150, 1.5, 0.85)
    r = link_rates(a, b, 2.0)
    assert r.per_s == 25.0  # 50 round trips in 2 s
    assert abs(r.beyond_ms - (0.5 - 0.25) / 50 * 1e3) < 1e-9  # 5 ms each beyond the worker's compute
    first = link_rates(None, a, None)  # no earlier reading: the average so far, no rate yet
    assert first.per_s is None and abs(first.beyond_ms - 4.0) < 1e-9
    assert link_rates(b, b, 1.0) == LinkRates(0.0, None)  # idle
    assert link_rates(b, a, 1.0) == LinkRates(0.0, None)  # counters went back (another model): nothing to average


def test_format_link() -> None:
    assert format_link(None) == ("–", "no model here uses this worker")
    assert format_link(LinkRates(0.0, None)) == ("–", "idle")
    assert format_link(LinkRates(41.6, 0.843)) == ("0.84 ms/rt", "42 rt/s")
    assert format_link(LinkRates(None, 2.5)) == ("2.50 ms/rt", "")

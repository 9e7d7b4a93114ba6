"""`GET /metrics` in Prometheus' text format, and the reading of it back into a record (for the app's Serve screen)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.batching import SchedulerStats
from engine.bench import WorkerTraffic

PREFIX = "ikctl_"
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{worker="((?:[^"\\]|\\.)*)"\})?\s+(\S+)$')


def _escape(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: SchedulerStats, workers: Sequence[WorkerTraffic], requests_total: int) -> str:
    """The exposition text: requests, tokens and their throughput, slots and queue, and per worker its traffic."""
    out: list[str] = []

    def metric(name: str, kind: str, help: str, samples: Sequence[tuple[str, float]]) -> None:
        full = PREFIX + name + ("_total" if kind == "counter" else "")  # text format 0.0.4 names the sample
        out.append(f"# HELP {full} {help}")
        out.append(f"# TYPE {full} {kind}")
        for worker, value in samples:
            labels = f'{{worker="{_escape(worker)}"}}' if worker else ""
            out.append(f"{full}{labels} {value:.17g}")

    def one(name: str, kind: str, help: str, value: float) -> None:
        metric(name, kind, help, [("", value)])

    one("http_requests", "counter", "HTTP requests received", requests_total)
    one("requests_ok", "counter", "generations completed", stats.requests_ok)
    one("requests_failed", "counter", "generations ended by an error", stats.requests_failed)
    one("requests_cancelled", "counter", "generations whose client went away", stats.requests_cancelled)
    one("requests_rejected", "counter", "requests refused because the queue was full (429)", stats.requests_rejected)
    one("prompt_tokens", "counter", "prompt tokens read", stats.prompt_tokens)
    one("generated_tokens", "counter", "tokens generated", stats.generated_tokens)
    one("prompt_seconds", "counter", "seconds of batches that read prompt tokens", stats.prompt_seconds)
    one("decode_seconds", "counter", "seconds of batches that generated tokens", stats.decode_seconds)
    one("prompt_tokens_per_second", "gauge", "prompt tokens read per second of prompt batches",
        stats.prompt_tokens / stats.prompt_seconds if stats.prompt_seconds > 0 else 0.0)
    one("generated_tokens_per_second", "gauge", "tokens generated per second of decode batches (all slots)",
        stats.generated_tokens / stats.decode_seconds if stats.decode_seconds > 0 else 0.0)
    one("slots", "gauge", "sequence slots (-np)", stats.slots)
    one("slots_active", "gauge", "slots holding a request", stats.active)
    one("requests_queued", "gauge", "requests waiting for a slot", stats.queued)
    one("ready", "gauge", "1 when the server answers, 0 while a worker is down", 0 if stats.problem else 1)
    if workers:
        def each(f: object) -> list[tuple[str, float]]:
            return [(w.device, f(w)) for w in workers]  # type: ignore[operator]

        metric("worker_up", "gauge", "0 when the last worker failure names this worker",
               each(lambda w: 0 if stats.problem and w.device in stats.problem else 1))
        metric("worker_round_trips", "counter", "segment round trips to the worker", each(lambda w: w.round_trips))
        metric("worker_round_trip_seconds", "counter", "time of those round trips, from sending to the reply read",
               each(lambda w: w.run_seconds))
        metric("worker_compute_seconds", "counter", "of which the worker computed", each(lambda w: w.worker_seconds))
        metric("worker_round_trip_overhead_seconds", "gauge",
               "mean time per round trip beyond the worker's compute (network, both sides' overheads)",
               each(lambda w: (w.run_seconds - w.worker_seconds) / w.round_trips if w.round_trips else 0.0))
        metric("worker_bytes_sent", "counter", "bytes sent to the worker", each(lambda w: w.bytes_sent))
        metric("worker_bytes_received", "counter", "bytes received from the worker", each(lambda w: w.bytes_received))
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class ServeSample:
    """What the Serve screen shows of one /metrics reading."""

    slots: int
    active: int
    queued: int
    requests: int  # generations ended, however
    generated_tokens: int
    prompt_tokens: int
    ready: bool


def parse(text: str) -> ServeSample:
    """The Serve screen's record from the exposition text (our own format; unknown lines are skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m and not m[2]:
            values[m[1].removeprefix(PREFIX)] = float(m[3])

    def get(name: str) -> int:
        return int(values.get(name, 0))

    done = sum(get(f"requests_{k}_total") for k in ("ok", "failed", "cancelled"))
    return ServeSample(get("slots"), get("slots_active"), get("requests_queued"), done,
                       get("generated_tokens_total"), get("prompt_tokens_total"), values.get("ready", 0) == 1)


@dataclass(frozen=True)
class ServeRates:
    requests_per_s: float
    tokens_per_s: float  # generated


def rates(prev: ServeSample, cur: ServeSample, seconds: float) -> ServeRates:
    if seconds <= 0:
        return ServeRates(0.0, 0.0)
    return ServeRates(max(0, cur.requests - prev.requests) / seconds,
                      max(0, cur.generated_tokens - prev.generated_tokens) / seconds)

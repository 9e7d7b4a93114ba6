"""Worker telemetry for the Live view: one polling connection per worker, rates from counters, a short history.

No Textual here: `TelemetryMonitor` runs one daemon thread per worker and keeps the latest `WorkerStatus` of each;
a UI (or a script) reads `monitor.latest()` on its own clock and renders only that."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from rpcnode.client import Client, RPCError
from rpcnode.protocol import Telemetry, rpc_device

HISTORY = 60  # samples kept per worker: a minute at the default interval
INTERVAL_S = 1.0
POLL_TIMEOUT_S = 3.0  # a worker busy with a long compute still answers telemetry (it has its own thread)


@dataclass(frozen=True)
class Sample:
    """One telemetry reply's counters and levels, with the worker's own clock (`uptime_s`)."""

    uptime_s: float
    busy_s: float
    bytes_in: int
    bytes_out: int
    rss_bytes: int
    bytes_held: int
    tensors_held: int
    mem_free_bytes: int
    cache_hits: int
    cache_misses: int
    kv_bytes: int = 0  # KV caches at the whole context, as the worker's memory limit counts them
    vram_total_bytes: int = 0  # a GPU worker's device memory as the driver sees it (0: a CPU worker)
    vram_free_bytes: int = 0


@dataclass(frozen=True)
class Rates:
    """Between two samples: the share of time the worker computed segments, network bytes/s (None: not measurable)."""

    busy: float | None = None
    in_per_s: float | None = None
    out_per_s: float | None = None


def rates(prev: Sample | None, cur: Sample, own_in: int = 0, own_out: int = 0) -> Rates:
    """Rates over the worker's own clock. `own_in`/`own_out` are the monitor's own request/reply bytes in the
    interval, subtracted so that an idle worker reads 0 B/s. None after a restart (uptime went back)."""
    if prev is None:
        return Rates()
    dt = cur.uptime_s - prev.uptime_s
    if dt <= 0 or cur.bytes_in < prev.bytes_in or cur.bytes_out < prev.bytes_out:
        return Rates()
    busy = min(1.0, max(0.0, (cur.busy_s - prev.busy_s) / dt))
    return Rates(busy, max(0, cur.bytes_in - prev.bytes_in - own_in) / dt,
                 max(0, cur.bytes_out - prev.bytes_out - own_out) / dt)


@dataclass(frozen=True)
class DeviceFacts:
    """What the worker said about its device when we connected: kind, name, capacity, threads."""

    kind: str  # "cpu" or "cuda"
    name: str
    mem_total_bytes: int
    threads: int
    cache_entries: int
    cache_bytes: int


@dataclass(frozen=True)
class WorkerStatus:
    """The latest view of one worker: up with its last sample and rates, or down with the one-line reason."""

    endpoint: str
    up: bool
    error: str | None = None
    facts: DeviceFacts | None = None
    sample: Sample | None = None
    rates: Rates = field(default_factory=Rates)
    busy_history: tuple[float, ...] = ()  # 0..1, oldest first
    in_history: tuple[float, ...] = ()  # bytes/s
    out_history: tuple[float, ...] = ()
    polled_at: float = 0.0  # time.monotonic() of this status

    @property
    def device(self) -> str:
        """Its name in placement rules."""
        return rpc_device(self.endpoint)

    @property
    def is_gpu(self) -> bool:
        return self.facts is not None and self.facts.kind == "cuda"

    @property
    def ram_bytes(self) -> int | None:
        """Host memory the worker process uses (its RSS)."""
        return self.sample.rss_bytes if self.sample else None

    @property
    def held_bytes(self) -> int | None:
        """Tensor bytes it holds on its device (RAM for a CPU worker, VRAM for a GPU worker)."""
        return self.sample.bytes_held if self.sample else None

    @property
    def vram(self) -> tuple[int, int] | None:
        """(used, total) of a GPU worker's device memory as the driver reports it; None for a CPU worker."""
        s = self.sample
        if s is None or not s.vram_total_bytes:
            return None
        return s.vram_total_bytes - s.vram_free_bytes, s.vram_total_bytes

    @property
    def capacity_bytes(self) -> int | None:
        """The bytes its device may hold (its -m, or the machine's RAM / the GPU's memory)."""
        return self.facts.mem_total_bytes if self.facts else None


def reported_capacities(latest: Mapping[str, WorkerStatus]) -> dict[str, int]:
    """RPC[host:port] -> the memory each worker reported when we connected: what the engine plans against when
    --device-mem does not say otherwise."""
    return {s.device: s.facts.mem_total_bytes for s in latest.values() if s.facts is not None}


def _sample(t: Telemetry) -> Sample:
    # getattr: the VRAM fields are new in the protocol (minor version); a worker without them reads as a CPU one
    return Sample(t.uptime_seconds, t.busy_seconds, t.bytes_in, t.bytes_out, t.rss_bytes, t.bytes_held,
                  t.tensors_held, t.mem_free_bytes, t.cache_hits, t.cache_misses, t.kv_bytes,
                  getattr(t, "vram_total_bytes", 0), getattr(t, "vram_free_bytes", 0))


class WorkerTelemetry:
    """Polls one worker on a connection of its own (never the model's, which may be mid-request); one caller
    at a time. A failed poll drops the connection; the next one reconnects."""

    def __init__(self, endpoint: str, token: str | None = None, history: int = HISTORY,
                 timeout: float = POLL_TIMEOUT_S) -> None:
        self.endpoint, self.token, self.timeout = endpoint, token, timeout
        self._client: Client | None = None
        self._facts: DeviceFacts | None = None
        self._prev: Sample | None = None
        self._busy: deque[float] = deque(maxlen=history)
        self._in: deque[float] = deque(maxlen=history)
        self._out: deque[float] = deque(maxlen=history)

    def poll(self) -> WorkerStatus:
        """One telemetry request; never raises: a worker that does not answer is down with the reason."""
        try:
            client = self._client
            if client is None:
                client = Client.connect(self.endpoint, self.token, name="ikctl-telemetry", timeout=self.timeout)
                self._client, self._prev = client, None
                info = client.device_info()
                self._facts = DeviceFacts(info.device, info.name, info.mem_total_bytes, info.threads,
                                          info.cache_entries, info.cache_bytes)
            sent, received = client.counters.bytes_sent, client.counters.bytes_received
            t = client.telemetry()
            own_in, own_out = client.counters.bytes_sent - sent, client.counters.bytes_received - received
        except (RPCError, OSError) as e:
            self.close()
            return WorkerStatus(self.endpoint, False, _one_line(e), self._facts, self._prev,
                                busy_history=tuple(self._busy), in_history=tuple(self._in),
                                out_history=tuple(self._out), polled_at=time.monotonic())
        cur = _sample(t)
        r = rates(self._prev, cur, own_in, own_out)
        self._prev = cur
        if r.busy is not None:
            self._busy.append(r.busy)
            self._in.append(r.in_per_s or 0.0)
            self._out.append(r.out_per_s or 0.0)
        return WorkerStatus(self.endpoint, True, None, self._facts, cur, r, tuple(self._busy), tuple(self._in),
                            tuple(self._out), time.monotonic())

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


class TelemetryMonitor:
    """Polls a set of workers, each on its own daemon thread every `interval` seconds (a slow or dead worker never
    delays the others), and keeps each one's latest status. Workers can be added and removed while it runs."""

    def __init__(self, interval: float = INTERVAL_S, history: int = HISTORY, timeout: float = POLL_TIMEOUT_S,
                 on_status: Callable[[WorkerStatus], None] | None = None) -> None:
        self.interval, self.history, self.timeout, self.on_status = interval, history, timeout, on_status
        self._latest: dict[str, WorkerStatus] = {}
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> list[str]:
        with self._lock:
            return list(self._stops)

    def watch(self, endpoints: Iterable[str], tokens: Mapping[str, str | None] | None = None,
              default_token: str | None = None) -> None:
        """Start polling each endpoint not watched yet, with its token (else `default_token`)."""
        tokens = tokens or {}
        for ep in endpoints:
            with self._lock:
                if ep in self._stops:
                    continue
                stop = self._stops[ep] = threading.Event()
                self._latest.setdefault(ep, WorkerStatus(ep, False, "connecting…"))
            worker = WorkerTelemetry(ep, tokens.get(ep, default_token), self.history, self.timeout)
            threading.Thread(target=self._follow, args=(worker, stop), name=f"telemetry {ep}", daemon=True).start()

    def unwatch(self, endpoints: Iterable[str]) -> None:
        """Stop polling these endpoints and forget them."""
        with self._lock:
            for ep in endpoints:
                stop = self._stops.pop(ep, None)
                if stop is not None:
                    stop.set()
                self._latest.pop(ep, None)

    def latest(self) -> dict[str, WorkerStatus]:
        """Each watched worker's newest status, in the order watched."""
        with self._lock:
            return {ep: self._latest[ep] for ep in self._stops if ep in self._latest}

    def close(self) -> None:
        self.unwatch(self.endpoints)

    def _follow(self, worker: WorkerTelemetry, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                status = worker.poll()
                with self._lock:
                    if stop.is_set():
                        break
                    self._latest[worker.endpoint] = status
                if self.on_status is not None:
                    self.on_status(status)
                stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            worker.close()

"""The Live view's model: rates from telemetry counters, polling real local workers, a worker going down, and the
local workers the app owns; plus the pure formatters of the Live and load views."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3

from rpcnode.client import Client, OfferSpec
from tui.live_format import format_duration, format_rate, load_bar, sparkline
from tui.local_workers import LocalWorkers
from tui.telemetry import (
    DeviceFacts,
    Rates,
    Sample,
    TelemetryMonitor,
    WorkerStatus,
    WorkerTelemetry,
    rates,
    reported_capacities,
)
from tui.widgets.worker_panel import render_worker


def sample(uptime: float, busy: float = 0.0, bytes_in: int = 0, bytes_out: int = 0) -> Sample:
    return Sample(uptime, busy, bytes_in, bytes_out, 100 << 20, 4 << 20, 3, 1 << 30, 2, 1)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """Two real workers on loopback, caches under a temporary IKCTL_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IKCTL_CACHE", str(tmp_path_factory.mktemp("ikctl-cache")))
        workers = LocalWorkers(threads=1)
        workers.start(2)
        yield workers
        workers.close()


# ---- pure ---------------------------------------------------------------------------------------------------------

def test_rates_use_the_worker_clock_and_leave_out_the_monitor_own_bytes() -> None:
    prev, cur = sample(10.0, 1.0, 1000, 5000), sample(12.0, 1.5, 3000, 5400)
    r = rates(prev, cur, own_in=200, own_out=400)
    assert r.busy == pytest.approx(0.25)
    assert r.in_per_s == pytest.approx((2000 - 200) / 2)
    assert r.out_per_s == 0.0  # only our own reply went out
    assert rates(None, cur) == Rates()
    # a restarted worker: its clock and counters went back, so nothing is measurable this time
    assert rates(cur, sample(1.0, 0.0, 10, 10)) == Rates()


def test_sparkline_and_formatters() -> None:
    assert sparkline([0, 0.5, 1.0], 3, top=1.0) == "▁▅█"
    assert sparkline([1, 2], 5) == "   ▅█"  # right-aligned: the newest at the right edge
    assert sparkline([5] * 10, 4) == "████"
    assert sparkline([], 3) == "   "
    assert format_rate(None) == "–" and format_rate(1536) == "1.5 KiB/s"
    assert [format_duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
    bar = load_bar(bytes_hit=25, bytes_sent=25, bytes_total=100, width=8)
    assert bar.plain == "████░░░░"
    assert [(s.start, s.end) for s in bar.spans][:2] == [(0, 2), (2, 4)]  # hit, then sent
    assert load_bar(0, 0, 0, 4).plain == "████"  # nothing to load is done


def test_a_down_worker_panel_says_why() -> None:
    facts = DeviceFacts("cpu", "x86_64", 8 << 30, 2, 0, 0)
    status = WorkerStatus("127.0.0.1:9", False, "RPC[127.0.0.1:9]: cannot connect: Connection refused", facts,
                          sample(5.0), busy_history=(0.5,))
    text = render_worker(status, 80, "R1").plain
    assert "✗ RPC[127.0.0.1:9]: cannot connect: Connection refused" in text
    assert "busy" in text and "4.0 MiB / 8.0 GiB" in text
    assert reported_capacities({"127.0.0.1:9": status}) == {"RPC[127.0.0.1:9]": 8 << 30}


def test_a_gpu_worker_panel_shows_vram_in_use_and_the_process_ram() -> None:
    facts = DeviceFacts("cuda", "RTX 3090", 22 << 30, 1, 0, 0)
    s = Sample(60.0, 1.0, 0, 0, 512 << 20, 4 << 30, 10, 0, 10, 0, 1 << 30, 24 << 30, 18 << 30)
    status = WorkerStatus("127.0.0.1:9", True, None, facts, s)
    assert status.is_gpu and status.vram == (6 << 30, 24 << 30)
    ram, vram = render_worker(status, 100).plain.splitlines()[1:3]
    assert ram == "RAM   process 512.0 MiB"
    assert vram.startswith("VRAM  ") and "6.0 GiB / 24.0 GiB (25%) in use · tensors 5.0 GiB of 22.0 GiB" in vram


# ---- against real workers -----------------------------------------------------------------------------------------

def offer_random_tensor(endpoint: str, n_bytes: int) -> None:
    data = np.random.default_rng().integers(0, 255, n_bytes, dtype=np.uint8).tobytes()
    spec = OfferSpec(blake3(data).hexdigest(), n_bytes, 0, [n_bytes // 4], "test.weight", lambda: data)
    with Client.connect(endpoint) as c:
        assert c.offer([spec]) == {spec.digest: "uploaded"}


def test_poll_reports_facts_rates_and_history(local: LocalWorkers) -> None:
    w = WorkerTelemetry(local.endpoints[0], history=5)
    first = w.poll()
    assert first.up and first.error is None and first.facts is not None
    assert first.facts.kind == "cpu" and first.facts.threads == 1 and first.capacity_bytes
    assert first.rates == Rates() and first.busy_history == ()
    time.sleep(0.05)
    idle = w.poll()
    assert idle.rates.in_per_s == 0.0 and idle.rates.out_per_s == 0.0  # the poll's own bytes are left out
    offer_random_tensor(local.endpoints[0], 1 << 20)
    busy = w.poll()
    assert busy.rates.in_per_s is not None and busy.rates.in_per_s > 0
    assert busy.sample is not None and busy.sample.cache_misses >= 1 and busy.sample.bytes_held >= 1 << 20
    for _ in range(6):
        last = w.poll()
    assert len(last.busy_history) == 5 and len(last.in_history) == 5  # a short history, oldest dropped
    w.close()


def test_monitor_follows_workers_and_a_dead_one_goes_down(tmp_path: Path, local: LocalWorkers) -> None:
    extra = LocalWorkers(threads=1)
    try:
        (victim,) = extra.start(1)
        monitor = TelemetryMonitor(interval=0.1)
        monitor.watch([*local.endpoints, victim.endpoint])
        deadline = time.monotonic() + 20
        while not all(s.up for s in monitor.latest().values()):
            assert time.monotonic() < deadline, monitor.latest()
            time.sleep(0.05)
        assert list(monitor.latest()) == [*local.endpoints, victim.endpoint]
        assert extra.stop(victim) == "stopped"
        while monitor.latest()[victim.endpoint].up:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        down = monitor.latest()[victim.endpoint]
        assert down.error is not None and down.error.startswith(f"RPC[{victim.endpoint}]")
        assert "\n" not in down.error
        assert all(monitor.latest()[ep].up for ep in local.endpoints)  # the others go on
        monitor.unwatch([victim.endpoint])
        assert list(monitor.latest()) == local.endpoints
        monitor.close()
        assert monitor.latest() == {}
    finally:
        extra.close()


def test_local_workers_start_log_and_stop() -> None:
    lw = LocalWorkers(threads=1)
    try:
        (w,) = lw.start(1)
        assert w.running and w.endpoint.startswith("127.0.0.1:")
        assert any("listening on" in line for line in w.log_tail())
        assert lw.endpoints == [w.endpoint]
        assert lw.stop(w) == "stopped" and not w.running
        assert lw.endpoints == [] and lw.workers == [w]  # stays listed, with its log
        assert lw.stop(w) == "not running (already gone)"
    finally:
        lw.close()
    assert not lw.directory.exists()


def test_a_worker_that_cannot_start_is_one_line() -> None:
    lw = LocalWorkers(threads=1, extra=["-m", "lots"])
    try:
        with pytest.raises(Exception, match=r"local worker exited with status \d+: rpcnode: error: .*lots"):
            lw.start(1)
        assert lw.workers == []
    finally:
        lw.close()


def test_the_model_layer_does_not_import_textual() -> None:
    # the CLI (or a script) can use these without the TUI; the screens are a thin skin over them
    import subprocess
    import sys

    probe = ("import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))")
    modules = ["tui.telemetry", "tui.local_workers", "tui.shared_model", "tui.host_board", "tui.live_format"]
    out = subprocess.run([sys.executable, "-c", probe, *modules], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

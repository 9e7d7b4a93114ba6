"""Snapshots of each TUI screen at 80x24 and 120x40 (update with `pytest --snapshot-update`, then look).

Telemetry, probes and loads are canned here (a monitor and a host board that do no I/O), so that ports, uptimes
and rates are the same on every run; tests/tui/test_live_app.py and test_hosts_screen.py drive real workers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from engine.cluster import ClusterWorker
from engine.distributed import LoadProgress
from engine.placement import PlacementRules
from tests.tui.test_bench_layout import TRAFFIC, finish_a_sweep
from tui.app import make_app
from tui.host_board import HostBoard, WorkerEntry
from tui.inventory import Host
from tui.messages import LoadProgressed
from tui.probe import Gpu, HostFacts, HostProbe, ProbeResults
from tui.screens.placement import PlacementScreen
from tui.telemetry import DeviceFacts, Rates, Sample, TelemetryMonitor, WorkerStatus

RPC = "127.0.0.1:50052"
SIZES = [(80, 24), (120, 40)]
W1, W2 = "10.0.0.2:50052", "10.0.0.3:50052"


class CannedMonitor(TelemetryMonitor):
    """Statuses given up front; polls nothing."""

    def __init__(self, statuses: Iterable[WorkerStatus] = ()) -> None:
        super().__init__()
        self.statuses = {s.endpoint: s for s in statuses}

    def watch(self, endpoints: Iterable[str], tokens: Mapping[str, str | None] | None = None,
              default_token: str | None = None) -> None:
        pass

    def latest(self) -> dict[str, WorkerStatus]:
        return dict(self.statuses)


def wave(n: int, scale: float, phase: int = 0) -> tuple[float, ...]:
    return tuple(scale * ((i + phase) % 7) / 6 for i in range(n))


def live_statuses() -> list[WorkerStatus]:
    facts = DeviceFacts("cpu", "x86_64", 48 << 30, 8, 120, 30 << 30)
    up = WorkerStatus(W1, True, None, facts, Sample(3723, 900.0, 5 << 30, 1 << 30, 31 << 30, 29 << 30, 410,
                                                    10 << 30, 380, 30), Rates(0.62, 2.5e6, 1.1e6),
                      wave(60, 1.0), wave(60, 3e6, 2), wave(60, 1.5e6, 4))
    down = WorkerStatus(W2, False, f"RPC[{W2}]: cannot connect: Connection refused; is `ikctl rpcnode` running "
                        "there?", DeviceFacts("cpu", "aarch64", 16 << 30, 4, 0, 0),
                        Sample(60, 10.0, 1 << 20, 1 << 20, 2 << 30, 1 << 30, 20, 15 << 30, 0, 20),
                        busy_history=wave(12, 1.0), in_history=wave(12, 1e5), out_history=wave(12, 1e5))
    gpu = WorkerStatus("10.0.0.4:50053", True, None, DeviceFacts("cuda", "NVIDIA GeForce RTX 3090", 22 << 30, 1, 0, 0),
                       Sample(3600, 2000.0, 9 << 30, 2 << 30, 900 << 20, 18 << 30, 300, 3 << 30, 300, 0, 1 << 30,
                              24 << 30, 4 << 30), Rates(0.91, 1.2e6, 1.2e6),
                       wave(60, 1.0, 3), wave(60, 2e6, 1), wave(60, 2e6, 5))
    return [gpu, down, up]


class CannedBoard(HostBoard):
    """Two hosts, one probed fine with a worker, one unreachable; no I/O."""

    def __init__(self) -> None:
        super().__init__([Host(name="box1", ssh="me@10.0.0.2"), Host(name="box2", ssh="me@10.0.0.3")])
        self.launched["box1"] = [ClusterWorker(host="box1", device="cpu", endpoint=W1, token="t", mem_bytes=48 << 30,
                                               threads=8, pid=4242, log="~/.cache/ikctl/workers/cpu-50052.log",
                                               token_file="~/.cache/ikctl/workers/cpu-50052.token", ssh="me@10.0.0.2")]

    async def probe(self, timeout: float = 10.0) -> ProbeResults:
        facts = HostFacts("Linux", "x86_64", 16, 64 << 30, 40 << 30, (Gpu("RTX 3090", 24 << 30, 23 << 30),),
                          "/usr/bin/python3", "3.11.2", "0.1.0", True)
        probes = (HostProbe(self.hosts[0], facts, None, 0.2), HostProbe(self.hosts[1], None, "timeout after 10 s", 10))
        self.probes.update({p.host.name: p for p in probes})
        return ProbeResults(probes)

    async def log_tail(self, entry: WorkerEntry, n: int = 20) -> list[str]:
        return [f"rpcnode: listening on {entry.endpoint} (device cpu, 8 threads, memory 51539607552 bytes, "
                "cache ~/.cache/ikctl/rpcnode-cache, auth on)", "rpcnode: connection from 10.0.0.1:40112"]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """IKCTL_CACHE in a temporary dir: the embedded model is made once, and its name is the same everywhere."""
    path = tmp_path_factory.mktemp("ikctl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IKCTL_CACHE", str(path))
        yield path


async def workers_done(pilot: Pilot[Any]) -> None:
    """Wait for the workers, their messages, and the tab underline's animation (else it is caught mid-slide).
    Cursors stop blinking (always drawn), so that a slow run does not catch one in the other half of a blink."""
    for widget in pilot.app.screen.query("Input, TextArea"):
        widget.cursor_blink = False  # type: ignore[attr-defined]
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    if isinstance(pilot.app.screen, PlacementScreen):
        for _ in range(100):  # the header's message, then the plan it triggers, may take a few turns
            if pilot.app.screen.placement is not None:
                break
            await pilot.pause(0.05)
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_placement_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    rules = PlacementRules.from_flags([f"exps=RPC[{RPC}]"], rpc=RPC)
    app = make_app(rules=rules, capacities={f"RPC[{RPC}]": 8 << 20}, monitor=CannedMonitor())
    assert snap_compare(app, terminal_size=size, run_before=workers_done)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_placement_screen_bad_regex(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    async def break_the_rule(pilot: Pilot[Any]) -> None:
        await workers_done(pilot)
        pilot.app.screen.query_one("#ot").load_text("exps(=CPU")
        await workers_done(pilot)

    assert snap_compare(make_app(), terminal_size=size, run_before=break_the_rule)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_generate_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    assert snap_compare(make_app(start_mode="generate"), terminal_size=size, run_before=workers_done)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    assert snap_compare(make_app(start_mode="bench"), terminal_size=size, run_before=workers_done)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_screen_after_a_sweep(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    """32 rows over two workers (canned): at 80x24 the table keeps its last rows and the plot its height."""
    async def swept(pilot: Pilot[Any]) -> None:
        await workers_done(pilot)
        await finish_a_sweep(pilot.app, pilot, 4096, TRAFFIC)  # type: ignore[arg-type]
        await workers_done(pilot)

    assert snap_compare(make_app(start_mode="bench"), terminal_size=size, run_before=swept)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_placement_screen_applying(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    rules = PlacementRules.from_flags([f"exps=RPC[{W2}]"], 99, "1,1", f"{W1},{W2}")

    async def loading(pilot: Pilot[Any]) -> None:
        await workers_done(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, PlacementScreen)
        # as the model thread reports it: the first worker done (mostly from its cache), the second half-way
        screen.applying, screen.load_flags, screen.load_note = True, screen.flags, "loading…"
        for p in (LoadProgress(f"RPC[{W1}]", 40, 40, 3 << 20, 3 << 20, (5 << 20) // 2, 1 << 19),
                  LoadProgress(f"RPC[{W2}]", 10, 24, 2 << 20, 5 << 20, 0, 2 << 20)):
            screen.load_progressed(LoadProgressed(p, screen.load_run))
        screen.show_load_status()
        await workers_done(pilot)

    app = make_app(rules=rules, monitor=CannedMonitor())
    assert snap_compare(app, terminal_size=size, run_before=loading)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_live_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    app = make_app(start_mode="live", monitor=CannedMonitor(live_statuses()))
    assert snap_compare(app, terminal_size=size, run_before=workers_done)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_hosts_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    app = make_app(start_mode="hosts", board=CannedBoard(), monitor=CannedMonitor(live_statuses()))
    assert snap_compare(app, terminal_size=size, run_before=workers_done)

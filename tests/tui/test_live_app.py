"""Pilot tests against real local workers on loopback: apply a plan (a load bar per worker), edit an -ot rule and
apply again, generate and bench on the shared model, the Live panels, a worker going down, a failed load."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Static, TextArea

from engine.placement import PlacementRules
from tests.tui.test_app import notifications, run_async, settle, text_of
from tui.app import IkctlApp, make_app
from tui.bench_results import traffic_cells
from tui.local_workers import LocalWorkers
from tui.screens.bench import BenchScreen
from tui.screens.generate import GenerateScreen
from tui.screens.live import LiveScreen
from tui.screens.placement import PlacementScreen
from tui.shared_model import is_distributed
from tui.widgets.worker_panel import WorkerPanel

SIZE = (120, 40)
WAIT_S = 30.0


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """Two real workers on loopback; the embedded model and the workers' caches under a temporary IKCTL_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IKCTL_CACHE", str(tmp_path_factory.mktemp("ikctl-cache")))
        mp.delenv("IKCTL_RPC_TOKEN", raising=False)
        mp.delenv("IKCTL_RPC_TOKEN_FILE", raising=False)
        workers = LocalWorkers(threads=1)
        workers.start(2)
        yield workers
        workers.close()


def split_app(local: LocalWorkers, **kwargs: object) -> IkctlApp:
    """The embedded default's placement: every layer on the two workers, split evenly."""
    rules = PlacementRules.from_flags([], 99, "1,1", ",".join(local.endpoints))
    return make_app(rules=rules, model_options={"threads": 1}, **kwargs)  # type: ignore[arg-type]


def errors(app: IkctlApp) -> list[str]:
    return [n.message for n in app._notifications if n.severity == "error"]


async def until(pilot: object, condition: object, what: str) -> None:
    """Let the app run until `condition()` holds (telemetry arrives on its own clock)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)  # type: ignore[attr-defined]


@run_async
async def test_apply_plan_shows_each_worker_load_then_an_ot_edit_replans_and_reloads(local: LocalWorkers) -> None:
    r1, r2 = (f"RPC[{ep}]" for ep in local.endpoints)
    app = split_app(local)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, PlacementScreen)
        assert "ctrl+l loads the model" in text_of(app, "#load-status")
        await pilot.press("ctrl+l")
        await settle(app, pilot)
        assert screen.load_note.startswith("✓ loaded in"), screen.load_note
        assert set(screen.loads) == {r1, r2}
        for p in screen.loads.values():
            assert p.tensors_done == p.tensors_total > 0
            assert p.bytes_hit + p.bytes_sent == p.bytes_done == p.bytes_total > 0
        assert screen.loads[r1].bytes_sent > 0  # a fresh cache: the first worker's tensors are sent
        bars = text_of(app, "#bars")
        assert bars.count(" + ") == 2  # per worker: bytes found in its cache + bytes sent
        assert "in the worker's cache" in text_of(app, "#load-status")  # the colours' legend
        assert is_distributed(app.shared.model) and app.shared.loaded_flags == screen.flags
        assert any(m.startswith("loaded in") for m in notifications(app))
        # the plan sees what the workers report (the engine plans against it too)
        await until(pilot, lambda: screen.reported.keys() == {r1, r2}, "reported capacities")
        await until(pilot, lambda: "N/A" not in text_of(app, "#bars").split(r1)[1].splitlines()[1],
                    "the bars redrawn with the reported capacities")

        # move every expert to the second worker: the plan changes at once, the load bars wait for ctrl+l
        before = dict(screen.placement.bytes_per_device)
        screen.query_one("#ot", TextArea).insert(f"exps={r2}")
        await pilot.pause()
        assert screen.error is None
        exps = sum(n for name, n in screen.header.tensors if "_exps." in name)  # type: ignore[union-attr]
        after = screen.placement.bytes_per_device
        assert after[r2] > before[r2] and after[r1] < before[r1] and after[r2] - before[r2] <= exps
        assert " + " not in text_of(app, "#bars") and "the flags changed since" in text_of(app, "#load-status")
        await pilot.press("ctrl+l")
        await settle(app, pilot)
        assert screen.load_note.startswith("✓"), screen.load_note
        # the experts moved to r2 were on r1 before: r2 finds them in the cache the two local workers share
        assert screen.loads[r2].bytes_hit > 0
        assert app.shared.loads == 2 and app.shared.loaded_flags.ot_lines() == [f"exps={r2}"]


@run_async
async def test_generate_and_bench_use_the_applied_model_and_live_shows_the_traffic(local: LocalWorkers) -> None:
    app = split_app(local)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+l")
        await settle(app, pilot)
        model = app.shared.model
        assert is_distributed(model)

        await pilot.press("f2")
        gen = app.screen
        assert isinstance(gen, GenerateScreen)
        gen.query_one("#n-predict", Input).value = "8"
        gen.query_one("#temp", Input).value = "0"
        await pilot.press(*"Hi", "enter")
        await settle(app, pilot)
        assert [m["role"] for m in gen.history] == ["user", "assistant"] and gen.history[1]["content"]
        assert app.shared.model is model and app.shared.loads == 1  # no second load

        await pilot.press("f3")
        bench = app.screen
        assert isinstance(bench, BenchScreen)
        for selector, value in (("#ctx", "64"), ("#ubatch", "16"), ("#n-gen", "2")):
            bench.query_one(selector, Input).value = value
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert bench.query_one("#bench-table", DataTable).row_count == 4 and errors(app) == []
        assert app.shared.model is model
        # each worker's part of the sweep, as `ikctl bench` prints it
        assert sorted(t.device for t in bench.traffic) == sorted(model.net.clients)
        assert all(t.round_trips > 0 and t.bytes_sent > 0 for t in bench.traffic)
        table = bench.query_one("#bench-traffic", DataTable)  # one row per worker, as `ikctl bench` prints it
        assert table.display and table.row_count == len(bench.traffic)
        shown = [tuple(str(c) for c in table.get_row_at(k)) for k in range(table.row_count)]
        assert sorted(shown) == sorted(traffic_cells(t) for t in bench.traffic)

        await pilot.press("f4")
        live = app.screen
        assert isinstance(live, LiveScreen)
        await until(pilot, lambda: len(live.panels) == 2 and all(
            p.status and p.status.up and p.status.sample and p.status.sample.tensors_held
            for p in live.panels.values()), "two live panels")
        text = text_of(app, "#live-status")
        assert text.startswith("2 workers, 2 up")
        for ep, panel in live.panels.items():
            shown = str(panel.render())
            assert f"RPC[{ep}]" in shown and "held" in shown and "hits" in shown and "busy" in shown
            # this process's round trips to it: the first reading averages those so far (the bench's) beyond the
            # worker's compute, the next ones find the link idle
            link = panel.link
            assert link is not None and link.history and link.history[0] > 0
            assert (f"{link.beyond_ms:.2f} ms/rt" if link.beyond_ms is not None else "idle") in shown
        await pilot.press("p")
        assert live.paused and "paused" in text_of(app, "#live-status")


@run_async
async def test_live_shows_a_worker_that_stops_as_down(local: LocalWorkers) -> None:
    extra = LocalWorkers(threads=1)
    try:
        (victim,) = extra.start(1)
        rules = PlacementRules.from_flags([], 0, None, ",".join([*local.endpoints, victim.endpoint]))
        app = make_app(rules=rules, start_mode="live")
        async with app.run_test(size=(80, 24)) as pilot:
            live = app.screen
            assert isinstance(live, LiveScreen)
            await until(pilot, lambda: len(live.panels) == 3 and all(
                p.status and p.status.up for p in live.panels.values()), "three workers up")
            extra.stop(victim)
            panel = live.panels[victim.endpoint]
            await until(pilot, lambda: panel.has_class("-down"), "the stopped worker down")
            assert f"✗ RPC[{victim.endpoint}]: " in str(panel.render())
            assert text_of(app, "#live-status").startswith("3 workers, 2 up")
            assert isinstance(live.query(WorkerPanel).first(), WorkerPanel)
            titles = {c.title for c in app.get_system_commands(live)}
            assert {"Show live", "Show hosts", "Live: pause or resume"} <= titles
            assert "Hosts: stop workers" not in titles
    finally:
        extra.close()


@run_async
async def test_a_failed_apply_is_one_line_and_keeps_the_loaded_model(local: LocalWorkers, tmp_path: Path) -> None:
    app = split_app(local)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, PlacementScreen)
        await pilot.press("ctrl+l")
        await settle(app, pilot)
        good = app.shared.model
        dead = "127.0.0.1:9"  # the discard port: nothing listens there
        screen.query_one("#rpc", Input).value = f"{local.endpoints[0]},{dead}"
        screen.query_one("#tensor-split", Input).value = "1,1"
        await pilot.pause()
        await pilot.click("#apply")
        await settle(app, pilot)
        assert screen.load_note.startswith(f"✗ not loaded: RPC[{dead}]: cannot connect")
        assert screen.query_one("#load-status", Static).has_class("-error")
        (message,) = [m for m in notifications(app) if dead in m]
        assert "\n" not in message and message.startswith(f"RPC[{dead}]: cannot connect")
        assert app.shared.model is good  # a failed load loses nothing

"""Pilot tests of the Hosts screen with real workers: the app's own local workers (probe, launch one more, read a
log, stop them all) and a hosts-file host launched and stopped through tui.launch / tui.stop without SSH."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable

from engine.cluster import read_cluster
from engine.placement import PlacementRules
from tests.tui.test_app import run_async, settle, text_of
from tests.tui.test_live_app import errors, until
from tui.app import make_app
from tui.host_board import LOCAL_NAME, HostBoard, with_workers, without_workers
from tui.inventory import Host
from tui.launch import LaunchOptions
from tui.local_workers import LocalWorkers
from tui.plan_flags import PlanFlags
from tui.screens.hosts import HostsScreen
from tui.ssh import LocalTransport

SIZE = (120, 40)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def local() -> Iterator[LocalWorkers]:
    workers = LocalWorkers(threads=1)
    workers.start(2)
    yield workers
    workers.close()


def cells(screen: HostsScreen, table: str) -> list[list[str]]:
    t = screen.query_one(table, DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def test_flag_edits_for_launched_and_stopped_workers() -> None:
    flags = PlanFlags(rpc="10.0.0.1:1", device_mem="RPC[10.0.0.1:1]=1GiB")
    more = with_workers(flags, ["10.0.0.1:1", "10.0.0.2:2"], {"RPC[10.0.0.2:2]": 2 << 30, "RPC[10.0.0.1:1]": 5})
    assert more.rpc == "10.0.0.1:1,10.0.0.2:2"
    assert more.device_mem == "RPC[10.0.0.1:1]=1GiB RPC[10.0.0.2:2]=2GiB"  # a capacity typed in stays
    assert without_workers(more, ["10.0.0.1:1"]) == PlanFlags(rpc="10.0.0.2:2", device_mem="RPC[10.0.0.2:2]=2GiB")


@run_async
async def test_local_workers_probe_launch_log_and_stop(local: LocalWorkers) -> None:
    rules = PlacementRules.from_flags([], 99, "1,1", ",".join(local.endpoints))
    app = make_app(rules=rules, local=local, board=HostBoard((), local), start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, HostsScreen)
        titles = {c.title for c in app.get_system_commands(screen)}
        assert {"Hosts: launch workers", "Hosts: stop workers", "Hosts: probe again"} <= titles
        assert "Placement: apply plan" not in titles
        (host,) = cells(screen, "#hosts-table")
        assert host[0] == LOCAL_NAME and host[1] == "ok" and host[3].endswith(" GiB") and host[5] == "2"
        await until(pilot, lambda: all(r[4].startswith("up") for r in cells(screen, "#workers-table")), "workers up")
        assert [r[2] for r in cells(screen, "#workers-table")] == local.endpoints
        await until(pilot, lambda: "listening on" in text_of(app, "#log-tail"), "the first worker's log")
        assert local.endpoints[0] in text_of(app, "#log-title")

        await pilot.press("l")
        await settle(app, pilot)
        assert len(local.workers) == 3 and errors(app) == []
        new = local.workers[2].endpoint
        assert app.monitor.endpoints == local.endpoints
        assert app.placement.flags.rpc.split(",") == local.endpoints  # offered to the plan
        assert cells(screen, "#hosts-table")[0][5] == "3"
        screen.query_one("#workers-table", DataTable).focus()
        await pilot.press("down", "down")
        await until(pilot, lambda: new in text_of(app, "#log-title") and "listening on" in text_of(app, "#log-tail"),
                    "the new worker's log")

        screen.query_one("#hosts-table", DataTable).focus()
        await pilot.press("s")
        await settle(app, pilot)
        assert local.endpoints == [] and app.monitor.endpoints == []
        assert all(r[4].startswith("exited") for r in cells(screen, "#workers-table"))
        assert app.placement.flags.rpc == ""
        assert any("stopped 3 of 3 workers" in n.message for n in app._notifications)
        await pilot.press("s")
        assert any("no running workers" in n.message for n in app._notifications)


@run_async
async def test_a_hosts_file_host_launches_and_stops_through_tui_launch(tmp_path: Path) -> None:
    host = Host(name="box", ssh="localhost", python=sys.executable, threads=1, cache_dir=str(tmp_path / "cache"),
                port_range=(50140, 50149))
    cluster_file = tmp_path / "tui-cluster.json"
    board = HostBoard([host], transport=LocalTransport(), cluster_file=cluster_file,
                      options=LaunchOptions(remote_dir=str(tmp_path / "remote")))
    app = make_app(board=board, start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, HostsScreen)
        assert cells(screen, "#hosts-table")[0][:2] == ["box", "ok"]
        await pilot.press("l")
        await settle(app, pilot)
        assert errors(app) == [], errors(app)
        (worker,) = board.launched["box"]
        assert worker.endpoint.startswith("127.0.0.1:5014") and worker.token
        assert [w.endpoint for w in read_cluster(cluster_file).workers] == [worker.endpoint]  # `ikctl stop` finds it
        assert app.tokens == {worker.endpoint: worker.token}
        assert app.placement.flags.rpc == worker.endpoint
        assert app.placement.flags.device_mem.startswith(f"RPC[{worker.endpoint}]=")
        # telemetry authenticates with the worker's own token
        await until(pilot, lambda: cells(screen, "#workers-table")[0][4].startswith("up"), "the launched worker up")
        await until(pilot, lambda: "listening on" in text_of(app, "#log-tail"), "its log, read through the transport")

        await pilot.press("s")
        await settle(app, pilot)
        assert board.launched["box"] == [] and not cluster_file.exists()
        assert app.monitor.endpoints == [] and app.placement.flags.rpc == ""

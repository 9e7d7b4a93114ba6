"""The bench screen at 80x24, the smallest terminal a user has: the plot keeps its height after a sweep over
workers, and its legend sits outside the curves. Rows and traffic are posted as the sweep thread posts them, so no
model is loaded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from engine.bench import SweepRow, WorkerTraffic, sweep_steps
from tui.app import IkctlApp, make_app
from tui.bench_results import TRAFFIC_COLUMNS, traffic_cells
from tui.messages import BenchDone, BenchRowReady, BenchStarted
from tui.screens.bench import BenchScreen

# the demo's two local workers, with the traffic a 512-token sweep over them reports
TRAFFIC = [WorkerTraffic("RPC[127.0.0.1:45989]", 134, 2.6, 2.13, 810_000, 810_000),
           WorkerTraffic("RPC[127.0.0.1:37263]", 134, 1.9, 1.62, 810_000, 570_000)]
MANY = [WorkerTraffic(f"RPC[10.0.0.{i}:50052]", 134, 2.0, 1.5, 810_000, 810_000) for i in range(2, 8)]
SETTINGS = {"model_name": "ikctl-tiny-v3", "arch": "deepseek2", "quant": ["F32", "Q8_0"], "n_ctx": 4096,
            "n_ubatch": 128, "n_gen": 32, "threads": 2, "mla": 3}
CURVE_ROWS = 8  # readable: the plot's frame and its x ticks take 3 rows more


def canned_rows(n_ctx: int) -> list[SweepRow]:
    return [SweepRow(n_kv, 128, 32, 0.1 + n_kv / 2e4, 1600 - n_kv / 4, 0.4 + n_kv / 1e4, 80 - n_kv / 100)
            for n_kv in sweep_steps(n_ctx, 128, 32)]


async def finish_a_sweep(app: IkctlApp, pilot: object, n_ctx: int, traffic: list[WorkerTraffic]) -> BenchScreen:
    screen = app.screen
    assert isinstance(screen, BenchScreen)
    screen.run += 1
    rows = canned_rows(n_ctx)
    screen.post_message(BenchStarted(dict(SETTINGS, n_ctx=n_ctx), len(rows), screen.run))
    for row in rows:
        screen.post_message(BenchRowReady(row, screen.run))
    screen.post_message(BenchDone(False, screen.run, traffic))
    for _ in range(3):
        await pilot.pause()  # type: ignore[attr-defined]
    return screen


def plot_text(screen: BenchScreen) -> str:
    return str(screen.query_one("#bench-plot", PlotextPlot).render())


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path))


@pytest.mark.parametrize("n_ctx", [512, 4096])
@pytest.mark.parametrize("traffic", [[], TRAFFIC, MANY], ids=["local", "two-workers", "six-workers"])
def test_the_plot_keeps_its_height_at_80x24(n_ctx: int, traffic: list[WorkerTraffic]) -> None:
    async def body() -> None:
        app = make_app(start_mode="bench")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await finish_a_sweep(app, pilot, n_ctx, traffic)
            plot = screen.query_one("#bench-plot", PlotextPlot)
            assert plot.region.height >= CURVE_ROWS + 3, plot.region
            # all of it on screen, above the footer
            assert plot.region.bottom <= screen.query_one("Footer").region.y
            table = screen.query_one("#bench-table", DataTable)
            assert table.region.height >= 3  # the header and at least the last two rows
            assert table.cursor_row == table.row_count - 1 == len(canned_rows(n_ctx)) - 1
            # every worker's traffic is still shown, one row each
            if traffic:
                workers = screen.query_one("#bench-traffic", DataTable)
                assert workers.display and workers.row_count == len(traffic)
                assert workers.region.height >= min(len(traffic) + 1, 3)  # more scroll
            assert not screen.scrollbars_enabled[0], "the screen itself overflows"

    asyncio.run(body())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_the_legend_is_outside_the_curves(size: tuple[int, int]) -> None:
    async def body() -> None:
        app = make_app(start_mode="bench")
        async with app.run_test(size=size) as pilot:
            screen = await finish_a_sweep(app, pilot, 4096, TRAFFIC)
            legend = screen.query_one("#bench-legend", Static)
            plot = screen.query_one("#bench-plot", PlotextPlot)
            assert legend.region.height >= 1 and plot.region.height > 0
            assert not legend.region.overlaps(plot.region) and legend.region.bottom <= plot.region.y
            text = str(legend.render())
            assert "S_PP" in text and "S_TG" in text and "N_KV" in text
            # nothing of the legend is drawn inside the plot, over the curves
            assert "S_PP" not in plot_text(screen) and "S_TG" not in plot_text(screen)
            assert "⢕⢕" not in plot_text(screen)

    asyncio.run(body())


def test_no_traffic_table_without_workers() -> None:
    async def body() -> None:
        app = make_app(start_mode="bench")
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await finish_a_sweep(app, pilot, 512, [])
            assert not screen.query_one("#bench-traffic", DataTable).display

    asyncio.run(body())


def test_a_workers_traffic_cells_carry_the_figures_of_the_bench_line() -> None:
    for t in TRAFFIC:
        cells = traffic_cells(t)
        assert len(cells) == len(TRAFFIC_COLUMNS) and cells[0] == t.device
        line = t.line()
        for cell in cells[1:]:
            assert cell in line, (cell, line)

"""Bench screen: the `ikctl bench` sweep with its settings, a table filled row by row, each worker's traffic, a plot
with its legend above it, and JSON save."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, Static
from textual.worker import Worker, get_current_worker
from textual_plotext import PlotextPlot

from engine.bench import SweepRow, WorkerTraffic, bench_settings, sweep, sweep_steps, worker_traffic
from engine.errors import IkctlError
from tui.bench_results import COLUMNS, TRAFFIC_COLUMNS, row_cells, save_json, series, traffic_cells
from tui.messages import BenchDone, BenchRowReady, BenchStarted, WorkFailed
from tui.model_thread import on_model_thread
from tui.settings import parse_int
from tui.shared_model import SharedModel
from tui.widgets.device_colors import PALETTE
from tui.widgets.mode_tabs import ModeTabs

PP_COLOR, TG_COLOR = PALETTE[0], PALETTE[1]
# plotext draws its legend inside the canvas, over the curves; this line above the plot says the same outside it
LEGEND = Text.assemble(("━━", PP_COLOR), " S_PP t/s (left axis)   ", ("━━", TG_COLOR), " S_TG t/s (right axis)   ",
                       "against N_KV")


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


class BenchScreen(Screen[None]):
    """Owns the settings of the last run and its rows; one sweep at a time."""

    CSS_PATH = "bench.tcss"
    AUTO_FOCUS = "#ctx"  # typing goes straight into the main field
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+r", "run_bench", "Run"), Binding("escape", "stop", "Stop"),
                Binding("ctrl+s", "save_json", "Save JSON")]

    def __init__(self, shared: SharedModel) -> None:
        super().__init__()
        self.shared = shared
        self.settings: dict[str, Any] | None = None
        self.rows: list[SweepRow] = []
        self.traffic: list[WorkerTraffic] = []  # the workers' part of the last sweep
        self.n_steps = 0
        self.running = False
        self.run = 0  # bumped per run and on stop, so a stopped thread's late messages are dropped

    def compose(self) -> ComposeResult:
        yield ModeTabs("bench")
        with Horizontal(id="bench-settings"):
            for flag, value, wid in (("-c", "512", "ctx"), ("-ub", "128", "ubatch"), ("-n", "32", "n-gen")):
                yield Label(flag)
                yield Input(value, id=wid, compact=True)
            yield Label("JSON")
            yield Input("ikctl-bench.json", id="json-path", compact=True)
        yield Static("ctrl+r runs the sweep", id="bench-status")
        table: DataTable[str] = DataTable(id="bench-table", cursor_type="row", zebra_stripes=True)
        table.add_columns(*COLUMNS)
        yield table
        traffic: DataTable[str] = DataTable(id="bench-traffic", cursor_type="none", show_cursor=False)
        traffic.add_columns(*TRAFFIC_COLUMNS)
        traffic.display = False
        yield traffic
        yield Static(LEGEND, id="bench-legend")
        yield PlotextPlot(id="bench-plot")
        yield Footer()

    def on_mount(self) -> None:
        self.fit_tables()
        self.draw_plot()

    def fit_tables(self) -> None:
        """The two tables share the room left by the rest with the plot (1fr each : 2fr, the plot at least its
        min-height), but never take more than their rows need, so a short sweep leaves the plot the space."""
        for table in self.query("#bench-table, #bench-traffic").results(DataTable):
            table.styles.max_height = table.row_count + 1
            table.styles.min_height = min(table.row_count + 1, 3)  # the header and the last two rows, at least

    def show_traffic(self) -> None:
        traffic = self.query_one("#bench-traffic", DataTable)
        traffic.clear()
        traffic.add_rows(traffic_cells(t) for t in self.traffic)
        traffic.display = bool(self.traffic)
        self.fit_tables()

    def action_run_bench(self) -> None:
        if self.running:
            self.notify("a sweep is running; Esc stops it", severity="warning")
            return
        try:
            n_ctx = parse_int("-c", self.query_one("#ctx", Input).value, minimum=1)
            ubatch = parse_int("-ub", self.query_one("#ubatch", Input).value, minimum=1)
            n_gen = parse_int("-n", self.query_one("#n-gen", Input).value, minimum=0)
        except IkctlError as e:
            self.notify(str(e), severity="error")
            return
        self.rows, self.traffic, self.settings, self.running = [], [], None, True
        self.run += 1
        self.query_one("#bench-table", DataTable).clear()
        self.show_traffic()
        self.query_one("#bench-status", Static).update("loading the model…")
        self.draw_plot()
        self.sweep(n_ctx, ubatch, n_gen, self.run)

    @work(name="bench-sweep", exclusive=True, group="bench")
    async def sweep(self, n_ctx: int, ubatch: int, n_gen: int, run: int) -> None:
        await on_model_thread(self.run_sweep, get_current_worker(), n_ctx, ubatch, n_gen, run)

    def run_sweep(self, worker: Worker[None], n_ctx: int, ubatch: int, n_gen: int, run: int) -> None:
        """On the model thread: the shared model (loaded on first use) with this context and micro-batch, post the
        settings, then one message per step until done or cancelled."""
        stopped = False
        traffic: list[WorkerTraffic] = []
        try:
            model = self.shared.get().with_options(ctx_size=n_ctx, ubatch_size=ubatch)
            steps = sweep_steps(model.n_ctx, ubatch, n_gen)
            self.post_message(BenchStarted(bench_settings(model, model.n_ctx, ubatch, n_gen), len(steps), run))
            before = worker_traffic(model)
            for row in sweep(model, model.n_ctx, ubatch, n_gen):
                self.post_message(BenchRowReady(row, run))
                if worker.is_cancelled:
                    stopped = True
                    break
            traffic = worker_traffic(model, before)
        except (IkctlError, OSError) as e:
            self.post_message(WorkFailed(str(e)))
            stopped = True
        self.post_message(BenchDone(stopped, run, traffic))

    @on(BenchStarted)
    def bench_started(self, event: BenchStarted) -> None:
        if event.run != self.run:
            return
        self.settings, self.n_steps = event.settings, event.n_steps
        self.show_progress()

    @on(BenchRowReady)
    def row_ready(self, event: BenchRowReady) -> None:
        if event.run != self.run:
            return
        self.rows.append(event.row)
        table = self.query_one("#bench-table", DataTable)
        table.add_row(*row_cells(event.row))
        self.fit_tables()
        table.move_cursor(row=table.row_count - 1)
        self.show_progress()
        self.draw_plot()

    @on(BenchDone)
    def bench_done(self, event: BenchDone) -> None:
        if event.run != self.run:
            return
        self.running = False
        self.traffic = event.workers
        self.show_traffic()
        self.show_progress(" — stopped" if event.stopped else " — done; ctrl+s saves JSON")

    def show_progress(self, note: str = "") -> None:
        s = self.settings
        if s is None:
            self.query_one("#bench-status", Static).update("ctrl+r runs the sweep" + note)
            return
        mla = f", -mla {s['mla']}" if s.get("mla") is not None else ""
        self.query_one("#bench-status", Static).update(
            f"{s['model_name']} ({s['arch']}, {', '.join(s['quant'])}), n_ctx {s['n_ctx']}, ub {s['n_ubatch']}, "
            f"tg {s['n_gen']}, threads {s['threads']}{mla} — step {len(self.rows)}/{self.n_steps}{note}")

    def draw_plot(self) -> None:
        widget = self.query_one("#bench-plot", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        n_kv, s_pp, s_tg = series(self.rows)
        if n_kv:  # no labels, no title: #bench-legend says which is which, and every row goes to the curves
            plt.plot(n_kv, s_pp, marker="braille", color=_rgb(PP_COLOR))
            # TG is often 10-100x slower than PP, so it gets its own axis to stay readable
            plt.plot(n_kv, s_tg, marker="braille", color=_rgb(TG_COLOR), yside="right")
        widget.refresh()

    def action_stop(self) -> None:
        """Cancel the sweep; its thread ends after the current step, and what it posts later is dropped."""
        if self.running:
            self.workers.cancel_group(self, "bench")
            self.run += 1
            self.running = False
            self.show_progress(" — stopped")

    def action_save_json(self) -> None:
        if self.settings is None or not self.rows:
            self.notify("nothing to save yet: run the sweep first (ctrl+r)", severity="warning")
            return
        try:
            path = save_json(self.query_one("#json-path", Input).value.strip(), self.settings, self.rows,
                             self.traffic)
        except IkctlError as e:
            self.notify(str(e), severity="error")
            return
        self.notify(f"saved {len(self.rows)} rows to {path}")

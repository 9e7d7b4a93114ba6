"""Placement screen: the plan of the model's tensors on the devices, re-planned on every flag edit, and applied
(the model loaded with these flags, a load bar per worker) with ctrl+l."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Static

from engine.distributed import auto_choice
from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.model import Options
from engine.placement import Placement, PlacementError
from engine.synth import default_model_path
from rpcnode.protocol import rpc_device
from tui.formatting import auto_chosen_line, format_bytes
from tui.host_board import with_workers, without_workers
from tui.messages import AutoChosen, FlagsEdited, HeaderFailed, HeaderLoaded, LoadProgressed, PlanApplied, WorkFailed
from tui.model_thread import on_model_thread
from tui.plan_flags import ModelHeader, PlanFlags
from tui.shared_model import SharedModel, load_options
from tui.telemetry import TelemetryMonitor, reported_capacities
from tui.widgets.device_bars import DeviceBars, load_legend
from tui.widgets.mode_tabs import ModeTabs
from tui.widgets.placement_form import PlacementForm
from tui.widgets.placement_map import PlacementMap


def read_header(model_path: str | None) -> ModelHeader:
    """Only the GGUF header: tensor data stays unread in the map (the default model is made on first use)."""
    f = GGUFFile(model_path or default_model_path())
    n_layers = int(f.get(f"{f.architecture}.block_count"))
    return ModelHeader.from_tensors(Path(f.path).name, f.architecture, n_layers, list(f.tensors.values()),
                                    f.expert_count)


class PlacementScreen(Screen[None]):
    """Owns the header, the current flags and the last good plan; sets them on the map, bars and status."""

    CSS_PATH = "placement.tcss"
    AUTO_FOCUS = "#ot"  # typing goes straight into the main field
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+l", "apply_plan", "Apply plan"),
        Binding("ctrl+r", "reset_flags", "Reset flags"),
        # not ctrl+y: the -ot TextArea, focused most of the time, takes that for redo
        Binding("ctrl+t", "show_command", "Command"),
        Binding("ctrl+o", "auto_place", "Auto place"),
    ]

    def __init__(self, model_path: str | None, flags: PlanFlags, shared: SharedModel | None = None,
                 monitor: TelemetryMonitor | None = None) -> None:
        super().__init__()
        self.model_path = model_path
        self.initial_flags = flags
        self.flags = flags
        self.shared = shared or SharedModel(model_path, flags=flags)
        self.monitor = monitor
        self.reported: dict[str, int] = {}  # RPC[host:port] -> the memory the worker reported (via telemetry)
        self.applying = False
        self.auto_running = False
        self.load_run = 0  # bumped per apply, so a late progress message of an earlier one is dropped
        self.loads: dict[str, Any] = {}  # device -> the newest LoadProgress of the current apply
        self.load_flags: PlanFlags | None = None  # the flags of the current (or last) apply
        self.load_note = ""
        self.header: ModelHeader | None = None
        self.placement: Placement | None = None  # what the map shows
        self.good: Placement | None = None  # the last plan that passed every check
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield ModeTabs("placement")
        with Horizontal(id="placement-body"):
            with Vertical(id="map-pane"):
                yield Static("", id="model-line")
                with VerticalScroll(id="map-scroll"):
                    yield PlacementMap(id="map")
                yield DeviceBars(id="bars")
            with VerticalScroll(id="form-pane"):
                yield PlacementForm(self.flags, id="form")
                yield Static("", id="plan-status")
                yield Button("Auto place (ctrl+o)", id="auto", compact=True)
                yield Button("Apply plan (ctrl+l)", id="apply", compact=True)
                yield Static("", id="load-status")
        yield Footer()

    def on_mount(self) -> None:
        self.load_header()
        if self.monitor is not None:
            self.set_interval(1.0, self.check_reported)

    def check_reported(self) -> None:
        """Plan against the workers' reported memory, as loading will, once they answer (--device-mem wins)."""
        assert self.monitor is not None
        reported = reported_capacities(self.monitor.latest())
        if reported != self.reported:
            self.reported = reported
            self.replan()

    def planning_flags(self) -> PlanFlags:
        """The flags with the reported capacities of the workers in --rpc that --device-mem does not name."""
        try:
            devices = {rpc_device(ep) for ep in self.flags.rules().rpc}
        except PlacementError:
            return self.flags  # the plan reports the bad flag
        return with_workers(self.flags, [], {d: n for d, n in self.reported.items() if d in devices})

    @work(thread=True, name="read-header", exclusive=True, group="placement")
    def load_header(self) -> None:
        try:
            self.post_message(HeaderLoaded(read_header(self.model_path)))
        except (IkctlError, OSError) as e:
            self.post_message(HeaderFailed(str(e)))

    @on(HeaderFailed)
    def header_failed(self, event: HeaderFailed) -> None:
        """No header, no plan: the one error line where the model's name would be, the whole reason in the form."""
        line = self.query_one("#model-line", Static)
        line.add_class("-error")
        line.update(Text(f"✗ {event.message}"))
        self.query_one("#map", PlacementMap).note = "no plan (no model header)"
        self.error = f"cannot read the model header: {event.message}"
        self.show_plan_status()

    @on(HeaderLoaded)
    def header_loaded(self, event: HeaderLoaded) -> None:
        self.header = event.header
        h = event.header
        self.query_one("#model-line", Static).update(
            f"[b]{h.name}[/b]  {h.arch}, {h.n_layers} layers, {len(h.tensors)} tensors, {format_bytes(h.total_bytes)}")
        self.replan()

    @on(FlagsEdited)
    def flags_edited(self, event: FlagsEdited) -> None:
        self.flags = event.flags
        self.replan()

    def replan(self) -> None:
        """Plan with the current flags; on a PlacementError keep the last good plan and show why inline."""
        if self.header is None:
            return
        try:
            self.good = self.planning_flags().plan(self.header)
            self.placement, self.error = self.good, None
        except PlacementError as e:
            self.error = str(e)
            # no good plan yet: show the overflowing one (if the flags parse), so a red bar says where
            self.placement = self.good or self.unchecked_plan()
        plan_map = self.query_one("#map", PlacementMap)
        plan_map.note = "no plan (the flags do not parse)"
        plan_map.placement = self.placement
        self.query_one("#bars", DeviceBars).placement = self.placement
        self.show_loads()
        self.show_status()

    def unchecked_plan(self) -> Placement | None:
        assert self.header is not None
        try:
            return self.planning_flags().plan(self.header, check_capacity=False)
        except PlacementError:
            return None

    def show_status(self) -> None:
        self.show_plan_status()
        self.show_load_status()

    def show_plan_status(self) -> None:
        status = self.query_one("#plan-status", Static)
        status.set_class(self.error is not None, "-error")
        if self.header is None and self.error is not None:
            status.update(f"✗ {self.error}")
        elif self.error is not None:
            status.update(f"✗ {self.error}\n({'showing the last good plan' if self.good else 'no plan fits yet'})")
        elif self.placement is not None and self.placement.warnings:
            status.update("\n".join(f"! {w}" for w in self.placement.warnings))
        else:
            status.update("✓ plan fits" if self.placement is not None else "")

    def add_workers(self, endpoints: list[str], capacities: dict[str, int]) -> None:
        """Workers were launched: add them to --rpc (and their memory to --device-mem) in the form."""
        if endpoints:
            self.show_flags(with_workers(self.flags, endpoints, capacities))

    def remove_workers(self, endpoints: list[str]) -> None:
        """Workers were stopped: take them out of --rpc and --device-mem in the form."""
        if endpoints:
            self.show_flags(without_workers(self.flags, endpoints))

    def show_flags(self, flags: PlanFlags) -> None:
        if self.is_mounted:
            self.query_one("#form", PlacementForm).show(flags)  # posts FlagsEdited, which re-plans
        else:
            self.flags = flags  # not shown yet: the form starts from these

    def action_reset_flags(self) -> None:
        self.query_one("#form", PlacementForm).show(self.initial_flags)

    def action_show_command(self) -> None:
        try:
            self.notify(self.flags.command_line(self.model_path), title="same plan from the shell", timeout=15)
        except IkctlError as e:
            self.notify(str(e), severity="error")

    # ---- automatic placement ---------------------------------------------------------------------------------
    @on(Button.Pressed, "#auto")
    def auto_pressed(self) -> None:
        self.action_auto_place()

    def action_auto_place(self) -> None:
        """--auto for the workers in --rpc (and --device-mem): measure them, weigh the candidates on the model
        thread, then put the chosen flags in the form (the workers listed stay listed)."""
        if self.auto_running:
            self.notify("auto placement is measuring the devices; wait for it", severity="warning")
            return
        try:
            opts = Options(**{**load_options(self.flags, self.shared.options, self.shared.tokens),
                              "override_tensor": [], "n_gpu_layers": 0, "tensor_split": None, "auto": True})
            opts.validated()
        except IkctlError as e:
            self.notify(str(e), severity="error")
            return
        self.auto_running = True
        self.notify("measuring the devices and links…", title="auto placement", timeout=5)
        self.auto_worker(opts)

    @work(name="auto-place", exclusive=True, group="auto")
    async def auto_worker(self, opts: Options) -> None:
        try:
            choice = await on_model_thread(auto_choice, GGUFFile(self.model_path or default_model_path()), opts)
        except (IkctlError, OSError) as e:
            self.auto_running = False
            self.post_message(WorkFailed(str(e)))
            return
        self.post_message(AutoChosen(choice))

    @on(AutoChosen)
    def auto_chosen(self, event: AutoChosen) -> None:
        self.auto_running = False
        chosen = PlanFlags.from_rules(event.choice.chosen.rules)
        self.show_flags(replace(self.flags, override_tensor=chosen.override_tensor, n_gpu_layers=chosen.n_gpu_layers,
                                tensor_split=chosen.tensor_split))
        self.notify(auto_chosen_line(event.choice), title="auto placement", timeout=20)

    # ---- applying the plan -----------------------------------------------------------------------------------
    @on(Button.Pressed, "#apply")
    def apply_pressed(self) -> None:
        self.action_apply_plan()

    def action_apply_plan(self) -> None:
        """Load the model with the current flags on the model thread; the bars show each worker's load."""
        if self.applying:
            self.notify("a plan is being applied; wait for it to finish", severity="warning")
            return
        if self.error is not None:
            self.notify(f"fix the plan first: {self.error}", severity="error")
            return
        try:
            load_options(self.flags, {})
        except IkctlError as e:
            self.notify(str(e), severity="error")
            return
        self.applying, self.loads, self.load_flags = True, {}, self.flags
        self.load_run += 1
        self.load_note = "loading… (waits for a running generation or sweep)"
        self.show_loads()
        self.show_load_status()
        self.apply_worker(self.flags, self.load_run)

    @work(name="apply-plan", exclusive=True, group="apply")
    async def apply_worker(self, flags: PlanFlags, run: int) -> None:
        def progress(p: Any) -> None:  # on the model thread; post_message is thread-safe
            self.post_message(LoadProgressed(p, run))

        try:
            summary = await on_model_thread(self.shared.apply, flags, progress)
        except (IkctlError, OSError) as e:
            self.post_message(PlanApplied(flags, None, str(e), run))
            return
        self.post_message(PlanApplied(flags, summary, None, run))

    @on(LoadProgressed)
    def load_progressed(self, event: LoadProgressed) -> None:
        if event.run != self.load_run:
            return
        first = not self.loads
        self.loads[event.progress.device] = event.progress
        self.show_loads()
        if first:
            self.show_load_status()  # with the legend of the bars' colours

    def show_loads(self) -> None:
        """The load bars belong to the flags they loaded: hidden while the form shows other flags."""
        self.query_one("#bars", DeviceBars).loads = self.loads if self.flags == self.load_flags else {}

    @on(PlanApplied)
    def plan_applied(self, event: PlanApplied) -> None:
        if event.run != self.load_run:
            return
        self.applying = False
        if event.error is not None:
            self.load_note = f"✗ not loaded: {event.error}"
            self.post_message(WorkFailed(event.error))
        elif event.summary is not None:
            self.load_note = f"✓ {event.summary.line()}"
            self.notify(event.summary.line(), title="plan applied")
        self.show_load_status()

    def show_load_status(self) -> None:
        status = self.query_one("#load-status", Static)
        note = self.load_note
        loaded = self.shared.loaded_flags
        if not self.applying and loaded is not None and loaded != self.flags:
            note = (note + "\n" if note else "") + "the flags changed since: ctrl+l applies them"
        elif not note:
            note = "ctrl+l loads the model with this plan" if loaded is None else ""
        status.set_class(note.startswith("✗"), "-error")
        text = Text(note)
        if self.loads and self.flags == self.load_flags:
            text.append("\n")
            text.append_text(load_legend())
        status.update(text)

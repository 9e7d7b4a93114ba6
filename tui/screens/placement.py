"""Placement screen: the plan of the model's tensors on the devices, re-planned on every flag edit."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from engine.errors import IkctlError
from engine.placement import Placement, PlacementError
from tui.formatting import format_bytes
from tui.messages import FlagsEdited, HeaderLoaded, WorkFailed
from tui.plan_flags import ModelHeader, PlanFlags
from tui.widgets.device_bars import DeviceBars
from tui.widgets.mode_tabs import ModeTabs
from tui.widgets.placement_form import PlacementForm
from tui.widgets.placement_map import PlacementMap


def read_header(model_path: str | None) -> ModelHeader:
    """Only the GGUF header: tensor data stays unread in the map (the default model is made on first use)."""
    from engine.gguf_file import GGUFFile
    from engine.synth import default_model_path

    f = GGUFFile(model_path or default_model_path())
    n_layers = int(f.get(f"{f.architecture}.block_count"))
    return ModelHeader.from_tensors(Path(f.path).name, f.architecture, n_layers, list(f.tensors.values()))


class PlacementScreen(Screen[None]):
    """Owns the header, the current flags and the last good plan; sets them on the map, bars and status."""

    CSS_PATH = "placement.tcss"
    AUTO_FOCUS = "#ot"  # typing goes straight into the main field
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "reset_flags", "Reset flags"),
        Binding("ctrl+y", "show_command", "Command"),
    ]

    def __init__(self, model_path: str | None, flags: PlanFlags) -> None:
        super().__init__()
        self.model_path = model_path
        self.initial_flags = flags
        self.flags = flags
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
        yield Footer()

    def on_mount(self) -> None:
        self.load_header()

    @work(thread=True, name="read-header", exclusive=True, group="placement")
    def load_header(self) -> None:
        try:
            self.post_message(HeaderLoaded(read_header(self.model_path)))
        except (IkctlError, OSError) as e:
            self.post_message(WorkFailed(f"cannot read the model header: {e}"))

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
            self.good = self.flags.plan(self.header)
            self.placement, self.error = self.good, None
        except PlacementError as e:
            self.error = str(e)
            # no good plan yet: show the overflowing one (if the flags parse), so a red bar says where
            self.placement = self.good or self.unchecked_plan()
        self.query_one("#map", PlacementMap).placement = self.placement
        self.query_one("#bars", DeviceBars).placement = self.placement
        self.show_status()

    def unchecked_plan(self) -> Placement | None:
        assert self.header is not None
        try:
            return self.flags.plan(self.header, check_capacity=False)
        except PlacementError:
            return None

    def show_status(self) -> None:
        status = self.query_one("#plan-status", Static)
        status.set_class(self.error is not None, "-error")
        if self.error is not None:
            status.update(f"✗ {self.error}\n({'showing the last good plan' if self.good else 'no plan fits yet'})")
        elif self.placement is not None and self.placement.warnings:
            status.update("\n".join(f"! {w}" for w in self.placement.warnings))
        else:
            status.update("✓ plan fits" if self.placement is not None else "")

    def action_reset_flags(self) -> None:
        self.query_one("#form", PlacementForm).show(self.initial_flags)

    def action_show_command(self) -> None:
        try:
            self.notify(self.flags.command_line(self.model_path), title="same plan from the shell", timeout=15)
        except IkctlError as e:
            self.notify(str(e), severity="error")

"""The compact placement map: layers down, tensor kinds across, each cell coloured by its device."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.placement import Placement
from tui.layer_map import KINDS, MIXED, Cell, MapRow, device_tags, placement_rows
from tui.widgets.device_colors import MIXED_COLOR, device_colors

CELL = 7
LABEL = 7
HEADINGS = {"attn": "attn", "router": "router", "experts": "exps", "shexp": "shexp", "dense": "dense"}


def render_map(rows: list[MapRow], devices: list[str]) -> Text:
    """The map as text: a heading line, then one line per row with a coloured cell per kind."""
    colors, tags = device_colors(devices), device_tags(devices)
    out = Text("layer".ljust(LABEL), style="bold")
    for kind in KINDS:
        out.append(HEADINGS[kind].center(CELL - 1) + " ", style="bold")
    for row in rows:
        out.append("\n")
        out.append(row.label.ljust(LABEL), style="dim" if row.label.isdigit() else "bold")
        for cell in row.cells:
            _append_cell(out, cell, colors, tags)
    return out


def _append_cell(out: Text, device: Cell, colors: dict[str, str], tags: dict[str, str]) -> None:
    if device is None:
        out.append("·".center(CELL), style="dim")
        return
    if device == MIXED:
        out.append("mix".center(CELL - 1), style=f"bold white on {MIXED_COLOR}")
    elif isinstance(device, tuple):  # experts split over devices: each tag in its device's colour
        width, names = CELL - 1, [tags[d] for d in device]
        if sum(map(len, names)) > width:  # R1..R9 fit; more devices keep their first letters
            names = [n[: max(1, width // len(names))] for n in names]
        for d, name in zip(device, names, strict=True):
            out.append(name, style=f"bold black on {colors[d]}")
        out.append(" " * max(0, width - sum(map(len, names))) + " ")
    else:
        out.append(tags[device].center(CELL - 1), style=f"bold black on {colors[device]}")
    out.append(" ")  # a gap, so that equal neighbours still read as separate cells


class PlacementMap(Static):
    """Shows `placement` (set by the screen); None shows `note`, why there is none (set by the screen too)."""

    DEFAULT_CSS = """
    PlacementMap { width: auto; height: auto; text-wrap: nowrap; }
    """

    placement: reactive[Placement | None] = reactive(None)
    note: reactive[str] = reactive("reading the model header…")

    def watch_placement(self) -> None:
        self._show()

    def watch_note(self) -> None:
        self._show()

    def _show(self) -> None:
        if self.placement is None:
            self.update(Text(self.note, style="dim"))
            return
        self.update(render_map(placement_rows(self.placement), [d.name for d in self.placement.devices]))

"""Per-device legend and memory bars: planned bytes against capacity, N/A when the capacity is unknown."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.placement import Placement
from tui.formatting import format_fraction, memory_bar, used_fraction
from tui.layer_map import device_tags
from tui.widgets.device_colors import device_colors

BAR_WIDTH = 12


def render_bars(placement: Placement, bar_width: int = BAR_WIDTH) -> Text:
    """Two lines per device: swatch, tag and name; then the bar and `need / capacity`."""
    names = [d.name for d in placement.devices]
    colors, tags = device_colors(names), device_tags(names)
    over = {dev for dev, _, _ in placement.overflows()}
    out = Text()
    for k, d in enumerate(placement.devices):
        need = placement.bytes_per_device[d.name]
        if k:
            out.append("\n")
        out.append(f" {tags[d.name]:^4} ", style=f"bold black on {colors[d.name]}")
        out.append(f" {d.name}", style="bold")
        if d.name in over:
            out.append("  over capacity", style="bold red")
        out.append("\n  ")
        out.append_text(memory_bar(used_fraction(need, d.capacity_bytes), bar_width))
        out.append(" " + format_fraction(need, d.capacity_bytes))
    return out


class DeviceBars(Static):
    """Shows the bars of `placement` (set by the screen)."""

    DEFAULT_CSS = """
    DeviceBars { height: auto; text-wrap: nowrap; }
    """

    placement: reactive[Placement | None] = reactive(None)

    def watch_placement(self, placement: Placement | None) -> None:
        self.update("" if placement is None else render_bars(placement))

"""Per-device legend and memory bars: planned bytes against capacity (no bar when the capacity is unknown); while or
after a plan is applied, a load bar per worker (found in its cache vs sent)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.placement import Placement
from tui.formatting import format_bytes, format_fraction, memory_bar, used_fraction
from tui.layer_map import device_tags
from tui.live_format import HIT_STYLE, SENT_STYLE, TODO_STYLE, load_bar, tracked
from tui.widgets.device_colors import device_colors

BAR_WIDTH = 12


def load_legend() -> Text:
    """What the load bars' colours mean."""
    out = Text()
    out.append("█", style=HIT_STYLE)
    out.append(" in the worker's cache  ")
    out.append("█", style=SENT_STYLE)
    out.append(" sent  ")
    out.append("░", style=TODO_STYLE)
    out.append(" to do")
    return out


def render_bars(placement: Placement, bar_width: int = BAR_WIDTH, loads: Mapping[str, Any] | None = None) -> Text:
    """Two lines per device: swatch, tag and name; then the bar and `need / capacity`. A device in `loads`
    (engine.distributed.LoadProgress by device name) gets a third: its load bar (hit, sent, to do) and the bytes
    found in its cache + sent."""
    names = [d.name for d in placement.devices]
    colors, tags = device_colors(names), device_tags(names)
    over = {dev for dev, _, _ in placement.overflows()}
    loads = loads or {}
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
        if d.capacity_bytes is None:  # nothing to draw a bar against: say so rather than `N/A … / N/A`
            out.append(format_bytes(need))
            out.append(" · capacity unknown", style="dim")
        else:
            out.append_text(tracked(memory_bar(used_fraction(need, d.capacity_bytes), bar_width)))
            out.append(" " + format_fraction(need, d.capacity_bytes))
        p = loads.get(d.name)
        if p is not None:
            out.append("\n  ")
            out.append_text(load_bar(p.bytes_hit, p.bytes_sent, p.bytes_total, bar_width))
            # no words, to fit the 44-column pane: the colours match the bar's parts (LOAD_LEGEND says which)
            out.append(f" {format_bytes(p.bytes_hit)}", style=HIT_STYLE)
            out.append(" + ")
            out.append(format_bytes(p.bytes_sent), style=f"bold {SENT_STYLE}")
    return out


class DeviceBars(Static):
    """Shows the bars of `placement` and the load progress in `loads` (both set by the screen)."""

    DEFAULT_CSS = """
    DeviceBars { height: auto; text-wrap: nowrap; }
    """

    placement: reactive[Placement | None] = reactive(None)
    loads: reactive[dict[str, Any]] = reactive(dict, always_update=True)

    def watch_placement(self) -> None:
        self._show()

    def watch_loads(self) -> None:
        self._show()

    def _show(self) -> None:
        self.update("" if self.placement is None else render_bars(self.placement, loads=self.loads))

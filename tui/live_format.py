"""Pure formatters for the Live and load views: sparklines, byte rates, durations and two-part load bars."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from tui.formatting import format_bytes

# U+2581..U+2588: eight heights; an empty slot is a space so that a short history reads as "not yet".
SPARKS = "▁▂▃▄▅▆▇█"
HIT_STYLE = "green"
SENT_STYLE = "#4e79a7"
TODO_STYLE = "grey35"
TRACK_STYLE = "on grey19"  # behind a bar, so that an empty one still shows where it is


def sparkline(values: Sequence[float], width: int, top: float | None = None) -> str:
    """The last `width` values as bar heights scaled to `top` (default: their max), right-aligned.

    A zero is the lowest bar, so that an idle worker shows a flat line rather than nothing."""
    if width <= 0:
        return ""
    tail = list(values)[-width:]
    scale = top if top is not None else max(tail, default=0.0)
    cells = []
    for v in tail:
        level = 0 if scale <= 0 else round(min(max(v / scale, 0.0), 1.0) * (len(SPARKS) - 1))
        cells.append(SPARKS[level])
    return "".join(cells).rjust(width)


def format_rate(bytes_per_s: float | None) -> str:
    """`1.2 MiB/s`; None is `–` (no second sample yet)."""
    if bytes_per_s is None:
        return "–"
    return f"{format_bytes(round(bytes_per_s))}/s"


def format_percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.0f}%"


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def load_bar(bytes_hit: int, bytes_sent: int, bytes_total: int, width: int) -> Text:
    """A bar of `width` cells: the part found in the worker's cache (hit), the part sent, the rest to do.

    Whole cells only: a cell is hit or sent by which share rounds to it, so the two parts always add up."""
    if width <= 0:
        return Text()
    if bytes_total <= 0:
        return Text("█" * width, style=HIT_STYLE)
    n_done = round(min(bytes_hit + bytes_sent, bytes_total) / bytes_total * width)
    n_hit = min(n_done, round(min(bytes_hit, bytes_total) / bytes_total * width))
    out = Text()
    out.append("█" * n_hit, style=HIT_STYLE)
    out.append("█" * (n_done - n_hit), style=SENT_STYLE)
    out.append("░" * (width - n_done), style=TODO_STYLE)
    return out


def tracked(bar: Text) -> Text:
    """`bar` on a dim background track."""
    out = bar.copy()
    out.stylize(TRACK_STYLE)
    return out

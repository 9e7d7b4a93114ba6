"""One worker's live panel: RAM/VRAM bars, busy %, network rates, cache counts and history sparklines."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui.formatting import NA_STYLE, format_bytes, format_fraction, memory_bar, used_fraction
from tui.link_stats import LinkRates, format_link
from tui.live_format import format_duration, format_percent, format_rate, sparkline, tracked
from tui.telemetry import HISTORY, Rates, WorkerStatus

LABEL = 6  # "VRAM  "
VALUE = 14  # "1023.9 MiB/s "
BAR_MIN, BAR_MAX = 8, 24


def render_worker(status: WorkerStatus, width: int, tag: str = "", color: str = "#4e79a7",
                  link: LinkRates | None = None) -> Text:
    """The panel's lines at `width` columns; a down worker keeps its last numbers, dimmed, under the reason.
    `link` is this process's view of the worker's round trips (None: no model here uses it)."""
    s, f = status.sample, status.facts
    out = Text()
    if tag:
        out.append(f" {tag} ", style=f"bold black on {color}")
        out.append(" ")
    out.append(status.device, style="bold")
    if f is not None:
        out.append(f"  {f.kind} · {f.name} · {f.threads} thread{'s' * (f.threads != 1)}", style="dim")
    if status.up and s is not None:
        out.append(f" · up {format_duration(s.uptime_s)}", style="dim")
    out.append("\n")
    if not status.up:
        out.append("✗ ", style="bold red")
        out.append(f"{status.error or 'down'}\n", style="red")
    body = Text()
    _memory_lines(body, status, max(BAR_MIN, min(BAR_MAX, width // 4)))
    # at most one cell per sample kept, right after the value: a wide screen does not push it far from its label
    spark_width = max(4, min(HISTORY, width - LABEL - VALUE - 1))
    r = status.rates if status.up else Rates()
    for label, value, history, top, style in (
            ("busy", format_percent(r.busy), status.busy_history, 1.0, "magenta"),
            ("in", format_rate(r.in_per_s), status.in_history, None, "cyan"),
            ("out", format_rate(r.out_per_s), status.out_history, None, "cyan")):
        body.append(label.ljust(LABEL), style="bold")
        body.append(value.rjust(VALUE - 1) + " ")
        body.append_text(tracked(Text(sparkline(history, spark_width, top=top), style=style)))
        body.append("\n")
    value, detail = format_link(link)
    body.append("link".ljust(LABEL), style="bold")
    body.append(value.rjust(VALUE - 1) + " ")
    if link is not None and link.history:
        body.append_text(tracked(Text(sparkline(link.history, spark_width), style="yellow")))
        body.append(" ")
    body.append(detail + "\n", style=NA_STYLE if value == "–" else "dim")
    body.append("cache".ljust(LABEL), style="bold")
    if s is None:
        body.append("–", style=NA_STYLE)
    else:
        body.append(f"{s.cache_hits} hits · {s.cache_misses} misses · {s.tensors_held} tensors held")
    if not status.up:
        body.stylize("dim")
    out.append_text(body)
    return out


def _memory_lines(out: Text, status: WorkerStatus, bar_width: int) -> None:
    """RAM and VRAM. A CPU worker's RAM bar is its tensors and KV caches against its memory; a GPU worker's VRAM bar
    is its device memory in use as the driver reports it (the CUDA context and pools count too), its RAM the RSS."""
    s = status.sample
    held, cap, rss = status.held_bytes, status.capacity_bytes, status.ram_bytes
    kv = s.kv_bytes if s is not None else 0
    used = None if held is None else held + kv
    held_text = "" if used is None else f" {format_fraction(used, cap)} held"
    held_text += f" (KV {format_bytes(kv)})" if kv and held_text else ""
    vram = status.vram
    out.append("RAM".ljust(LABEL), style="bold")
    if status.is_gpu:
        out.append("–" if rss is None else f"process {format_bytes(rss)}")
    else:
        out.append_text(tracked(memory_bar(None if used is None else used_fraction(used, cap), bar_width)))
        out.append(held_text)
        if rss is not None:
            out.append(f" · process {format_bytes(rss)}", style="dim")
    out.append("\n")
    out.append("VRAM".ljust(LABEL), style="bold")
    if not status.is_gpu:
        out.append("– (CPU worker)", style=NA_STYLE)
    elif vram is not None:
        out.append_text(tracked(memory_bar(used_fraction(*vram), bar_width)))
        out.append(f" {format_fraction(*vram)} in use")
        if used is not None:
            out.append(f" · tensors {format_bytes(used)} of {format_bytes(cap)}", style="dim")
    else:
        out.append_text(tracked(memory_bar(None if used is None else used_fraction(used, cap), bar_width)))
        out.append(held_text)
    out.append("\n")


class WorkerPanel(Widget):
    """Shows `status` (set by the screen), re-rendered at the panel's width (a long reason for being down wraps)."""

    DEFAULT_CSS = """
    WorkerPanel { height: auto; min-height: 10; border: round $primary; padding: 0 1; }
    WorkerPanel.-down { border: round $error; }
    """

    status: reactive[WorkerStatus | None] = reactive(None, layout=True)
    link: reactive[LinkRates | None] = reactive(None)

    def __init__(self, status: WorkerStatus, tag: str = "", color: str = "#4e79a7", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.tag, self.color = tag, color
        self.set_reactive(WorkerPanel.status, status)
        self.watch_status(status)

    def watch_status(self, status: WorkerStatus | None) -> None:
        self.set_class(status is not None and not status.up, "-down")

    def render(self) -> Text:
        if self.status is None:
            return Text("")
        return render_worker(self.status, self.content_size.width, self.tag, self.color, self.link)

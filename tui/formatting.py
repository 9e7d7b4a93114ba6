"""Pure display formatters for the TUI: memory bars with eighth-block precision, byte counts, rates."""

from __future__ import annotations

from rich.text import Text

from engine.auto_placement import AutoChoice, Measured
from engine.byte_sizes import format_bytes as _engine_format_bytes
from engine.ik_types import type_name

# Thresholds on the used fraction: below WARN_AT is OK, from CRIT_AT on is critical.
WARN_AT = 0.75
CRIT_AT = 0.90
OK_STYLE = "green"
WARN_STYLE = "yellow"
CRIT_STYLE = "bold red"
NA_STYLE = "dim"
NA = "N/A"
# U+258F..U+2588: one to eight eighths of a cell, so a bar resolves 1/(8*width) of the whole.
EIGHTHS = " ▏▎▍▌▋▊▉█"


def level_style(fraction: float) -> str:
    """The named colour for a used fraction."""
    if fraction >= CRIT_AT:
        return CRIT_STYLE
    return WARN_STYLE if fraction >= WARN_AT else OK_STYLE


def bar_cells(fraction: float, width: int) -> str:
    """`width` cells filled to `fraction` (clamped to 0..1) in eighth blocks, padded with spaces."""
    if width <= 0:
        return ""
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    cells = "█" * full + (EIGHTHS[rest] if rest else "")
    return cells.ljust(width)


def memory_bar(fraction: float | None, width: int) -> Text:
    """A bar of `width` cells coloured by level; None (capacity unknown) is an explicit dim N/A."""
    if fraction is None:
        return Text(NA.center(width) if width >= len(NA) else NA[:width], style=NA_STYLE)
    return Text(bar_cells(fraction, width), style=level_style(fraction))


def format_bytes(n_bytes: int | None) -> str:
    """`812.4 MiB` (binary units, the planner's own format); None is N/A."""
    return NA if n_bytes is None else _engine_format_bytes(n_bytes)


def size_flag(n_bytes: int) -> str:
    """A size as --device-mem reads it back, in the largest binary unit it reaches: `24GiB` when exact, else rounded
    down to a tenth (`23.5GiB` for 24683584 KiB), so that what is read back never claims more than `n_bytes`."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            tenths = n_bytes * 10 // scale
            return f"{tenths // 10}{unit}" if tenths % 10 == 0 else f"{tenths // 10}.{tenths % 10}{unit}"
    return str(n_bytes)


def format_fraction(need_bytes: int, capacity_bytes: int | None) -> str:
    """`12.3 MiB / 512.0 MiB (2%)`, or `12.3 MiB / N/A` when the capacity is unknown."""
    if capacity_bytes is None:
        return f"{format_bytes(need_bytes)} / {NA}"
    pct = f" ({100 * need_bytes / capacity_bytes:.0f}%)" if capacity_bytes else ""
    return f"{format_bytes(need_bytes)} / {format_bytes(capacity_bytes)}{pct}"


def used_fraction(need_bytes: int, capacity_bytes: int | None) -> float | None:
    """need/capacity, None when the capacity is unknown; a zero capacity with any need is full."""
    if capacity_bytes is None:
        return None
    if capacity_bytes == 0:
        return 1.0 if need_bytes else 0.0
    return need_bytes / capacity_bytes


def format_rate(tokens_per_s: float) -> str:
    """`123.45 t/s`."""
    return f"{tokens_per_s:.2f} t/s"


def printable(text: str) -> str:
    """Model output with C0/C1 control characters (other than newline and tab) shown as visible symbols.

    A random or broken model can emit ESC or other controls; written raw they would corrupt the terminal."""
    return text.translate(_CONTROL_PICTURES)


# C0 controls map to the Unicode "control pictures" block (␀..␟), DEL to ␡, C1 controls to U+FFFD.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20) if chr(c) not in "\n\t"} | {0x7F: 0x2421} | {
    c: 0xFFFD for c in range(0x80, 0xA0)}


def auto_chosen_line(choice: AutoChoice) -> str:
    """`--auto chose <name> (predicted 12.34 t/s): --rpc … -ot …`: the choice as the flags that pin it."""
    c = choice.chosen
    flags = " ".join(c.rules.flags()) or "no placement flags"
    return f"--auto chose {c.name} (predicted {format_rate(c.tokens_per_s)}; {choice.why}): {flags}"


def auto_measured(m: Measured) -> list[str]:
    """What --auto measured: each device's memory and decode speed per GGML type, each link, the software cost."""
    out = []
    for device, per_type in m.gbps.items():
        speeds = ", ".join(f"{type_name(t)} {v:.1f}" for t, v in sorted(per_type.items()))
        link = m.links.get(device)
        where = f"; link RTT {link.rtt_s * 1e3:.3f} ms, {link.bytes_per_s / 1e6:.0f} MB/s" if link else ""
        out.append(f"{device}: {format_bytes(m.capacities.get(device))}, decode GB/s {speeds}{where}")
    out.append(f"software per token (beyond reading weights): {m.software_s * 1e3:.2f} ms")
    return out


def auto_table(choice: AutoChoice) -> list[str]:
    """Every candidate --auto weighed, as a markdown table: predicted t/s, round trips and wire bytes per token
    (for those that fit), its flags, or why it does not fit."""
    lines = ["| candidate | predicted | round trips / token | wire / token | flags |", "|---|---|---|---|---|"]
    for c in choice.weighed:
        mark = "**" if c is choice.chosen else ""
        flags = " ".join(c.rules.flags()) or "(none)"
        if c.prediction is None:
            lines.append(f"| {c.name} | – | – | – | not used: {c.problem} |")
            continue
        p = c.prediction
        lines.append(f"| {mark}{c.name}{mark} | {format_rate(p.tokens_per_s)} | {p.round_trips:.1f} | "
                     f"{format_bytes(round(p.wire_bytes))} | `{flags}` |")
    return lines

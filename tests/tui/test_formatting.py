"""The TUI's pure formatters: eighth-block memory bars, N/A, colour thresholds, bytes, control characters."""

from __future__ import annotations

import pytest

from tui.formatting import (
    CRIT_AT,
    CRIT_STYLE,
    NA_STYLE,
    OK_STYLE,
    WARN_AT,
    WARN_STYLE,
    bar_cells,
    format_bytes,
    format_fraction,
    level_style,
    memory_bar,
    printable,
    used_fraction,
)


@pytest.mark.parametrize(("fraction", "width", "cells"), [
    (0.0, 4, "    "),
    (1.0, 4, "████"),
    (0.5, 4, "██  "),
    (1 / 32, 4, "▏   "),  # one eighth of one cell of four
    (3 / 32, 4, "▍   "),
    (0.5 + 7 / 32, 4, "██▉ "),
    (1.7, 3, "███"),  # clamped: an overflow fills the bar
    (-0.2, 3, "   "),
    (0.5, 0, ""),
])
def test_bar_cells(fraction: float, width: int, cells: str) -> None:
    assert bar_cells(fraction, width) == cells
    assert len(bar_cells(fraction, width)) == width


@pytest.mark.parametrize(("fraction", "style"), [
    (0.0, OK_STYLE), (WARN_AT - 0.001, OK_STYLE), (WARN_AT, WARN_STYLE), (CRIT_AT - 0.001, WARN_STYLE),
    (CRIT_AT, CRIT_STYLE), (1.2, CRIT_STYLE),
])
def test_level_style_thresholds(fraction: float, style: str) -> None:
    assert level_style(fraction) == style
    assert str(memory_bar(fraction, 8).style) == style


def test_thresholds_are_ordered() -> None:
    assert 0 < WARN_AT < CRIT_AT <= 1


def test_memory_bar_unknown_is_na() -> None:
    bar = memory_bar(None, 9)
    assert bar.plain == "   N/A   " and str(bar.style) == NA_STYLE
    assert memory_bar(None, 2).plain == "N/"  # never wider than asked


def test_memory_bar_width_is_exact() -> None:
    for f in (0, 0.13, 0.77, 0.95, 1, 2):
        assert len(memory_bar(f, 10).plain) == 10


def test_format_bytes() -> None:
    assert format_bytes(None) == "N/A"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 << 30) == "5.0 GiB"


def test_used_fraction_and_text() -> None:
    assert used_fraction(10, None) is None
    assert used_fraction(5, 10) == 0.5
    assert used_fraction(1, 0) == 1.0 and used_fraction(0, 0) == 0.0
    assert format_fraction(1 << 20, None) == "1.0 MiB / N/A"
    assert format_fraction(3 << 20, 4 << 20) == "3.0 MiB / 4.0 MiB (75%)"


def test_printable_hides_control_characters() -> None:
    assert printable("a\x1b[2Jb\nc\td\x7f\x85") == "a␛[2Jb\nc\td␡\ufffd"
    assert printable("plain text, ünïcode") == "plain text, ünïcode"

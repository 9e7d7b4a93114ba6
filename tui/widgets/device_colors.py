"""Stable per-device colours for the placement map, its legend and the memory bars."""

from __future__ import annotations

from collections.abc import Sequence

# Distinct on dark and light themes; CPU always takes the first.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f")
MIXED_COLOR = "#777777"


def device_colors(devices: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(devices)}

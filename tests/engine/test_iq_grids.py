"""The i-quant grids built from the gguf package agree with ik_llama.cpp's ggml-common.h (one entry per table)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import iq_grids

# (table, index, the entry as ik_llama.cpp's ggml/src/ggml-common.h writes it: value j is byte j, little-endian)
ENTRIES = [
    ("IQ2XXS_GRID", 100, 0x08192B0808081908, 8),  # iq2xxs_grid
    ("IQ2XS_GRID", 509, 0x2B2B2B2B082B2B2B, 8),  # iq2xs_grid
    ("IQ2S_GRID", 1021, 0x2B2B2B2B082B2B08, 8),  # iq2s_grid
    ("IQ3XXS_GRID", 253, 0x3E2C0414, 4),  # iq3xxs_grid
    ("IQ3S_GRID", 100, 0x010F0101, 4),  # iq3s_grid
    ("IQ1S_GRID", 2045, 0x010101010101FF01, 8),  # iq1s_grid (int8: 0xff is -1)
]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e[0] for e in ENTRIES])
def test_grid_entry_matches_ik_llama(entry: tuple[str, int, int, int]) -> None:
    name, index, packed, width = entry
    grid = getattr(iq_grids, name)
    want = np.frombuffer(packed.to_bytes(width, "little"), np.int8)
    assert grid.dtype == np.int8 and grid.shape[1] == width
    assert np.array_equal(grid[index], want)


def test_grid_sizes() -> None:
    sizes = {n: getattr(iq_grids, n).shape for n, *_ in ENTRIES}
    assert sizes == {"IQ2XXS_GRID": (256, 8), "IQ2XS_GRID": (512, 8), "IQ2S_GRID": (1024, 8),
                     "IQ3XXS_GRID": (256, 4), "IQ3S_GRID": (512, 4), "IQ1S_GRID": (2048, 8)}

"""The i-quant lattice grids (iq2xxs_grid ... iq1s_grid of ggml-common.h) as int8 tables, one row per grid index.

ggml keeps these as data in its source; ikctl does not copy them: the `gguf` package ships each grid packed (2 or
3 bits per value, `grid_hex`) with the values the codes map to (`grid_map`), and `init_grid()` unpacks it. The
tables here are those unpacked grids, built once at import. ik_llama.cpp's grids are mainline's (checked entry by
entry against its ggml-common.h when this was written; tests/engine/test_ik_types.py keeps one entry per table).
"""

from __future__ import annotations

import gguf.quants
import numpy as np


def _grid(cls: type) -> np.ndarray:
    """The int8 grid [entries, values per entry] of one gguf.quants i-quant class."""
    cls.init_grid()  # type: ignore[attr-defined]
    g = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)  # type: ignore[attr-defined]
    out = g.astype(np.int8)
    assert np.array_equal(out, g), cls.__name__  # every grid value is a small integer
    return out


IQ2XXS_GRID = _grid(gguf.quants.IQ2_XXS)  # [256, 8]: values 8, 25, 43
IQ2XS_GRID = _grid(gguf.quants.IQ2_XS)  # [512, 8]
IQ2S_GRID = _grid(gguf.quants.IQ2_S)  # [1024, 8]
IQ3XXS_GRID = _grid(gguf.quants.IQ3_XXS)  # [256, 4]: values 4 .. 62
IQ3S_GRID = _grid(gguf.quants.IQ3_S)  # [512, 4]: odd values 1 .. 15
IQ1S_GRID = _grid(gguf.quants.IQ1_S)  # [2048, 8]: values -1, 0, 1 (IQ1_M uses the same grid)

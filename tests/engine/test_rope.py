"""The rope table: what it keeps is bounded whatever positions a run asks for, and positions past the table get
the same cos/sin, bit for bit, as the table gives (local and worker runs stay identical)."""

from __future__ import annotations

import numpy as np

from engine.config import RopeConfig
from engine.rope import TABLE_POSITIONS, RopeTable, rope_angles, table_bytes


def _float64(cfg: RopeConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin straight from ggml's formula in float64, position by position (no table)."""
    rows = [rope_angles(cfg, np.array([p])) for p in positions]
    theta = np.concatenate(rows)
    return cfg.magnitude * np.cos(theta), cfg.magnitude * np.sin(theta)


def test_the_table_stays_bounded_and_agrees_past_its_end() -> None:
    cfg = RopeConfig(n_rot=64, freq_base=10000.0, scaling_type="yarn", factor=40.0, orig_ctx=4096,
                     yarn_log_multiplier=0.1)
    table = RopeTable(cfg)
    inside = np.array([0, 5, TABLE_POSITIONS - 1])
    far = np.array([TABLE_POSITIONS - 1, TABLE_POSITIONS, 10**7])  # a peer's run may end anywhere in its context
    cos_in, sin_in = table.cos_sin(inside)
    cos_far, sin_far = table.cos_sin(far)
    kept = sum(a.nbytes for a in (table._cos, table._sin))
    assert len(table._cos) == TABLE_POSITIONS and kept + cos_far.nbytes * 2 <= table_bytes(64, 10**8)
    assert np.array_equal(cos_far[0], cos_in[2]) and np.array_equal(sin_far[0], sin_in[2])  # the same position
    want_cos, want_sin = _float64(cfg, far)
    assert np.allclose(cos_far, want_cos, atol=1e-6) and np.allclose(sin_far, want_sin, atol=1e-6)
    again = table.cos_sin(far.copy())  # every layer asks for the same positions: answered from the memo
    assert again[0] is cos_far
    assert table_bytes(64, 1) == 4 * 64 * (64 + 64)

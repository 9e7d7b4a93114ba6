"""The routed experts' sum: independent of how the experts are grouped (split over devices, batched)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.kernels import activations
from engine.moe import NO_EXPERT, moe_ffn
from engine.synth import SynthSpec, write_model


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path: Path = tmp_path_factory.mktemp("moe") / "moe.gguf"
    write_model(path, SynthSpec(layers=2, dense_layers=1, dtype="Q8_0", experts=16, top_k=4, seed=3))
    return load_model(path).net.layers[1].experts


@pytest.mark.parametrize("T", [1, 2, 5, 12])
@pytest.mark.parametrize("int8", [True, False])
def test_parts_add_up_to_the_whole_bit_for_bit(experts: tuple, T: int, int8: bool) -> None:
    rng = np.random.default_rng(T)
    D = experts[0].shape[2]
    h = rng.standard_normal((T, D)).astype(np.float32)
    idx = np.array([rng.choice(16, 4, replace=False) for _ in range(T)])
    w = rng.random((T, 4)).astype(np.float32)
    with activations(int8):
        whole = moe_ffn(h, idx, w, *experts)
        total = np.zeros((T, D), np.float64)
        for lo, hi in ((0, 3), (3, 11), (11, 16)):  # three devices' ranges, each sent only its rows
            mine = (idx >= lo) & (idx < hi)
            rows = np.flatnonzero(mine.any(axis=1))
            if len(rows):
                part = moe_ffn(h[rows], np.where(mine[rows], idx[rows], NO_EXPERT), w[rows].astype(np.float64),
                               *experts)
                assert part.dtype == np.float64
                total[rows] += part
    assert whole.dtype == np.float32
    assert np.array_equal(total.astype(np.float32), whole)


def test_ids_below_no_expert_are_refused(experts: tuple) -> None:
    h = np.zeros((1, experts[0].shape[2]), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        moe_ffn(h, np.array([[NO_EXPERT - 1, 0, 1, 2]]), np.ones((1, 4), np.float32), *experts)

"""Sampling filters (top-k, top-p, min-p, temperature), greedy, and seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import IkctlError
from engine.sampling import Sampler, SamplerParams, candidate_probs

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))  # probabilities at temperature 1


def _cands(**kw: float) -> tuple[list[int], np.ndarray]:
    params = SamplerParams(**{"temp": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw})
    ids, p = candidate_probs(LOGITS, params)
    return ids.tolist(), p


def test_no_filters_keeps_the_distribution() -> None:
    ids, p = _cands()
    assert ids == [0, 1, 2, 3, 4]
    assert np.allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05])


def test_top_k() -> None:
    ids, p = _cands(top_k=2)
    assert ids == [0, 1]
    assert np.allclose(p, [0.5 / 0.7, 0.2 / 0.7])


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    assert _cands(top_p=0.7)[0] == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert _cands(top_p=0.71)[0] == [0, 1, 2]
    assert _cands(top_p=0.4)[0] == [0]


def test_min_p_is_relative_to_the_best_token() -> None:
    assert _cands(min_p=0.3)[0] == [0, 1, 2]  # >= 0.15
    assert _cands(min_p=0.5)[0] == [0]


def test_temperature_sharpens_and_flattens() -> None:
    _, cold = _cands(temp=0.5)
    _, hot = _cands(temp=2.0)
    assert cold[0] > 0.5 > hot[0]
    assert np.isclose(cold[0], 0.5**2 / np.sum(np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2))


def test_greedy_and_seeded_draws() -> None:
    assert Sampler(SamplerParams(temp=0.0))(LOGITS) == 0
    draws = [Sampler(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=s)) for s in (1, 1)]
    a = [draws[0](LOGITS) for _ in range(200)]
    b = [draws[1](LOGITS) for _ in range(200)]
    assert a == b
    freq = np.bincount(a, minlength=5) / 200
    assert abs(freq[0] - 0.5) < 0.12 and set(a) >= {0, 1, 2}


@pytest.mark.parametrize("kw", [{"top_p": 0.0}, {"min_p": 1.5}, {"temp": -1.0}])
def test_bad_parameters(kw: dict[str, float]) -> None:
    with pytest.raises(IkctlError):
        Sampler(SamplerParams(**kw))

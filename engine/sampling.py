"""Token sampling as llama.cpp chains it: top-k -> top-p -> min-p -> temperature -> draw (greedy at temp <= 0)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import IkctlError


@dataclass(frozen=True)
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    seed: int = -1  # -1: a random seed

    def validated(self) -> SamplerParams:
        if not 0.0 < self.top_p <= 1.0:
            raise IkctlError(f"--top-p {self.top_p} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise IkctlError(f"--min-p {self.min_p} must be in [0, 1]")
        if self.temp < 0:
            raise IkctlError(f"--temp {self.temp} must be >= 0 (0 = greedy)")
        return self


def candidate_probs(logits: np.ndarray, p: SamplerParams) -> tuple[np.ndarray, np.ndarray]:
    """The surviving token ids (best first) and their probabilities after the filter chain."""
    logits = np.asarray(logits, dtype=np.float64)
    k = p.top_k if 0 < p.top_k < len(logits) else len(logits)
    ids = np.argpartition(-logits, k - 1)[:k] if k < len(logits) else np.arange(len(logits))
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    z = logits[ids]
    probs = np.exp(z - z[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)  # smallest prefix with mass >= top_p
        ids, z, probs = ids[:keep], z[:keep], probs[:keep]
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        ids, z = ids[keep], z[keep]
    probs = np.exp((z - z[0]) / p.temp)
    return ids, probs / probs.sum()


class Sampler:
    """Draws the next token from logits [V]; deterministic for a given seed."""

    def __init__(self, params: SamplerParams) -> None:
        self.params = params.validated()
        self.rng = np.random.default_rng(None if params.seed < 0 else params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.temp <= 0.0:
            return int(np.argmax(logits))
        ids, probs = candidate_probs(logits, self.params)
        return int(ids[self.rng.choice(len(ids), p=probs)])

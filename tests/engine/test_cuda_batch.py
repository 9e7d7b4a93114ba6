"""A batch of sequences on the in-process GPU path (engine.cuda.local's SegmentRunners, CuPy emulated on the CPU by
tests/engine/strict_cupy.py): the same logits as the CPU runner's batch, and as each sequence alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import load_model
from engine.batch import SeqRun
from engine.gguf_file import GGUFFile
from engine.placement import layer_ops
from tests.engine.test_batch import DEEPSEEK2_ATOL, alone, batched
from tests.engine.test_cuda_backend import SPEC, _runner, model_path, stand_in  # noqa: F401  (fixtures)


@pytest.mark.parametrize(("mla", "cache_type"), [(3, "f16"), (0, "q8_0")])
def test_a_batch_on_device_arrays_equals_cpu(model_path: Path, stand_in: Any, mla: int,  # noqa: F811
                                             cache_type: str) -> None:
    ops = layer_ops(GGUFFile(model_path).tensors, SPEC.layers)
    cpu = _runner(model_path, ops, mla, cache_type, gpu=False)
    gpu = _runner(model_path, ops, mla, cache_type, gpu=True)
    ids = np.random.default_rng(1).integers(0, SPEC.vocab, 20)
    runs = [[SeqRun(1, 0, 5), SeqRun(2, 0, 3)],  # two prompts
            [SeqRun(1, 5, 1), SeqRun(3, 0, 4), SeqRun(2, 3, 1)],  # a prompt between two decode steps
            [SeqRun(2, 4, 1), SeqRun(1, 6, 1), SeqRun(3, 4, 1)]]  # decode steps, in another order
    for seqs in runs:
        n = sum(s.n_tokens for s in seqs)
        state = {"ids": ids[:n], "n_out": np.asarray(1)}
        a, b = cpu.run_batch(seqs, dict(state)), gpu.run_batch(seqs, dict(state))
        assert isinstance(b["logits"], np.ndarray) and b["logits"].shape == (len(seqs), SPEC.vocab)
        assert np.array_equal(a["logits"], b["logits"])


def test_eval_batch_through_in_process_gpu_segments(model_path: Path, stand_in: Any) -> None:  # noqa: F811
    gpu = load_model(model_path, ctx_size=64, float_activations=True, n_gpu_layers=99)
    assert gpu.net.gpu
    got, got_tokens = batched(gpu)
    want, want_tokens = alone(load_model(model_path, ctx_size=64, float_activations=True))
    assert got_tokens == want_tokens
    assert max(np.abs(g - w).max() for gs, ws in zip(got, want, strict=True) for g, w in zip(gs, ws, strict=True)) \
        <= DEEPSEEK2_ATOL

"""Model.eval_batch: several sequences in one forward pass give each sequence's logits as when it runs alone.

How close: a pass of at most MATVEC_MAX_T (16) rows multiplies quantized weights with int8 activations row by row,
so a dense model's logits do not depend on the other rows: bit for bit (SmolLM2). DeepSeek2 differs in float32
summation order only, by design of the existing kernels: a pass of <= 2 rows sums each token's routed experts in
one gathered launch, a bigger one expert by expert (engine.moe), and float32 weights go through BLAS sgemm, whose
summation order depends on the row count; an f16 cache then rounds some K/V entries to the neighbouring half. So
within 1e-4 of logits of magnitude ~1 (measured: at most 4.5e-5), and the same greedy tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from engine import IkctlError, load_model
from engine.batch import Batch, micro_batches
from engine.kv_cache import KVCache
from engine.model import Model
from engine.synth import SynthSpec, write_model
from tests.refs import V3

PROMPTS = [[286, 5, 77, 190, 12, 260, 44], [101, 9, 230], [150, 33, 7, 8, 99]]  # 15 rows: one decode-kernel pass
LATE_PROMPT = [17, 61, 2, 3, 250, 11]  # joins while the others decode
STEPS = 5


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quantized deepseek2 (Q8_0, q-LoRA, sigmoid routing with groups): the int8 decode kernels run it."""
    spec = SynthSpec(layers=3, dense_layers=1, q_lora_rank=48, gating="sigmoid", expert_groups=4,
                     expert_groups_used=2, expert_weights_norm=True, dtype="Q8_0", seed=11)
    return write_model(tmp_path_factory.mktemp("batch") / "q8.gguf", spec)


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def batched(model: Model) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """Three prompts prefilled in one pass, STEPS decode passes of all three, a fourth prompt joining the second
    decode pass (a prompt chunk beside decode steps): every sequence's logits and greedy tokens."""
    caches = [model.new_cache() for _ in range(4)]
    logits: list[list[np.ndarray]] = [[] for _ in range(4)]
    tokens: list[list[int]] = [[] for _ in range(4)]
    for k, out in enumerate(model.eval_batch(list(zip(PROMPTS, caches, strict=False)))):
        logits[k].append(out)
        tokens[k].append(_argmax(out))
    for step in range(STEPS):
        items: list[tuple[Sequence[int], KVCache]] = [([tokens[k][-1]], caches[k]) for k in range(3)]
        live = [0, 1, 2]
        if step == 1:
            items.insert(1, (LATE_PROMPT, caches[3]))
            live.insert(1, 3)
        elif step > 1:
            items.append(([tokens[3][-1]], caches[3]))
            live.append(3)
        for k, out in zip(live, model.eval_batch(items), strict=True):
            logits[k].append(out)
            tokens[k].append(_argmax(out))
    return logits, tokens


def alone(model: Model) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """The same sequences, the same chunks, each run by itself with Model.eval."""
    logits, tokens = [], []
    for prompt, steps in ((PROMPTS[0], STEPS), (PROMPTS[1], STEPS), (PROMPTS[2], STEPS), (LATE_PROMPT, STEPS - 2)):
        cache = model.new_cache()
        out = [model.eval(prompt, cache)[0]]
        for _ in range(steps):
            out.append(model.eval([_argmax(out[-1])], cache)[0])
        logits.append(out)
        tokens.append([_argmax(x) for x in out])
    return logits, tokens


def assert_batch_matches_alone(model: Model, atol: float) -> None:
    got, got_tokens = batched(model)
    want, want_tokens = alone(model)
    assert got_tokens == want_tokens
    assert len({t for seq in got_tokens for t in seq}) > 3  # real continuations, not one token repeated
    for g_seq, w_seq in zip(got, want, strict=True):
        for g, w in zip(g_seq, w_seq, strict=True):
            assert g.shape == w.shape == (model.n_vocab,)
            assert g.dtype == np.float32
            if atol == 0:
                assert np.array_equal(g, w)
            else:
                assert np.abs(g - w).max() <= atol


DEEPSEEK2_ATOL = 1e-4


@pytest.mark.parametrize("mla", [0, 1, 2, 3])
@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_quantized_deepseek2_batch_matches_alone(q8_model: Path, mla: int, cache_type: str) -> None:
    assert_batch_matches_alone(load_model(q8_model, mla=mla, cache_type_k=cache_type), atol=DEEPSEEK2_ATOL)


@pytest.mark.parametrize(("mla", "cache_type"), [(0, "f16"), (3, "f16"), (3, "q8_0"), (1, "f32")])
def test_reference_deepseek2_batch_matches_alone(mla: int, cache_type: str) -> None:
    assert_batch_matches_alone(load_model(V3, mla=mla, cache_type_k=cache_type), atol=DEEPSEEK2_ATOL)


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_llama_batch_is_bit_identical(smollm2_path: Path, cache_type: str) -> None:
    assert_batch_matches_alone(load_model(smollm2_path, cache_type_k=cache_type), atol=0)


def test_long_prompt_goes_in_chunks_beside_decode_steps(q8_model: Path) -> None:
    """With -ub 4 a 10-token prompt takes three passes, the decode steps ride in the last; the logits are those
    of the same chunks run alone."""
    model = load_model(q8_model, ubatch_size=4)
    warm = [model.new_cache(), model.new_cache()]
    model.eval_batch([(PROMPTS[1], warm[0]), (PROMPTS[2], warm[1])])
    long_prompt = PROMPTS[0] + PROMPTS[1]
    fresh = model.new_cache()
    got = model.eval_batch([(long_prompt, fresh), ([4], warm[0]), ([5], warm[1])])
    assert [c.n_past for c in (fresh, *warm)] == [10, 4, 6]
    for (ids, prompt), g in zip([(long_prompt, []), ([4], PROMPTS[1]), ([5], PROMPTS[2])], got, strict=True):
        cache = model.new_cache()
        if prompt:
            model.eval(prompt, cache)
        assert np.abs(g - model.eval(ids, cache)[0]).max() <= DEEPSEEK2_ATOL


def test_a_batch_of_one_is_eval(q8_model: Path, smollm2_path: Path) -> None:
    for model in (load_model(q8_model), load_model(smollm2_path)):
        a, b = model.new_cache(), model.new_cache()
        for ids in (PROMPTS[0], [3], [9, 10]):
            assert np.array_equal(model.eval_batch([(ids, a)])[0], model.eval(ids, b)[0])
        assert a.n_past == b.n_past == len(PROMPTS[0]) + 3


def test_bad_items_are_refused_before_any_cache_changes(q8_model: Path) -> None:
    model = load_model(q8_model, ctx_size=16)
    a, b = model.new_cache(), model.new_cache()
    model.eval(PROMPTS[0], a)
    cases = [
        ([], "at least one"),
        ([([1], b), ([], a)], "item 1: needs a non-empty list"),
        ([([1], b), ([2, model.n_vocab], a)], f"item 1: token id {model.n_vocab} is outside the vocabulary"),
        ([([1], b), ([-1], a)], "item 1: token id -1 is outside"),
        ([([1], a), ([2], b), ([3], a)], "items 0 and 2 share one KV cache"),
        ([([1], b), (list(range(10)), a)], "item 1: context is full: 7 cached \\+ 10 new tokens exceed the context "
                                          "size 16"),
    ]
    for items, message in cases:
        with pytest.raises(IkctlError, match=message):
            model.eval_batch(items)
    assert (a.n_past, b.n_past) == (len(PROMPTS[0]), 0)
    assert np.abs(model.eval_batch([([1], b), ([2], a)])[1] - _after(model, PROMPTS[0], [2])).max() <= DEEPSEEK2_ATOL


def _after(model: Model, prompt: list[int], ids: list[int]) -> np.ndarray:
    cache = model.new_cache()
    model.eval(prompt, cache)
    return model.eval(ids, cache)[0]


@pytest.mark.parametrize(("lengths", "ubatch", "max_sequences", "want"), [
    ([1, 1, 1], 512, None, [[(0, 0, 1), (1, 0, 1), (2, 0, 1)]]),
    ([10, 1, 1], 4, None, [[(0, 0, 4)], [(0, 4, 8)], [(0, 8, 10), (1, 0, 1), (2, 0, 1)]]),
    ([1, 10, 1], 4, None, [[(0, 0, 1), (1, 0, 3)], [(1, 3, 7)], [(1, 7, 10), (2, 0, 1)]]),
    ([1, 1, 1, 1, 1], 512, 2, [[(0, 0, 1), (1, 0, 1)], [(2, 0, 1), (3, 0, 1)], [(4, 0, 1)]]),
    ([3], 1, None, [[(0, 0, 1)], [(0, 1, 2)], [(0, 2, 3)]]),
])
def test_micro_batches(lengths: list[int], ubatch: int, max_sequences: int | None,
                       want: list[list[tuple[int, int, int]]]) -> None:
    assert micro_batches(lengths, ubatch, max_sequences) == want


def test_batch_rows() -> None:
    one = Batch.of([None], [5])
    assert one.out_rows(1) == slice(4, 5) and one.out_rows(9) == slice(0, 5)
    three = Batch.of([None, None, None], [3, 1, 2])
    assert three.out_rows(1).tolist() == [2, 3, 5]
    assert three.out_rows(2) == slice(1, 6)  # consecutive rows stay a slice
    assert three.rows_where([True, True, False]) == slice(0, 4)
    assert three.rows_where([True, False, True]).tolist() == [0, 1, 2, 4, 5]

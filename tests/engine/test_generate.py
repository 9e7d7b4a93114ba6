"""Streaming generation: text pieces, stop reasons, statistics (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import load_model


@pytest.fixture(scope="module")
def model(smollm2_path: Path):
    return load_model(smollm2_path, ctx_size=512)


def test_streamed_pieces_join_to_the_detokenized_text_and_stop_at_eos(model) -> None:
    prompt = model.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    gen = model.generate(prompt, n_predict=64, temp=0.0)
    pieces = list(gen)
    ids = [p.id for p in pieces if p.id >= 0]
    assert "".join(p.text for p in pieces) == model.detokenize(ids)
    assert "Paris" in model.detokenize(ids)
    assert gen.stats.stop_reason == "eos"  # the answer ends with <|im_end|>, well before 64 tokens
    assert gen.stats.n_gen == len(ids) < 64
    assert gen.stats.n_prompt == len(model.tokenize(prompt))
    assert gen.stats.prompt_tps > 0 and gen.stats.gen_tps > 0


def test_length_limit_and_multibyte_characters(model) -> None:
    prompt = model.apply_chat_template([{"role": "user", "content": "Say 'héllo wörld' in Japanese."}])
    gen = model.generate(prompt, n_predict=10, temp=0.0, stop_at_eos=False)
    pieces = list(gen)
    assert gen.stats.stop_reason == "length" and gen.stats.n_gen == 10
    text = "".join(p.text for p in pieces)
    assert text == model.detokenize([p.id for p in pieces if p.id >= 0])


def test_empty_prompt_is_an_error(model) -> None:
    from engine import IkctlError

    with pytest.raises(IkctlError, match="prompt is empty"):
        list(model.generate([], n_predict=3))

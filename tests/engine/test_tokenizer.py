"""Tokenizer and chat template vs llama.cpp: SmolLM2, the deepseek2 refs and synthetic vocabularies."""

from __future__ import annotations

import copy
import json
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import pytest

from engine.chat_template import apply_chat_template
from engine.errors import IkctlError, ModelFileError
from engine.gguf_file import GGUFFile
from engine.tokenizer import Tokenizer
from tests.refs import REFS

TOKEN_REFS = json.loads((Path(__file__).parent / "data" / "smollm2_token_refs.json").read_text("utf-8"))
CASES = TOKEN_REFS["cases"]
SYNTH = TOKEN_REFS["synth"]


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode map: the token text of each byte 0..255."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_vocab(path: Path, tokens: list[str], merges: list[str], types: list[int] | None = None,
                arch: str = "llama", **meta: Any) -> GGUFFile:
    """A tensor-free GGUF holding only a tokenizer (metadata keys given without the `tokenizer.` prefix).

    The gguf writer drops empty arrays, so `merges` must not be empty.
    """
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model(meta.pop("model", "gpt2"))
    w.add_tokenizer_pre(meta.pop("pre", "default"))
    w.add_token_list(tokens)
    w.add_token_types(types or [1] * len(tokens))
    w.add_token_merges(merges)
    for key, value in meta.items():
        w.add_key_value(f"tokenizer.{key}", value, _gguf_type(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def _gguf_type(value: Any) -> gguf.GGUFValueType:
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    return gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.STRING


def with_meta(f: GGUFFile, **meta: Any) -> GGUFFile:
    """f with some metadata values replaced (a shallow copy: the tensors stay shared)."""
    g = copy.copy(f)
    g.metadata = {**f.metadata, **meta}
    return g


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> GGUFFile:
    return GGUFFile(smollm2_path)


@pytest.fixture(scope="module")
def tok(smollm2: GGUFFile) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2)


@pytest.fixture(scope="module")
def v3() -> GGUFFile:
    return GGUFFile(REFS / "open-v3.gguf")


# ---- SmolLM2 against llama.cpp ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"])[:40] for c in CASES])
def test_encode_matches_llama_cpp(tok: Tokenizer, case: dict[str, Any]) -> None:
    assert tok.encode(case["text"], special=True) == case["special"]
    assert tok.encode(case["text"], special=False) == case.get("plain", case["special"])


@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"])[:40] for c in CASES])
def test_decode_round_trips(tok: Tokenizer, case: dict[str, Any]) -> None:
    text = case["text"]
    for special in (True, False):
        ids = tok.encode(text, special=special)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode()


@pytest.mark.parametrize("pre", sorted(TOKEN_REFS["pre_variants"]))
def test_each_pre_tokenizer_matches_llama_cpp(smollm2: GGUFFile, pre: str) -> None:
    # SmolLM2's tokens and merges, split by another tokenizer.ggml.pre's regexes
    t = Tokenizer.from_gguf(with_meta(smollm2, **{"tokenizer.ggml.pre": pre}))
    got = [t.encode(c["text"]) for c in CASES]
    assert got == TOKEN_REFS["pre_variants"][pre]


def test_pre_tokenizers_differ_on_the_reference_texts() -> None:
    # otherwise the tests of each pre-tokenizer could pass with one regex set standing in for another
    smollm = [c["special"] for c in CASES]
    both = {pre: json.dumps([TOKEN_REFS["pre_variants"].get(pre, smollm), ids])
            for pre, ids in SYNTH["ids"].items()}
    assert len(set(both.values())) == len(both) == len(TOKEN_REFS["pre_variants"]) + 1


@pytest.mark.parametrize("pre", sorted(SYNTH["ids"]))
def test_digit_grouping_and_ignore_merges_match_llama_cpp(tmp_path: Path, pre: str) -> None:
    tokens = [*gpt2_byte_chars(), *SYNTH["tokens"]]
    types = [1] * 256 + SYNTH["types"]
    f = write_vocab(tmp_path / "v.gguf", tokens, SYNTH["merges"], types, pre=pre,
                    **{"ggml.eos_token_id": tokens.index("<|im_end|>")})
    t = Tokenizer.from_gguf(f)
    assert [t.encode(s) for s in SYNTH["texts"]] == SYNTH["ids"][pre]
    if pre == "smollm":
        # NORMAL-typed end tokens are made CONTROL by their text; USER_DEFINED ones parse even as plain text
        assert [t.encode(s, special=False) for s in SYNTH["texts"]] == SYNTH["plain"]
        assert t.eog_ids == set(SYNTH["eog_ids"])
        assert [t.decode(t.encode(s)) for s in SYNTH["texts"]] == SYNTH["texts"]


def test_special_ids_and_eog(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (TOKEN_REFS["bos"], TOKEN_REFS["eos"])
    assert tok.add_bos is TOKEN_REFS["add_bos"]
    assert tok.eog_ids == set(TOKEN_REFS["eog_ids"])
    assert tok.token_id("<|im_end|>") in tok.eog_ids
    assert tok.token_id("<|endoftext|>") in tok.eog_ids
    assert tok.token_id("<|im_start|>") not in tok.eog_ids
    assert tok.n_vocab == 49152


def test_token_bytes_match_llama_cpp_pieces(tok: Tokenizer) -> None:
    for token, (plain, special) in TOKEN_REFS["pieces"].items():
        assert tok.token_bytes(int(token)).hex() == plain, token
        assert tok.token_bytes(int(token), special=True).hex() == special, token


def test_special_tokens_parse_only_when_asked(tok: Tokenizer) -> None:
    im_end = tok.token_id("<|im_end|>")
    assert tok.encode("<|im_end|>") == [im_end]
    plain = tok.encode("<|im_end|>", special=False)
    assert im_end not in plain and len(plain) > 1
    assert tok.decode(plain) == "<|im_end|>"
    # a control token renders only when asked to: streaming shows nothing for it
    assert tok.decode([im_end], special=False) == "" and tok.decode([im_end]) == "<|im_end|>"


def test_streamed_bytes_rebuild_split_characters(tok: Tokenizer) -> None:
    text = "Emoji: 😀🎉 and 中文"
    pieces = [tok.token_bytes(i) for i in tok.encode(text)]
    assert b"".join(pieces) == text.encode()
    partial = [p for p in pieces if p]
    assert any(not _is_utf8(p) for p in partial), "expected a character split over tokens"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_encode_add_bos_and_bad_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("", add_bos=True) == [tok.bos_id] and tok.encode("") == []
    with pytest.raises(IkctlError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(IkctlError, match="outside the vocabulary"):
        tok.token_bytes(-1)


def test_loading_a_large_vocabulary_is_fast(smollm2: GGUFFile) -> None:
    t0 = time.perf_counter()
    Tokenizer.from_gguf(smollm2)
    assert time.perf_counter() - t0 < 3.0  # about 0.25 s here; a per-token Python BPE build takes far longer


# ---- deepseek2 reference models -----------------------------------------------------------------------
def test_open_v3_byte_tokens_round_trip_any_bytes(v3: GGUFFile) -> None:
    t = Tokenizer.from_gguf(v3)
    assert [t.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    rng = random.Random(7)
    for _ in range(20):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        assert t.decode_bytes(list(blob)) == blob  # id = byte value for the 256 byte tokens
    noise = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(200))
    for text in ["日本語🎉", "\x00\x01\x7f\x80 ÿ", "Ωmega\tçava\r\n", noise]:
        ids = t.encode(text)
        assert t.decode(ids) == text
    assert t.encode("日本語🎉") == list("日本語🎉".encode())  # no merge touches these bytes


def test_open_v3_merges_and_specials(v3: GGUFFile) -> None:
    t = Tokenizer.from_gguf(v3)
    assert t.encode(" the") == [261]  # 'Ġ t' then 'Ġt he'
    assert t.encode("the") == [ord("t"), 257]  # 'h e'; no 'Ġ'
    assert t.encode("in on re") == [258, 32, 260, 32, 259]
    assert (t.bos_id, t.eos_id, t.add_bos, t.n_vocab) == (286, 287, True, 288)
    assert t.eog_ids == {287}
    assert t.encode("x<｜end▁of▁sentence｜>", add_bos=True) == [286, ord("x"), 287]
    assert t.token_bytes(287) == b"" and t.token_bytes(287, special=True) == "<｜end▁of▁sentence｜>".encode()


def test_merges_of_unknown_tokens_are_ignored_as_in_llama_cpp(tmp_path: Path) -> None:
    # the HF BPE refuses such merges outright; llama.cpp loads the file and never applies them
    tokens = [*gpt2_byte_chars(), "Ġt"]
    t = Tokenizer.from_gguf(write_vocab(tmp_path / "m.gguf", tokens, ["Ġ t", "q zz", "Ġt x"]))
    assert t.encode(" tq") == [256, ord("q")] and t.encode(" tx") == [256, ord("x")]


# ---- errors ---------------------------------------------------------------------------------------------
def test_unsupported_tokenizer_model_is_a_model_file_error(tmp_path: Path) -> None:
    f = write_vocab(tmp_path / "spm.gguf", ["<unk>", "<s>", "</s>", "▁a"], [], model="llama")
    with pytest.raises(ModelFileError, match="tokenizer model 'llama' is not supported") as e:
        Tokenizer.from_gguf(f)
    assert "\n" not in str(e.value)


def test_unknown_pre_tokenizer_is_a_model_file_error(v3: GGUFFile) -> None:
    with pytest.raises(ModelFileError, match="pre-tokenizer 'no-such-pre'"):
        Tokenizer.from_gguf(with_meta(v3, **{"tokenizer.ggml.pre": "no-such-pre"}))


def test_duplicate_tokens_are_a_model_file_error(tmp_path: Path) -> None:
    f = write_vocab(tmp_path / "dup.gguf", [*gpt2_byte_chars(), "a"], ["a a"])
    with pytest.raises(ModelFileError, match="duplicate"):
        Tokenizer.from_gguf(f)


# ---- chat template ------------------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


def test_smollm2_template_renders_chatml(smollm2: GGUFFile, tok: Tokenizer) -> None:
    system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
              "<|im_end|>\n")
    turns = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert apply_chat_template(smollm2, tok, CHAT, add_generation_prompt=False) == system + turns
    prompt = apply_chat_template(smollm2, tok, CHAT, add_generation_prompt=True)
    assert prompt == system + turns + "<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_id("<|im_start|>") and ids.count(tok.token_id("<|im_end|>")) == 3


def test_system_message_replaces_the_default(smollm2: GGUFFile, tok: Tokenizer) -> None:
    chat = [{"role": "system", "content": "Be brief."}, *CHAT[:1]]
    assert apply_chat_template(smollm2, tok, chat, True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _template_file(tmp_path: Path, template: str | None, pre: str = "default", arch: str = "llama",
                   add_bos: bool = True, extra: tuple[str, ...] = ()) -> tuple[GGUFFile, Tokenizer]:
    tokens = [*gpt2_byte_chars(), "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", *extra]
    meta: dict[str, Any] = {"ggml.bos_token_id": 256, "ggml.eos_token_id": 257, "ggml.add_bos_token": add_bos}
    if template is not None:
        meta["chat_template"] = template
    f = write_vocab(tmp_path / "t.gguf", tokens, ["Ġ t"], [1] * 256 + [3] * (2 + len(extra)), arch=arch, pre=pre,
                    **meta)
    return f, Tokenizer.from_gguf(f)


def test_template_bos_is_dropped_when_the_tokenizer_adds_it(tmp_path: Path) -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    f, t = _template_file(tmp_path, template, add_bos=True)
    assert apply_chat_template(f, t, CHAT, True) == "[user]What is 2+2?[assistant]4"
    f, t = _template_file(tmp_path, template, add_bos=False)
    assert apply_chat_template(f, t, CHAT, True) == "<｜begin▁of▁sentence｜>[user]What is 2+2?[assistant]4"


def test_template_helpers_as_in_transformers(tmp_path: Path) -> None:
    template = ("{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{% for m in messages %}"
                "{% generation %}{{ m.content }}{% endgeneration %}"
                "{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}|{{ eos_token }}")
    f, t = _template_file(tmp_path, template)
    chat = [{"role": "user", "content": "café"}, {"role": "assistant", "content": "no"}]
    year = str(datetime.now().year)
    assert apply_chat_template(f, t, chat, False) == (
        f'{year}|{{"role": "user", "content": "café"}}|café|<｜end▁of▁sentence｜>'
    )


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", "does not parse"),
    ("{{ raise_exception('only user and assistant roles are supported') }}", "only user and assistant roles"),
    ("{{ messages[0].content + 1 }}", "failed"),
])
def test_template_errors_are_one_line(tmp_path: Path, template: str, message: str) -> None:
    f, t = _template_file(tmp_path, template)
    with pytest.raises(IkctlError, match=message) as e:
        apply_chat_template(f, t, CHAT, True)
    assert "\n" not in str(e.value)


def test_bad_messages_are_refused(smollm2: GGUFFile, tok: Tokenizer) -> None:
    with pytest.raises(IkctlError, match="non-empty list"):
        apply_chat_template(smollm2, tok, [], True)
    with pytest.raises(IkctlError, match="role"):
        apply_chat_template(smollm2, tok, [{"content": "hi"}], True)


DS2_CHAT = "Be brief.\n\nUser: What is 2+2?\n\nAssistant: 4<｜end▁of▁sentence｜>Assistant:"
DS3_CHAT = "Be brief.\n\n<｜User｜>What is 2+2?<｜Assistant｜>4<｜end▁of▁sentence｜><｜Assistant｜>"
CHATML_CHAT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("pre, arch, extra, expected", [
    ("deepseek-llm", "deepseek2", (), DS2_CHAT),
    ("deepseek-v3", "deepseek2", (), DS3_CHAT),
    ("default", "deepseek2", ("<｜User｜>", "<｜Assistant｜>"), DS3_CHAT),
    ("default", "llama", (), CHATML_CHAT),
])
def test_fallbacks_without_a_template(tmp_path: Path, pre: str, arch: str, extra: tuple[str, ...],
                                      expected: str) -> None:
    f, t = _template_file(tmp_path, None, pre=pre, arch=arch, extra=extra)
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert apply_chat_template(f, t, chat, True) == expected


def test_open_v3_has_no_template_and_falls_back_to_deepseek_v2(v3: GGUFFile) -> None:
    t = Tokenizer.from_gguf(v3)
    assert apply_chat_template(v3, t, CHAT[:1], True) == "User: What is 2+2?\n\nAssistant:"


def test_model_api_uses_the_tokenizer() -> None:
    from engine import load_model

    model = load_model(REFS / "open-v3.gguf")
    assert model.tokenize(" the", add_bos=model.tokenizer.add_bos) == [286, 261]
    assert model.detokenize([286, 261]) == "<｜begin▁of▁sentence｜> the"
    assert model.apply_chat_template(CHAT[:1]) == "User: What is 2+2?\n\nAssistant:"

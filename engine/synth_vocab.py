"""Tokenizer of the generated models: GPT-2 byte tokens, BPE merges learned from a small English sample, BOS/EOS."""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from typing import NamedTuple

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"

# The reference generator's first 30 merges; later merges are learned from _SAMPLE_TEXT after these.
_FIXED_MERGES = (
    "Ġ t", "h e", "i n", "r e", "o n", "Ġt he", "e r", "a n", "Ġ a", "o r", "e n", "Ġ s", "e s", "a t", "Ġ w",
    "i s", "Ġ c", "o u", "n d", "i t", "Ġ o", "e d", "Ġ b", "in g", "Ġ f", "Ġ m", "a l", "Ġ p", "a r", "l l",
)
_SAMPLE_TEXT = """\
The river runs past the old mill and under the stone bridge before it reaches the town. In the spring the
water is high and fast, and the children who live near the bank are told to stay away from the edge. In the
summer it is slow and warm, and the same children spend their afternoons there, building small dams out of
mud and pebbles and watching the fish that hide in the shadows of the reeds.
Most of the people in the town work in the shops along the main street, at the school, or on the farms that
spread out across the valley. They know each other by name. When a new family arrives, someone always brings
bread, someone else brings a pot of soup, and within a week the newcomers are invited to the market on
Saturday morning, where everything from apples to old books is sold from wooden tables under striped
awnings.
A computer is a machine that follows instructions. The instructions are written as a program, and the
program is stored in memory together with the data it works on. The processor reads one instruction at a
time, does what it says, and moves on to the next. Modern processors are so fast that they can carry out
billions of these steps every second, which is why a program that looks simple on the screen can still do a
great deal of work behind it.
Language models are programs that predict the next word in a piece of text. They are trained on large
amounts of writing, and during training they learn which words tend to follow which others. A model does not
read letters one by one; it reads tokens, which are pieces of words. Common words such as the, and, of, and
to are single tokens, while rare words are split into several smaller parts. The list of tokens is called
the vocabulary, and the rules that join letters into tokens are called merges.
When you ask a question, the model reads your words, turns them into tokens, and then writes an answer one
token at a time. Each new token depends on all the tokens that came before it, so the answer grows like a
sentence written by a careful person who thinks about every word. It is important to remember that the model
can make mistakes, and that its answers should be checked, especially when they matter.
The weather this week has been cold and clear. On Monday there was frost on the windows, and by Wednesday
the first snow had fallen on the hills to the north. The forecast says that the weekend will be warmer, with
light rain on Sunday afternoon. Farmers are happy about the rain, because the fields have been dry since the
end of the summer, and the wells in the higher villages are lower than they have been for many years.
Good morning! How are you today? I am fine, thank you. Would you like a cup of tea or coffee? Yes, please, a
cup of tea with milk would be lovely. What are you working on this morning? I am writing a short report
about the results of our test, and then I have a meeting with the team at ten o'clock. Let me know if you
need help.
Numbers and dates appear in many texts: 1, 2, 3, 10, 100, 2024, 3.14, and 42 are all common. So are lists of
things to do: first, read the instructions; second, prepare the tools; third, start the work; and finally,
check the result and write down what you have learned for the next time.
"""
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


@functools.cache
def byte_tokens() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (token id = byte value)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return tuple(chr(b) if b in keep else chr(next(extra)) for b in range(256))


def _merge_word(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@functools.cache
def bpe_merges() -> tuple[str, ...]:
    """The fixed merges, then BPE on the sample text until each word is one token (ties: least pair)."""
    chars = byte_tokens()
    words = Counter(tuple(chars[b] for b in w.encode()) for w in _PRETOKEN.findall(_SAMPLE_TEXT))
    merges = list(_FIXED_MERGES)
    known = {*chars, *(m.replace(" ", "") for m in merges)}
    for m in merges:
        a, b = m.split(" ")
        words = Counter({_merge_word(w, a, b): n for w, n in words.items()})
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for pair in itertools.pairwise(w):
                pairs[pair] += n
        # a pair whose join is already a token would add no token; skip it so ids stay one per merge
        ranked = sorted((-n, pair) for pair, n in pairs.items() if pair[0] + pair[1] not in known)
        if not ranked:
            return tuple(merges)
        a, b = ranked[0][1]
        merges.append(f"{a} {b}")
        known.add(a + b)
        words = Counter({_merge_word(w, a, b): n for w, n in words.items()})


class Vocab(NamedTuple):
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int
    eos: int


def make_vocab(size: int) -> Vocab:
    """Bytes, merges, BOS, EOS, then unused `[PAD{id}]` tokens up to `size`, as llama.cpp's converter pads."""
    merges = list(bpe_merges()[: size - 258])
    tokens = [*byte_tokens(), *(m.replace(" ", "") for m in merges), BOS_TEXT, EOS_TEXT]
    types = [1] * (len(tokens) - 2) + [3, 3]  # NORMAL, then CONTROL
    bos = len(tokens) - 2
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types += [5] * (size - len(types))  # UNUSED
    return Vocab(tokens, types, merges, bos, bos + 1)

"""Generation as a few small free functions: prefill, decode_one, and the streaming loop around them."""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import IkctlError
from engine.kv_cache import KVCache
from engine.sampling import Sampler, SamplerParams

if TYPE_CHECKING:
    from engine.model import Model


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str  # the new text this token completes (UTF-8 safe: may be "" mid-character)


@dataclass
class GenerationStats:
    n_prompt: int = 0
    t_prompt: float = 0.0
    n_gen: int = 0  # tokens produced
    n_eval: int = 0  # single-token forward passes (n_gen - 1 unless stopped early)
    t_gen: float = 0.0  # time in sampling and those forward passes
    stop_reason: str = ""  # "eos", "length", "context"

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.t_prompt if self.t_prompt > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.n_eval / self.t_gen if self.t_gen > 0 and self.n_eval else 0.0

    def summary(self) -> str:
        return (
            f"prompt: {self.n_prompt} tokens in {self.t_prompt:.2f} s ({self.prompt_tps:.2f} t/s) | "
            f"generation: {self.n_gen} tokens in {self.t_gen:.2f} s ({self.gen_tps:.2f} t/s)"
        )


def prefill(model: Model, cache: KVCache, ids: Sequence[int]) -> np.ndarray:
    """Run the prompt; logits of its last token [V]."""
    return model.eval(ids, cache)[-1]


def decode_one(model: Model, cache: KVCache, token: int) -> np.ndarray:
    """Run one token; its logits [V]."""
    return model.eval([token], cache)[-1]


@dataclass
class Generation:
    """An iterable of GeneratedToken; `stats` is complete once iteration ends."""

    model: Model
    prompt_ids: list[int]
    n_predict: int
    sampler: Sampler
    stop_at_eos: bool = True
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[GeneratedToken]:
        model, tok = self.model, self.model.tokenizer
        if not self.prompt_ids:
            raise IkctlError("the prompt is empty; give a prompt (-p) or token ids")
        cache = model.new_cache()
        if len(self.prompt_ids) >= cache.n_ctx:
            raise IkctlError(
                f"the prompt has {len(self.prompt_ids)} tokens but the context holds {cache.n_ctx}; raise -c"
            )
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        t0 = time.perf_counter()
        logits = prefill(model, cache, self.prompt_ids)
        self.stats.n_prompt, self.stats.t_prompt = len(self.prompt_ids), time.perf_counter() - t0
        limit = self.n_predict if self.n_predict >= 0 else cache.n_ctx
        while limit > 0:  # only sampling and decoding count as generation time, not the consumer's
            t0 = time.perf_counter()
            token = self.sampler(logits)
            self.stats.t_gen += time.perf_counter() - t0
            if self.stop_at_eos and token in tok.eog_ids:
                self.stats.stop_reason = "eos"
                break
            self.stats.n_gen += 1
            yield GeneratedToken(token, utf8.decode(tok.token_bytes(token)))
            if self.stats.n_gen >= limit:
                self.stats.stop_reason = "length"
                break
            if cache.n_past >= cache.n_ctx:
                self.stats.stop_reason = "context"
                break
            t0 = time.perf_counter()
            logits = decode_one(model, cache, token)
            self.stats.t_gen += time.perf_counter() - t0
            self.stats.n_eval += 1
        tail = utf8.decode(b"", final=True)
        if tail:
            yield GeneratedToken(-1, tail)


def generate(
    model: Model,
    prompt: str | Sequence[int],
    n_predict: int = 128,
    temp: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    seed: int = -1,
    stop_at_eos: bool = True,
) -> Generation:
    """Generate up to n_predict tokens (-1: until EOS or the context is full) after a prompt (text or ids).

    A text prompt is tokenized with special tokens parsed and BOS added if the model asks for it.
    """
    if n_predict < -1:
        raise IkctlError(f"-n {n_predict} is not a token count; give 0 or more, or -1 for until the end of "
                         "generation or a full context")
    if isinstance(prompt, str):
        ids = model.tokenize(prompt, special=True, add_bos=model.tokenizer.add_bos)
    else:
        ids = [int(t) for t in prompt]
    params = SamplerParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    return Generation(model, ids, n_predict, Sampler(params), stop_at_eos)

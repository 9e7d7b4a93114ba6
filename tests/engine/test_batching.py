"""The continuous-batching scheduler on a real (small, generated) model: batching changes nothing but speed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import load_model
from engine.batching import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    Scheduler,
    TextDelta,
)
from engine.model import Model
from engine.sampling import SamplerParams
from engine.synth import DEFAULT_SPEC, write_model

GREEDY = SamplerParams(temp=0.0)
PROMPTS = [tuple(range(5, 5 + n)) for n in (3, 11, 6, 17)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    path = write_model(tmp_path_factory.mktemp("batching") / "tiny.gguf", DEFAULT_SPEC)
    return load_model(path, ctx_size=128, threads=1, ubatch_size=8)


class Collector:
    """One request's events, and when it ended."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def end(self) -> Event:
        assert self.done.wait(60), "the request did not end"
        return self.events[-1]


@pytest.fixture
def running(model: Model) -> Iterator[list[Scheduler]]:
    made: list[Scheduler] = []
    yield made
    for s in made:
        s.stop()


def start(model: Model, made: list[Scheduler], slots: int, queue: int = 8) -> Scheduler:
    s = Scheduler(model, slots, queue)
    s.start()
    made.append(s)
    return s


def run_all(s: Scheduler, requests: list[GenerationRequest]) -> list[Collector]:
    out = [Collector() for _ in requests]
    for r, c in zip(requests, out, strict=True):
        s.submit(r, c)
    for c in out:
        assert isinstance(c.end, Finished)
    return out


@pytest.mark.parametrize("slots", [2, 4])
def test_concurrent_requests_give_the_text_each_gives_alone(model: Model, running: list[Scheduler],
                                                            slots: int) -> None:
    requests = [GenerationRequest(p, max_tokens=10, sampler=GREEDY) for p in PROMPTS]
    alone = start(model, running, 1)
    one_by_one = [run_all(alone, [r])[0] for r in requests]
    together = run_all(start(model, running, slots), requests)
    assert [c.text for c in together] == [c.text for c in one_by_one]
    assert all(isinstance(c.end, Finished) and c.end.completion_tokens == 10 for c in together)
    assert len({c.text for c in together}) > 1  # different prompts, different texts: the comparison means something


def test_seeded_sampling_is_reproducible_in_a_batch(model: Model, running: list[Scheduler]) -> None:
    s = start(model, running, 3)
    seeded = [GenerationRequest(PROMPTS[1], 12, SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=k))
              for k in (1, 1, 2)]
    a, b, c = run_all(s, seeded)
    assert a.text == b.text != c.text


def test_a_new_prompt_delays_the_running_ones_by_one_micro_batch_per_step(model: Model) -> None:
    s = Scheduler(model, 2, 4)  # stepped by hand: no thread
    first, second = Collector(), Collector()
    s.submit(GenerationRequest(PROMPTS[0], max_tokens=30, sampler=GREEDY), first)
    s.step()  # its 3-token prompt, and its first token
    assert s.stats().generated_tokens == 1
    long_prompt = tuple(range(3, 43))  # 40 tokens: 5 micro-batches of -ub 8
    s.submit(GenerationRequest(long_prompt, max_tokens=2, sampler=GREEDY), second)
    for k in range(5):
        s.step()
        assert s.stats().prompt_tokens == 3 + 8 * (k + 1)
        # the running request got its token in every step; the new one its first with its last micro-batch
        assert s.stats().generated_tokens == 2 + k + (k == 4), "the running request got no token in this step"
    assert s.stats().active == 2


def test_queue_bound_then_queue_full(model: Model) -> None:
    s = Scheduler(model, 1, 1)  # not started: nothing leaves the queue
    s.submit(GenerationRequest(PROMPTS[0], 4, GREEDY), Collector())  # takes the free slot
    s.submit(GenerationRequest(PROMPTS[0], 4, GREEDY), Collector())  # waits
    with pytest.raises(QueueFull, match="all 1 slots are busy"):
        s.submit(GenerationRequest(PROMPTS[0], 4, GREEDY), Collector())
    assert s.stats().requests_rejected == 1 and s.stats().queued == 2


def test_cancel_frees_the_slot_at_once(model: Model, running: list[Scheduler]) -> None:
    s = start(model, running, 1)
    long, after = Collector(), Collector()
    ticket = s.submit(GenerationRequest(PROMPTS[1], max_tokens=100, sampler=GREEDY), long)
    s.submit(GenerationRequest(PROMPTS[2], max_tokens=3, sampler=GREEDY), after)
    while not long.events:
        threading.Event().wait(0.01)
    s.cancel(ticket)
    assert isinstance(after.end, Finished)
    assert not long.done.is_set()  # a cancelled request hears nothing more
    assert sum(isinstance(e, TextDelta) for e in long.events) < 100
    stats = s.stats()
    assert stats.requests_cancelled == 1 and stats.active == 0


def test_stop_string_across_tokens(model: Model, running: list[Scheduler]) -> None:
    s = start(model, running, 2)
    free = run_all(s, [GenerationRequest(PROMPTS[3], 16, GREEDY)])[0]
    pieces = [e.text for e in free.events if isinstance(e, TextDelta)]
    i = next(i for i in range(2, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # straddles two tokens
    assert len(stop) >= 2
    stopped = run_all(s, [GenerationRequest(PROMPTS[3], 16, GREEDY, stop=(stop,))])[0]
    assert stopped.text == free.text[: free.text.index(stop)]
    end = stopped.end
    assert isinstance(end, Finished) and end.reason == "stop"


def test_max_tokens_zero_reads_the_prompt_and_generates_nothing(model: Model, running: list[Scheduler]) -> None:
    c = run_all(start(model, running, 1), [GenerationRequest(PROMPTS[1], max_tokens=0, sampler=GREEDY)])[0]
    end = c.end
    assert isinstance(end, Finished) and (end.prompt_tokens, end.completion_tokens, c.text) == (11, 0, "")


def test_prompts_that_cannot_run_are_refused(model: Model) -> None:
    s = Scheduler(model, 1, 1)
    with pytest.raises(PromptTooLong, match="context holds 128"):
        s.submit(GenerationRequest(tuple([5] * 128)), Collector())
    with pytest.raises(Exception, match="outside the vocabulary"):
        s.submit(GenerationRequest((10**6,)), Collector())


def test_ignore_eos_generates_past_the_end(smollm2_path: Path, running: list[Scheduler]) -> None:
    """llama-server's ignore_eos: a real chat model that ends its answer early goes on to max_tokens."""
    smol = load_model(smollm2_path, ctx_size=256, threads=1)
    prompt = smol.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    ids = tuple(smol.tokenize(prompt, special=True, add_bos=smol.tokenizer.add_bos))
    s = start(smol, running, slots=1)
    ended, forced = run_all(s, [GenerationRequest(ids, 48, GREEDY), GenerationRequest(ids, 48, GREEDY,
                                                                                      ignore_eos=True)])
    short, full = ended.end, forced.end
    assert isinstance(short, Finished) and isinstance(full, Finished)
    assert short.reason == "stop" and short.completion_tokens < 48
    assert full.reason == "length" and full.completion_tokens == 48
    assert forced.text.startswith(ended.text)

"""Continuous batching: N sequence slots, each with its own KV cache, advanced together by one thread.

One step is one `Model.eval_batch` call over every active slot: each decoding slot adds its last sampled token,
and at most one slot still reading its prompt adds its next micro-batch (`-ub` tokens), so a new prompt delays
the others by at most one micro-batch per step. Requests beyond the free slots wait in a bounded queue.
Events go back through each request's `emit` callback, on the scheduler's thread."""

from __future__ import annotations

import codecs
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import IkctlError
from engine.kv_cache import KVCache
from engine.sampling import Sampler, SamplerParams
from engine.stop_strings import StopMatcher
from rpcnode.client import RPCError

if TYPE_CHECKING:
    from engine.model import Model

log = logging.getLogger("ikctl.batching")


class QueueFull(IkctlError):
    """Every slot is busy and the queue holds its maximum."""


class PromptTooLong(IkctlError):
    """The prompt does not fit the context with room for one generated token."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = -1  # -1: until end of generation or a full context
    sampler: SamplerParams = field(default_factory=SamplerParams)
    stop: tuple[str, ...] = ()
    special: bool = False  # render control tokens in the text (tool-call markers are control tokens in some files)
    ignore_eos: bool = False  # llama-server's: an end-of-generation token is sampled past (benchmarks)


@dataclass(frozen=True)
class Timings:
    """llama-server's `timings`: prompt reading and generation, per request."""

    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float

    def as_dict(self) -> dict[str, float]:
        def per(n: int, ms: float) -> tuple[float, float]:
            return (ms / n if n else 0.0), (1e3 * n / ms if ms > 0 else 0.0)

        p_tok, p_s = per(self.prompt_n, self.prompt_ms)
        g_tok, g_s = per(self.predicted_n, self.predicted_ms)
        return {"prompt_n": self.prompt_n, "prompt_ms": self.prompt_ms, "prompt_per_token_ms": p_tok,
                "prompt_per_second": p_s, "predicted_n": self.predicted_n, "predicted_ms": self.predicted_ms,
                "predicted_per_token_ms": g_tok, "predicted_per_second": g_s}


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of generation or a stop string) | "length" (max_tokens or a full context)
    prompt_tokens: int
    completion_tokens: int
    timings: Timings


@dataclass(frozen=True)
class Failed:
    message: str
    worker: bool  # a worker failed (the server is degraded), else an internal error


Event = TextDelta | Finished | Failed


@dataclass(frozen=True)
class SchedulerStats:
    """Counters since start and levels now, for /metrics and the app."""

    slots: int
    active: int
    queued: int
    requests_ok: int
    requests_failed: int
    requests_cancelled: int
    requests_rejected: int
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float  # time of the steps that read prompt tokens
    decode_seconds: float  # time of the steps that generated tokens
    problem: str | None  # the last worker failure, until a step succeeds again


class Ticket:
    """A submitted request: `cancel()` frees its slot at the next step (a client that went away)."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Event], None]) -> None:
        self.request, self.emit = request, emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Job:
    ticket: Ticket
    sampler: Sampler
    matcher: StopMatcher
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    pos: int = 0  # prompt tokens in the cache
    n_gen: int = 0
    last: int = -1  # the token to feed next
    t_start: float = 0.0
    t_prompt: float = 0.0  # when the prompt was read

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.ticket.request.prompt_ids


@dataclass
class _Slot:
    cache: KVCache | None = None
    job: _Job | None = None


class Scheduler:
    """Owns the model from the thread `start()` runs: nothing else may call it meanwhile."""

    def __init__(self, model: Model, n_slots: int, max_queue: int, say: Callable[[str], None] = log.warning) -> None:
        if n_slots < 1:
            raise IkctlError(f"-np {n_slots} must be at least 1 (sequence slots)")
        if max_queue < 0:
            raise IkctlError(f"--max-queue {max_queue} must be 0 or more")
        self.model, self.max_queue, self.say = model, max_queue, say
        self.n_ctx = model.n_ctx
        self._slots = [_Slot() for _ in range(n_slots)]
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._eog = model.tokenizer.eog_ids
        self._counts = collections.Counter[str]()
        self._seconds = {"prompt": 0.0, "decode": 0.0}
        self.problem: str | None = None

    # ---- the public side (any thread) ------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Refuse what can never run: an empty prompt, or one that leaves no room in the context."""
        n = len(request.prompt_ids)
        if n == 0:
            raise IkctlError("the prompt is empty")
        if n >= self.n_ctx:
            raise PromptTooLong(f"the prompt has {n} tokens but the context holds {self.n_ctx} (with at least one "
                                "generated); shorten it, or start the server with a larger -c")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.model.n_vocab]
        if bad:
            raise IkctlError(f"token id {bad[0]} is outside the vocabulary (0..{self.model.n_vocab - 1})")
        request.sampler.validated()

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None]) -> Ticket:
        self.check(request)
        ticket = Ticket(request, emit)
        with self._cond:
            free = sum(s.job is None for s in self._slots)
            if len(self._queue) >= self.max_queue + free:
                self._counts["rejected"] += 1
                raise QueueFull(f"all {len(self._slots)} slots are busy and {len(self._queue)} requests wait; "
                                "retry later (or start the server with a larger -np / --max-queue)")
            self._queue.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancel()
        with self._cond:
            self._cond.notify()

    def stats(self) -> SchedulerStats:
        with self._cond:
            c = self._counts
            return SchedulerStats(len(self._slots), sum(s.job is not None for s in self._slots), len(self._queue),
                                  c["ok"], c["failed"], c["cancelled"], c["rejected"], c["prompt_tokens"],
                                  c["generated_tokens"], self._seconds["prompt"], self._seconds["decode"],
                                  self.problem)

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="ikctl-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the scheduler thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._queue and not any(s.job for s in self._slots):
                    self._cond.wait()
                if not self._running:
                    return
            try:
                self.step()
            except Exception:  # a bug must not end the server: the requests of this step have been failed
                log.exception("scheduler step failed")

    def step(self) -> None:
        """Admit queued requests, drop cancelled ones, run one batch, and advance every slot in it."""
        self._admit()
        batch = self._batch()
        if not batch:
            return
        items = [(ids, slot.cache) for slot, ids in batch]
        t0 = time.perf_counter()
        try:
            logits = self.model.eval_batch(items)  # type: ignore[arg-type]
        except IkctlError as e:
            self._fail([slot for slot, _ in batch], str(e), worker=isinstance(e, RPCError))
            return
        except Exception as e:
            self._fail([slot for slot, _ in batch], f"internal error: {type(e).__name__}: {e}", worker=False)
            raise
        dt = time.perf_counter() - t0
        self.problem = None
        prefill = any(slot.job is not None and slot.job.pos < len(slot.job.prompt) for slot, _ in batch)
        decode = any(slot.job is not None and slot.job.pos >= len(slot.job.prompt) for slot, _ in batch)
        with self._cond:
            self._seconds["prompt"] += dt * prefill
            self._seconds["decode"] += dt * decode
        now = time.perf_counter()
        for (slot, ids), out in zip(batch, logits, strict=True):
            job = slot.job
            assert job is not None
            if job.pos < len(job.prompt):
                job.pos += len(ids)
                self._count("prompt_tokens", len(ids))
                if job.pos < len(job.prompt):
                    continue
                job.t_prompt = now
            self._advance(slot, out)

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._counts[key] += n

    def _admit(self) -> None:
        for slot in self._slots:
            if slot.job is not None and slot.job.ticket.cancelled:
                self._count("cancelled")
                self._free(slot)
        with self._cond:
            waiting = [t for t in self._queue if not t.cancelled]
            self._counts["cancelled"] += len(self._queue) - len(waiting)
            self._queue = collections.deque(waiting)
            admit = []
            for slot in self._slots:
                if slot.job is None and self._queue:
                    admit.append((slot, self._queue.popleft()))
        if admit:  # a new request takes back a lost worker that answers again
            try:
                back = self.model.rejoin()
            except IkctlError as e:
                self.say(str(e))
            else:
                if back is not None:
                    self.say(back.line())
        for slot, ticket in admit:
            r = ticket.request
            job = _Job(ticket, Sampler(r.sampler), StopMatcher(r.stop), t_start=time.perf_counter())
            if slot.cache is None:
                try:
                    slot.cache = self.model.new_cache()
                except IkctlError as e:
                    slot.job = job
                    self._fail([slot], str(e), worker=isinstance(e, RPCError))
                    continue
            slot.job = job

    def _batch(self) -> list[tuple[_Slot, Sequence[int]]]:
        """Every decoding slot's next token and one prompt micro-batch (the earliest admitted prompt first)."""
        ub = self.model.options.ubatch_size
        batch: list[tuple[_Slot, Sequence[int]]] = []
        prefill = False
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if job.pos < len(job.prompt):
                if prefill:
                    continue
                prefill = True
                batch.append((slot, job.prompt[job.pos : job.pos + ub]))
            else:
                batch.append((slot, [job.last]))
        return batch

    def _advance(self, slot: _Slot, logits: np.ndarray) -> None:
        job, cache = slot.job, slot.cache
        assert job is not None and cache is not None
        r = job.ticket.request
        if r.max_tokens == 0:  # the prompt was read (its usage counts), nothing is generated
            self._finish(slot, "length")
            return
        token = job.sampler(logits)
        if token in self._eog and not r.ignore_eos:
            self._finish(slot, "stop")
            return
        job.n_gen += 1
        self._count("generated_tokens")
        text = job.utf8.decode(self.model.tokenizer.token_bytes(token, special=r.special))
        out = job.matcher.feed(text)
        if out:
            self._emit(job, TextDelta(out))
        if job.matcher.stopped:
            self._finish(slot, "stop")
        elif job.n_gen >= r.max_tokens >= 0 or cache.n_past >= cache.n_ctx:
            self._finish(slot, "length")
        else:
            job.last = token

    def _finish(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        tail = job.matcher.feed(job.utf8.decode(b"", final=True)) + job.matcher.flush()
        if tail:
            self._emit(job, TextDelta(tail))
        now = time.perf_counter()
        t_prompt = job.t_prompt or now
        timings = Timings(len(job.prompt), 1e3 * (t_prompt - job.t_start), job.n_gen, 1e3 * (now - t_prompt))
        self._emit(job, Finished(reason, len(job.prompt), job.n_gen, timings))
        self._count("ok")
        self._free(slot)

    def _fail(self, slots: Sequence[_Slot], message: str, worker: bool) -> None:
        """End these slots' requests with the error; their caches are in an unknown state, so they are dropped."""
        if worker:
            self.problem = message
        for slot in slots:
            if slot.job is not None:
                self._emit(slot.job, Failed(message, worker))
                self._count("failed")
            slot.job, slot.cache = None, None

    def _free(self, slot: _Slot) -> None:
        slot.job = None
        if slot.cache is None:
            return
        try:
            slot.cache.clear()
        except IkctlError as e:  # a worker gone: the next request gets a fresh cache (and the worker's error)
            self.problem = str(e) if isinstance(e, RPCError) else self.problem
            slot.cache = None

    @staticmethod
    def _emit(job: _Job, event: Event) -> None:
        if not job.ticket.cancelled:
            job.ticket.emit(event)

"""`load_model(path, **options) -> Model`: the engine's public entry point, used by the CLI and by tests."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.architectures import load_network
from engine.auto_placement import AutoChoice
from engine.batch import micro_batches
from engine.chat_template import apply_chat_template
from engine.distributed import DistributedNet, Failover, Rejoined, distribute
from engine.errors import IkctlError
from engine.generate import generate
from engine.gguf_file import GGUFFile
from engine.kernels import activations
from engine.kv_cache import CACHE_TYPES, KVCache
from engine.threads import compute_threads
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class Options:
    """Run options, named after the long CLI flags (`--ctx-size` -> ctx_size)."""

    ctx_size: int = 4096  # -c; 0 = the model's training context
    cache_type_k: str = "f16"  # -ctk: f16 | f32 | q8_0
    mla: int = 3  # -mla: 0 naive (decompressed K/V cache), 1/2 absorbed, 3 naive prefill + absorbed decode
    amb: int = 256  # -amb: MiB cap on the attention score scratch
    threads: int | None = None  # -t: compute threads (None = all cores)
    ubatch_size: int = 512  # -ub: tokens per forward pass in prefill
    rpc: str | Sequence[str] = ()  # --rpc: worker endpoints host:port
    override_tensor: str | Sequence[str] = ()  # -ot: REGEX=DEV rules, the first match wins
    n_gpu_layers: int = 0  # -ngl: the last N layers go to the RPC/GPU devices
    tensor_split: str | Sequence[float] | None = None  # -ts: proportions per RPC/GPU device
    device_mem: str | Sequence[str] = ()  # --device-mem DEV=SIZE: plan against this capacity instead
    cluster: str | None = None  # --cluster FILE (from `ikctl launch`): endpoints, their tokens and memory
    rpc_token: str | Mapping[str, str] | None = None  # the workers' token, or one per endpoint (else $IKCTL_RPC_TOKEN)
    rpc_poll: float = 10.0  # --rpc-poll MS: spin this long for a remote worker's reply before sleeping (0: never)
    rpc_timeout: float = 10.0  # --rpc-timeout S: wait at least this long for a worker's reply before probing it
    rpc_probe_timeout: float = 20.0  # --rpc-probe-timeout S: a worker that does not answer a probe by then is frozen
    float_activations: bool = False  # --float-activations: no int8 activation quantization (exact, slower)
    pipeline: bool = True  # --no-pipeline: a prompt's micro-batches visit the devices one after another
    failover: bool = True  # --no-failover: a worker lost mid-generation ends it with an error (no re-plan)
    auto: bool = False  # --auto: choose the placement predicted fastest from measured devices and links
    recalibrate: bool = False  # --recalibrate: with --auto, measure the devices' speeds again (else cached)

    @property
    def placed(self) -> bool:
        """Whether any placement flag is set (else everything runs here, as always)."""
        return bool(self.rpc or self.override_tensor or self.n_gpu_layers or self.tensor_split or self.cluster
                    or self.auto)

    def validated(self) -> Options:
        if self.cache_type_k not in CACHE_TYPES:
            raise IkctlError(f"-ctk {self.cache_type_k!r} is not supported; use one of {', '.join(CACHE_TYPES)}")
        if self.ctx_size < 0:
            raise IkctlError(f"-c {self.ctx_size} must be >= 0")
        if self.ubatch_size <= 0:
            raise IkctlError(f"-ub {self.ubatch_size} must be positive")
        if self.amb <= 0:
            raise IkctlError(f"-amb {self.amb} must be a positive number of MiB")
        if self.threads is not None and self.threads <= 0:
            raise IkctlError(f"-t {self.threads} must be positive")
        if not 0 <= self.rpc_poll <= 1000:
            raise IkctlError(f"--rpc-poll {self.rpc_poll:g} must be 0..1000 milliseconds")
        if self.auto and (self.override_tensor or self.n_gpu_layers or self.tensor_split):
            raise IkctlError("--auto chooses -ot, -ngl and -ts itself; give it only the workers (--rpc or --cluster), "
                             "or drop --auto to place by hand")
        if self.recalibrate and not self.auto:
            raise IkctlError("--recalibrate measures the devices for --auto; add --auto")
        for flag, value in (("--rpc-timeout", self.rpc_timeout), ("--rpc-probe-timeout", self.rpc_probe_timeout)):
            if not 0 < value <= 3600:
                raise IkctlError(f"{flag} {value:g} must be more than 0 and at most 3600 seconds")
        return self


RUN_OPTIONS = ("ctx_size", "ubatch_size", "threads", "pipeline")  # options a loaded model can change (with_options)


class Network(Protocol):
    """What an architecture module provides (engine/deepseek2.py, engine/llama.py)."""

    cfg: Any

    def new_cache(self, n_ctx: int, cache_type: str) -> KVCache: ...

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray: ...

    def forward_batch(self, items: Sequence[tuple[np.ndarray, KVCache]]) -> np.ndarray: ...


class Model:
    """A loaded model: weights stay memory-mapped in their GGUF encoding."""

    def __init__(self, path: Path, gguf: GGUFFile, options: Options,
                 progress: Callable[[Any], None] | None = None) -> None:
        self.path = path
        self.gguf = gguf
        self.options = options
        self.net = load_network(gguf, options.mla, options.amb << 20)
        self.auto: AutoChoice | None = None  # with --auto: the placement chosen and every candidate weighed
        if options.placed:
            self.net, self.auto = distribute(self.net, gguf, options, progress)
        self.tokenizer = Tokenizer.from_gguf(gguf)

    def with_options(self, **changes: Any) -> Model:
        """The same loaded weights (and workers) with other run options: ctx_size, ubatch_size, threads, pipeline.

        The workers' KV caches were sized for the context of the load, so a larger one needs a new load."""
        unknown = sorted(set(changes) - set(RUN_OPTIONS))
        if unknown:
            raise IkctlError(f"{', '.join(unknown)} cannot change without loading the model again; "
                             f"with_options takes {', '.join(RUN_OPTIONS)}")
        view = copy.copy(self)
        view.options = replace(self.options, **changes).validated()
        if self.options.placed and view.n_ctx > self.n_ctx:
            raise IkctlError(f"-c {view.n_ctx} is more than the context the workers were loaded with "
                             f"({self.n_ctx}); load the model again with ctx_size={view.n_ctx}")
        return view

    def on_failover(self, report: Callable[[Failover], None]) -> None:
        """Call `report` once per worker lost during a pass, after the pass has run on the devices left (nothing
        happens for a model without workers, or with failover off)."""
        if isinstance(self.net, DistributedNet):
            self.net.on_failover = report

    def rejoin(self) -> Rejoined | None:
        """Take back workers lost earlier that answer again (DistributedNet.rejoin); None when none came back."""
        return self.net.rejoin() if isinstance(self.net, DistributedNet) else None

    def placement_flags(self) -> list[str]:
        """The placement in force as flags (after a failover: without the workers lost)."""
        if isinstance(self.net, DistributedNet):
            return self.net.rules.flags()
        return self.auto.chosen.rules.flags() if self.auto is not None else []

    @property
    def arch(self) -> str:
        return self.gguf.architecture

    @property
    def config(self) -> Any:
        return self.net.cfg

    @property
    def n_vocab(self) -> int:
        return int(self.net.cfg.n_vocab)

    @property
    def n_ctx(self) -> int:
        return self.options.ctx_size or int(self.net.cfg.context_length)

    # ---- inference ------------------------------------------------------------------------------
    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        return self.net.new_cache(n_ctx or self.n_ctx, self.options.cache_type_k)

    def eval(self, token_ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the cache in micro-batches of `ubatch_size`; logits of all or of the last token."""
        ids = self._token_ids(token_ids, "eval needs a non-empty list of token ids")
        ub = self.options.ubatch_size
        chunks = [ids[a : a + ub] for a in range(0, len(ids), ub)]
        int8 = not self.options.float_activations
        with compute_threads(self.options.threads, min(len(ids), ub)), activations(int8):
            if len(chunks) > 1 and isinstance(self.net, DistributedNet):  # pipelined across the devices
                outs = self.net.forward_passes([[(c, cache)] for c in chunks], all_logits, self.options.pipeline)
            else:
                outs = [self.net.forward(c, cache, all_logits=all_logits) for c in chunks]
        return np.concatenate(outs, axis=0) if all_logits else outs[-1]

    def eval_batch(self, items: Sequence[tuple[Sequence[int], KVCache]]) -> list[np.ndarray]:
        """Append each item's tokens to its own cache, all items in the same forward passes: every weight is read
        once per pass for all their rows, and only attention runs per sequence. The logits of each item's last
        token, float32 [n_vocab], in item order.

        Passes hold at most `ubatch_size` rows: the items' tokens are packed in item order, each pass taking from
        each item as many of its next tokens as it has room for (engine.batch.micro_batches), so a prompt longer
        than that goes in chunks. The inputs are checked first: a bad item changes no cache."""
        work = self._batch_items(items)
        pieces = micro_batches([len(ids) for ids, _ in work], self.options.ubatch_size)
        passes = [[(work[k][0][a:b], work[k][1]) for k, a, b in p] for p in pieces]
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(work)
        rows = min(sum(len(ids) for ids, _ in work), self.options.ubatch_size)
        with compute_threads(self.options.threads, rows), activations(not self.options.float_activations):
            if len(passes) > 1 and isinstance(self.net, DistributedNet):  # pipelined across the devices
                results = self.net.forward_passes(passes, pipeline=self.options.pipeline)
            else:
                results = [self.net.forward_batch(p) for p in passes]
        for p, logits in zip(pieces, results, strict=True):
            for row, (k, _, b) in enumerate(p):
                if b == len(work[k][0]):
                    out[k] = np.array(logits[row])  # its own copy: a row of a reply's buffer is read-only
        return out

    def _token_ids(self, token_ids: Sequence[int], empty: str, where: str = "") -> np.ndarray:
        """Token ids as int64, refused (IkctlError) when empty or outside the vocabulary."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise IkctlError(empty)
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise IkctlError(f"{where}token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
        return ids

    def _batch_items(self, items: Sequence[tuple[Sequence[int], KVCache]]) -> list[tuple[np.ndarray, KVCache]]:
        """eval_batch's items checked (non-empty, ids in the vocabulary, caches distinct with room for the tokens)
        as (int64 ids, cache)."""
        if len(items) == 0:
            raise IkctlError("eval_batch needs at least one (token ids, cache) item")
        work, seen = [], {}
        for k, (token_ids, cache) in enumerate(items):
            where = f"eval_batch item {k}: "
            ids = self._token_ids(token_ids, f"{where}needs a non-empty list of token ids", where)
            if id(cache) in seen:
                raise IkctlError(f"eval_batch items {seen[id(cache)]} and {k} share one KV cache; each sequence "
                                 "needs its own (model.new_cache())")
            seen[id(cache)] = k
            if cache.n_past + len(ids) > cache.n_ctx:
                raise IkctlError(f"eval_batch item {k}: context is full: {cache.n_past} cached + {len(ids)} new "
                                 f"tokens exceed the context size {cache.n_ctx}; raise -c/--ctx-size")
            work.append((ids, cache))
        return work

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), n_vocab]: logits at every position of a fresh sequence."""
        cache = self.new_cache(max(self.n_ctx, len(token_ids)))
        return self.eval(token_ids, cache, all_logits=True)

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.gguf.get("tokenizer.chat_template", ""))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        return apply_chat_template(self.gguf, self.tokenizer, messages, add_generation_prompt, tools)

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[Any]:
        """Stream generated tokens; see engine.generate.generate for the keyword arguments."""
        return generate(self, prompt, **kwargs)


def load_model(path: str | os.PathLike[str], progress: Callable[[Any], None] | None = None, **options: Any) -> Model:
    """Open a GGUF model. Options are named after the long CLI flags (threads=, ctx_size=, cache_type_k=, mla=...).
    With workers, `progress(p)` gets an engine.distributed.LoadProgress after each tensor a worker settles."""
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise IkctlError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    opts = replace(Options(), **options).validated()
    p = Path(path)
    return Model(p, GGUFFile(p), opts, progress)

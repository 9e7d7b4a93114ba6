"""The forward pass across rpcnode workers: tensors offered by digest, one segment program and one round trip each."""

from __future__ import annotations

import itertools
import secrets
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from engine.architectures import model_config
from engine.auto_placement import AutoChoice, TensorMeta, choose
from engine.cuda.local import gpu_runners, local_gpus
from engine.digests import hash_bytes, model_digests, tensor_bytes
from engine.errors import IkctlError
from engine.forward_pass import (
    Executor,
    ExpertPart,
    ExpertsSplit,
    Here,
    Item,
    OnGpu,
    OnWorker,
    expert_only,
    run_pass,
)
from engine.gguf_file import TensorInfo
from engine.kv_cache import KVCache, row_bytes
from engine.measure import measure
from engine.pipeline import run_pipeline
from engine.placement import (
    CPU,
    ExpertSlice,
    Placement,
    PlacementError,
    Segment,
    devices_for,
    layer_ops,
    plan,
    tensor_layer,
)
from engine.placement_rules import PlacementRules, device_kind
from engine.placement_spec import PlacementSpec, placement_spec
from engine.rope import table_bytes
from engine.segments import MAX_SEQUENCES, OP_BYTES, PROGRAM_BASE_BYTES, TensorRef, op_tensor_names, segment_records
from engine.speed_model import model_shape
from rpcnode.client import Client, OfferSpec, RPCError, WorkerGone, probe
from rpcnode.endpoint import Endpoint
from rpcnode.protocol import rpc_device

if TYPE_CHECKING:
    from engine.deepseek2 import DeepSeek2
    from engine.gguf_file import GGUFFile
    from engine.llama import Llama
    from engine.model import Options

T = TypeVar("T")


def ask_capacities(endpoints: Sequence[str], spec: PlacementSpec,
                   timeout: float = 10.0) -> tuple[dict[str, int], dict[str, str]]:
    """What each worker reports as its memory, asked as a load asks it (`ikctl plan` plans against the same
    numbers as `ikctl run`): ({device: bytes}, {device: why it could not be asked})."""
    reported, unasked = {}, {}
    for ep in endpoints:
        try:
            with Client.connect(ep, spec.token_for(ep), timeout=timeout) as client:
                reported[rpc_device(ep)] = client.device_info().mem_total_bytes
        except (OSError, RPCError) as e:  # refused, unreachable, a wrong token or protocol
            unasked[rpc_device(ep)] = (str(e).splitlines() or [type(e).__name__])[0]
    return reported, unasked


def kv_bytes_per_layer(cfg: Any, opts: Options) -> int:
    """One layer's KV cache for the whole context in the -ctk type: what a worker holding the layer must reserve."""
    return row_bytes(cfg.cache_widths(opts.mla), opts.cache_type_k) * context_size(cfg, opts)


def program_bytes_per_layer(cfg: Any, opts: Options, tensors: Iterable[TensorInfo]) -> int:
    """An upper bound on what one layer adds to a worker's segment programs (engine.segments.program_host_bytes),
    as if each layer were a segment of its own: the worker charges these to -m, so the plan counts them too."""
    vectors: dict[int | None, int] = {}
    for t in tensors:
        if len(t.shape) == 1:
            layer = tensor_layer(t.name)
            vectors[layer] = vectors.get(layer, 0) + 4 * int(t.shape[0])
    kv = cfg.kept_attn_bytes()
    rope = table_bytes(cfg.rope.n_rot, context_size(cfg, opts))
    return PROGRAM_BASE_BYTES + 3 * OP_BYTES + 8 * int(cfg.n_layers) + max(vectors.values(), default=0) + kv + rope


def context_size(cfg: Any, opts: Options) -> int:
    return opts.ctx_size or int(cfg.context_length)


@dataclass(frozen=True)
class LoadProgress:
    """One worker's load so far (for progress bars): tensors settled, bytes found there (hit) or sent."""

    device: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    bytes_hit: int
    bytes_sent: int


@dataclass
class LoadStats:
    """What loading the remote tensors cost."""

    tensors_offered: int = 0
    tensors_uploaded: int = 0
    bytes_uploaded: int = 0


class RemoteKVCache(KVCache):
    """The coordinator's KV cache: local rows for local attention layers; clear/truncate also reach the workers.
    After a failover it is rebuilt from its tokens when next used (DistributedNet._replay)."""

    def __init__(self, net: DistributedNet, n_ctx: int, cache_type: str) -> None:
        self.net = net
        self._start(n_ctx, cache_type)

    def _start(self, n_ctx: int, cache_type: str) -> None:
        super().__init__(self.net.cfg.n_layers, self.net.local.cache_widths(), n_ctx, cache_type)
        self.layers = [layer if i in self.net.local_attn else {} for i, layer in enumerate(self.layers)]
        self.seq_id, self.epoch = next(self.net.seq_ids), self.net.epoch

    def rehome(self) -> None:
        """Start over, empty, under the network's current placement: local rows for the layers whose attention
        runs here now, a new sequence id on the workers."""
        self._start(self.n_ctx, self.cache_type)

    @property
    def current(self) -> bool:
        """Whether its rows are where the network's placement has them (no failover since it was filled)."""
        return self.epoch == self.net.epoch

    def clear(self) -> None:
        super().clear()
        if self.current:
            self.net.kv_op("clear", self.seq_id, 0)

    def truncate(self, n: int) -> None:
        super().truncate(n)
        if self.current:  # else its tokens are all a rebuild reads
            self.net.kv_op("truncate", self.seq_id, n)


@dataclass(frozen=True)
class Rejoined:
    """Lost workers that answered again and were taken back, and the flags in force since."""

    devices: tuple[str, ...]
    flags: tuple[str, ...]

    def line(self) -> str:
        return f"{', '.join(self.devices)} answered again and was taken back ({' '.join(self.flags)})"


@dataclass(frozen=True)
class Failover:
    """A worker lost during a pass and what took its place: reported once, when the pass that met the loss has
    run on the devices left (DistributedNet.on_failover)."""

    device: str
    reason: str  # the error's first line
    flags: tuple[str, ...]  # the placement now, as flags
    seconds: float  # from the error to the pass's result: re-plan, load, rebuilt caches, the pass again
    tokens_replayed: int  # cached tokens run again to rebuild the KV caches

    def line(self) -> str:
        now = " ".join(self.flags) or "everything on this machine"
        return (f"{self.device} was lost ({self.reason}); continuing without it ({now}), recovered in "
                f"{self.seconds:.2f} s ({self.tokens_replayed} cached tokens run again)")


class DistributedNet:
    """A Network (see engine.model) whose segments run where the placement put their weights."""

    def __init__(self, local: DeepSeek2 | Llama, gguf: GGUFFile, planned: Planned, opts: Options, spec: PlacementSpec,
                 progress: Callable[[LoadProgress], None] | None = None) -> None:
        self.local, self.cfg, self.gguf, self.opts, self.loaded_spec = local, local.cfg, gguf, opts, spec
        self.load_stats = LoadStats()
        self.seq_ids = itertools.count(secrets.randbelow(1 << 31))
        self.epoch = 0  # placements since the load: a failover (or a worker taken back) starts the next
        self.lost: list[str] = []  # workers failed over and not taken back, in the order lost
        self.failovers: list[Failover] = []
        self._broken: str | None = None  # why nothing runs: the devices left could not hold the model
        self._last_rejoin = 0.0
        self.on_failover: Callable[[Failover], None] | None = None
        self._closer: Callable[[], Any] = lambda: None
        self._setup(planned, progress)

    def _setup(self, planned: Planned, progress: Callable[[LoadProgress], None] | None = None) -> None:
        """Put the plan in place: its segments, executors, the workers' tensors and programs."""
        placement, clients = planned.placement, planned.clients
        self.placement, self.clients, self.rules, self.auto = placement, clients, planned.rules, planned.auto
        self.segments = placement.segments(layer_ops(self.gguf.tensors, self.cfg.n_layers))
        self.local_attn = {i for s in self.segments if s.device == CPU for i, p in s.ops if p == "attn"}
        # Segment ids are random per load so that two models (or coordinators) sharing a worker do not replace
        # each other's programs; KV sequence ids likewise. Segment k is base + k on every worker holding a part.
        self.base = secrets.randbelow(1 << 31)
        if any(device_kind(x.device) == "cuda" for s in self.segments for x in s.experts):
            raise PlacementError("experts split over several devices run on CPUs and workers; a local GPU cannot "
                                 "hold a range of them yet: give the GPU whole expert tensors with its own -ot rule")
        # what each worker runs: whole segments, and its range of each split layer's experts
        self.remote = sorted([(self.base + k, s) for k, s in enumerate(self.segments)
                              if not s.experts and device_kind(s.device) == "rpc"]
                             + [(self.base + k, Segment(x.device, s.ops, (x,))) for k, s in enumerate(self.segments)
                                for x in s.experts if device_kind(x.device) == "rpc"], key=lambda r: r[0])
        old = sorted({s.device for _, s in self.remote if s.experts and clients[s.device].minor < 2})
        if old:
            raise RPCError(f"{old[0]} speaks protocol 1.{clients[old[0]].minor}; splitting experts over workers "
                           "needs 1.2 (update ikctl there)")
        self.gpu: dict[int, Any] = {}  # segment index -> SegmentRunner on a GPU of this machine (engine.cuda)
        if any(device_kind(s.device) == "cuda" for s in self.segments):
            self.gpu = gpu_runners(self.gguf, self.cfg, self.segments, self.opts, context_size(self.cfg, self.opts))
        self.executors, self.steps = self._executors()
        self._closer = weakref.finalize(self, _close, list(self.executors.values()))
        self._load(self.gguf, self.opts, progress)

    def _executors(self) -> tuple[dict[str, Executor], list[tuple[int, Executor]]]:
        """One executor per device (Here for this process's CPU, OnGpu for this machine's GPUs, OnWorker each),
        ExpertsSplit for the split layers; and the executor of each segment in pass order."""
        by_device: dict[str, dict[int, Segment]] = {}
        for k, seg in enumerate(self.segments):
            if not seg.experts:
                by_device.setdefault(seg.device, {})[k] = seg
        for segment_id, seg in self.remote:  # a worker's ranges of split layers: it frees them at close
            by_device.setdefault(seg.device, {})[segment_id - self.base] = seg
        split = {k: s for k, s in enumerate(self.segments) if s.experts}
        # the segment before a worker's experts (or a split layer's) leaves the shared experts to run meanwhile
        defer = {k - 1 for k, s in enumerate(self.segments)
                 if s.experts or (expert_only(s) and device_kind(s.device) == "rpc")}
        run_op = self.local.run_op
        executors: dict[str, Executor] = {}
        for device, segs in by_device.items():
            if device == CPU:
                executors[device] = Here(run_op, {k: s.ops for k, s in segs.items()}, defer)
            elif device_kind(device) == "cuda":
                executors[device] = OnGpu({k: self.gpu[k] for k in segs}, segs, run_op)
            else:
                executors[device] = OnWorker(self.clients[device], {k: self.base + k for k in segs}, segs, run_op)
        parts = {k: [ExpertPart(x.first, x.count, self.clients.get(x.device), self.base + k) for x in s.experts]
                 for k, s in split.items()}
        experts_split = ExpertsSplit(parts, split, run_op)
        steps = [(k, experts_split if s.experts else executors[s.device]) for k, s in enumerate(self.segments)]
        return executors, steps

    # ---- loading ----------------------------------------------------------------------------------------------
    def _load(self, gguf: GGUFFile, opts: Options, progress: Callable[[LoadProgress], None] | None) -> None:
        if not self.clients:  # only local GPUs: nothing to offer, no digests to compute
            return
        digests = model_digests(gguf)
        n_ctx = context_size(self.cfg, opts)
        for device, client in self.clients.items():
            segs = [(k, s) for k, s in self.remote if s.device == device]
            held = {n: tensor_part(gguf, n, s.experts[0] if s.experts else None, digests[n]) for _, s in segs
                    for op in s.ops for n in op_tensor_names(gguf.tensors, op, self.cfg.n_layers)}
            specs = [spec for spec, _ in held.values()]
            before = client.counters.tensor_bytes_sent
            result = client.offer(specs, _progress_reporter(device, specs, progress) if progress else None)
            self.load_stats.tensors_offered += len(specs)
            self.load_stats.tensors_uploaded += sum(v == "uploaded" for v in result.values())
            self.load_stats.bytes_uploaded += client.counters.tensor_bytes_sent - before
            refs = {n: ref for n, (_, ref) in held.items()}
            for k, s in segs:
                cfg = self.cfg.with_expert_count(s.experts[0].count) if s.experts else self.cfg
                records = segment_records(cfg, s.ops, refs, mla=opts.mla, amb_bytes=opts.amb << 20,
                                          cache_type=opts.cache_type_k, n_ctx=n_ctx,
                                          model=gguf.path.name, int8=not opts.float_activations)
                client.define_segment(k, records)

    def close(self) -> None:
        """Drop this model's segment programs and KV caches on the workers (they keep the tensors) and disconnect."""
        self._closer()

    # ---- the Network protocol ---------------------------------------------------------------------------------
    def new_cache(self, n_ctx: int, cache_type: str) -> KVCache:
        return RemoteKVCache(self, n_ctx, cache_type)

    def kv_op(self, op: str, seq_id: int, n: int) -> None:
        for executor in self.executors.values():
            executor.kv(op, seq_id, n)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run T new tokens: each segment on its device's executor, a worker's in one round trip; logits as
        DeepSeek2's."""
        logits = self._survive([cache], lambda: run_pass(self.steps, [(ids, cache)], all_logits))
        return np.array(logits)  # a copy: the reply's buffer is read-only

    def forward_batch(self, items: Sequence[tuple[np.ndarray, KVCache]]) -> np.ndarray:
        """One pass over several sequences (new token ids, own cache each), each remote segment in one round trip
        for all of them (MAX_SEQUENCES at most: a worker keeps no more per segment, so more take further passes);
        each one's last logits [N, V]."""
        def run() -> list[np.ndarray]:
            return [run_pass(self.steps, items[a : a + MAX_SEQUENCES]) for a in range(0, len(items), MAX_SEQUENCES)]

        return np.concatenate(self._survive([c for _, c in items], run))  # a copy: the replies' are read-only

    def forward_passes(self, passes: Sequence[Sequence[Item]], all_logits: bool = False,
                       pipeline: bool = True) -> list[np.ndarray]:
        """Several passes in order (a call's micro-batches), pipelined across the devices (engine.pipeline) or one
        after another: the same logits either way, each pass's as forward_batch's (forward's with all_logits)."""
        runs = [[p[a : a + MAX_SEQUENCES] for a in range(0, len(p), MAX_SEQUENCES)] for p in passes]
        flat = [r for rs in runs for r in rs]
        caches = [c for p in passes for _, c in p]
        logits = iter(self._survive(caches, lambda: self._passes(flat, all_logits, pipeline)))
        return [np.concatenate([next(logits) for _ in rs]) for rs in runs]  # copies: replies' buffers are read-only

    def _passes(self, passes: Sequence[Sequence[Item]], all_logits: bool, pipeline: bool) -> list[np.ndarray]:
        if pipeline and len(passes) > 1:
            return run_pipeline(self.steps, passes, all_logits)
        return [run_pass(self.steps, p, all_logits) for p in passes]

    # ---- failover ---------------------------------------------------------------------------------------------
    def _survive(self, caches: Sequence[KVCache], run: Callable[[], T]) -> T:
        """run() once the caches are rebuilt where the placement has them now; when a worker is lost meanwhile
        (dead, or frozen past the reply deadline), re-plan without it, put the caches back as they were before
        the call and run again (unless --no-failover)."""
        if self._broken is not None:
            raise IkctlError(self._broken)
        began = {id(c): c.n_past for c in caches}
        lost: tuple[WorkerGone, float] | None = None
        replayed = 0
        while True:
            try:
                replayed += self._replay(caches)
                result = run()
                break
            except WorkerGone as e:
                if not self.opts.failover or e.device not in self.clients:
                    raise
                lost = lost or (e, time.monotonic())
                for c in caches:  # passes this call finished are run again: back to where it began
                    n = began[id(c)]
                    c.n_past, c.tokens = n, c.tokens[:n] if c.tokens is not None else None
                self._fail_over(e)
        if lost is not None:
            error, t0 = lost
            device = str(error.device)
            reason = str(error).splitlines()[0].removeprefix(f"{device}: ").removesuffix(
                "; check that it is still running")
            event = Failover(device, reason, tuple(self.rules.flags()), time.monotonic() - t0, replayed)
            self.failovers.append(event)
            if self.on_failover is not None:
                self.on_failover(event)
        return result

    def _replay(self, caches: Sequence[KVCache]) -> int:
        """Rebuild each cache filled before the last failover by running its tokens again; how many were run."""
        n = 0
        for c in {id(c): c for c in caches}.values():
            if not isinstance(c, RemoteKVCache) or c.current:
                continue
            tokens = c.tokens
            if tokens is None or len(tokens) != c.n_past:
                raise IkctlError(f"a sequence of {c.n_past} positions cannot be rebuilt after the failover: its "
                                 "tokens are not known (it was filled outside Model.eval)")
            c.rehome()
            ub = self.opts.ubatch_size
            chunks = [[(np.asarray(tokens[a : a + ub], np.int64), c)] for a in range(0, len(tokens), ub)]
            self._passes(chunks, False, self.opts.pipeline)
            n += len(tokens)
        return n

    @property
    def spec(self) -> PlacementSpec:
        """The placement flags in force: those of the load without the workers lost."""
        spec = self.loaded_spec
        for device in self.lost:
            spec = spec.without(device)
        return spec

    def _fail_over(self, error: WorkerGone) -> None:
        """Re-plan without the lost worker (and any other found gone meanwhile) and load the new placement: the
        workers left keep their tensors, so only what moved is sent. One error line when nothing fits."""
        try:
            self._replan([*self.lost, str(error.device)])
        except PlacementError as e:
            self._broken = f"{error.device} was lost and the model no longer fits on the devices left: {e}"
            raise IkctlError(self._broken) from None

    def rejoin(self, probe_timeout: float = 0.5, every: float = 5.0) -> Rejoined | None:
        """Take back lost workers that answer again at the same endpoint (with the same token): re-plan with the
        load's flags minus the workers still lost. Tried at most once per `every` seconds (a host that is gone
        costs a probe of probe_timeout); None when none came back. The sequences are rebuilt when next used."""
        if not self.lost or time.monotonic() - self._last_rejoin < every:
            return None
        self._last_rejoin = time.monotonic()
        back = [d for d in self.lost if probe(*_host_port(d), probe_timeout) is None]
        if not back:
            return None
        try:
            self._replan([d for d in self.lost if d not in back])
        except PlacementError as e:  # cannot happen with more devices, unless one's memory shrank
            self._broken = f"taking back {', '.join(back)} failed: {e}"
            raise IkctlError(self._broken) from None
        self._broken = None
        taken = tuple(d for d in back if d not in self.lost)
        return Rejoined(taken, tuple(self.rules.flags())) if taken else None

    def _replan(self, lost: list[str]) -> None:
        """Plan and load the load's flags without the `lost` devices (and any other found gone meanwhile)."""
        self._closer()  # the old programs and caches go; the tensors stay on the workers
        while True:
            self.lost = lost
            try:
                planned = connect_and_plan(self.cfg, self.gguf, self.opts, self.spec)
                try:
                    self._setup(planned)
                except BaseException:
                    _close_clients(planned.clients)
                    raise
            except WorkerGone as e:
                if e.device is None or e.device in lost:
                    raise
                lost = [*lost, e.device]
                continue
            self.epoch += 1
            return


def _host_port(device: str) -> tuple[str, int]:
    """RPC[host:port] -> (host, port)."""
    ep = Endpoint(device[device.index("[") + 1 : -1])
    return ep.host, ep.port


def _progress_reporter(device: str, specs: Sequence[OfferSpec],
                       progress: Callable[[LoadProgress], None]) -> Callable[[OfferSpec, str], None]:
    total = sum(s.nbytes for s in specs)
    done = {"tensors": 0, "hit": 0, "sent": 0}

    def on_tensor(spec: OfferSpec, status: str) -> None:
        done["tensors"] += 1
        done["hit" if status == "hit" else "sent"] += spec.nbytes
        progress(LoadProgress(device, done["tensors"], len(specs), done["hit"] + done["sent"], total, done["hit"],
                              done["sent"]))

    progress(LoadProgress(device, 0, len(specs), 0, total, 0, 0))
    return on_tensor


def _close(executors: list[Executor]) -> None:
    for executor in executors:
        executor.close()


def tensor_part(gguf: GGUFFile, name: str, part: ExpertSlice | None, digest: str) -> tuple[OfferSpec, TensorRef]:
    """What a worker is offered for a tensor (whose digest is given), or for its range of experts of a split
    expert tensor (bytes [first, stop) x one expert's, hashed here), and how its segment program names it."""
    t = gguf.tensors[name]
    if part is None:
        spec = OfferSpec(digest, t.n_bytes, t.qtype, list(reversed(t.shape)), name, lambda: tensor_bytes(gguf, name))
        return spec, (digest, t.qtype, t.shape)
    per = t.n_bytes // t.shape[0]
    shape, a, b = (part.count, *t.shape[1:]), part.first * per, part.stop * per
    whole, digest = digest, hash_bytes(tensor_bytes(gguf, name)[a:b])
    spec = OfferSpec(digest, b - a, t.qtype, list(reversed(shape)), name, lambda: tensor_bytes(gguf, name)[a:b],
                     part_of=whole, part_offset=a)
    return spec, (digest, t.qtype, tuple(shape))


class Planned(NamedTuple):
    """A plan made against the connected workers: the placement, the clients of the workers it uses, the rules it
    follows (--auto's choice, else the flags), and with --auto every candidate weighed."""

    placement: Placement
    clients: dict[str, Client]
    rules: PlacementRules
    auto: AutoChoice | None = None


def connect_and_plan(cfg: Any, gguf: GGUFFile, opts: Options, spec: PlacementSpec) -> Planned:
    """Connect to the spec's workers, plan against their memory (their -m, or the cluster file's, or
    --device-mem) with the KV cache of the whole context counted (with --auto: choose the rules first, from the
    devices' measured speeds and links), and keep the clients of the workers used."""
    clients: dict[str, Client] = {}
    try:
        reported = {}
        for ep in spec.rules.rpc:
            client = clients[rpc_device(ep)] = Client.connect(ep, spec.token_for(ep),
                                                              poll_ms=opts.rpc_poll, reply_floor=opts.rpc_timeout,
                                                              probe_timeout=opts.rpc_probe_timeout)
            reported[rpc_device(ep)] = client.device_info().mem_total_bytes
        kv = kv_bytes_per_layer(cfg, opts)
        programs = program_bytes_per_layer(cfg, opts, gguf.tensors.values())
        if opts.auto:
            choice = choose_placement(cfg, gguf, spec, clients, reported, opts, kv, programs)
            assert choice.chosen.placement is not None
            placement, rules = choice.chosen.placement, choice.chosen.rules
        else:
            choice, rules = None, spec.rules
            devices = devices_for(rules.rpc, spec.capacities(reported), local_gpus(rules))
            placement = plan(gguf.tensors.values(), int(cfg.n_layers), devices, rules, kv_bytes_per_layer=kv,
                             program_bytes_per_layer=programs, n_experts=gguf.expert_count)
    except BaseException:
        _close_clients(clients)
        raise
    used = placement.devices_used()
    _close_clients({d: c for d, c in clients.items() if d not in used})
    return Planned(placement, {d: c for d, c in clients.items() if d in used}, rules, choice)


def choose_placement(cfg: Any, gguf: GGUFFile, spec: PlacementSpec, clients: Mapping[str, Client],
                     reported: Mapping[str, int], opts: Options, kv_bytes: int, program_bytes: int) -> AutoChoice:
    """--auto: measure this machine and the workers, then weigh the candidate placements (engine.auto_placement)."""
    tensors = [TensorMeta(n, t.n_bytes, t.qtype) for n, t in gguf.tensors.items()]
    measured = measure(cfg, clients, spec.capacities(reported), {t.qtype for t in tensors}, opts.threads,
                       opts.recalibrate)
    experts, used = int(getattr(cfg, "n_routed_experts", 0) or 0), int(getattr(cfg, "n_experts_per_tok", 0) or 0)
    shape = model_shape({t.name: t.n_bytes for t in tensors}, int(cfg.n_layers), max(experts, 1), max(used, 1),
                        int(cfg.hidden_size), int(cfg.n_vocab))
    return choose(tensors, int(cfg.n_layers), shape, list(spec.rules.rpc), measured, kv_bytes, program_bytes)


def auto_choice(gguf: GGUFFile, opts: Options) -> AutoChoice:
    """--auto's choice for a model without loading it: the workers measured, every candidate weighed (what
    `ikctl plan --auto` and the app's Auto button show)."""
    planned = connect_and_plan(model_config(gguf), gguf, replace(opts, auto=True), placement_spec(opts))
    _close_clients(planned.clients)
    assert planned.auto is not None
    return planned.auto


def _close_clients(clients: dict[str, Client]) -> None:
    for c in clients.values():
        c.close()


def distribute(net: Any, gguf: GGUFFile, opts: Options,
               progress: Callable[[LoadProgress], None] | None = None) -> tuple[Any, AutoChoice | None]:
    """The network itself when the placement keeps everything local, else a DistributedNet over the workers; and
    with --auto, the choice made. The plan is checked against each worker's memory before any tensor is sent."""
    spec = placement_spec(opts)
    planned = connect_and_plan(net.cfg, gguf, opts, spec)
    if not planned.placement.devices_used() - {CPU}:
        return net, planned.auto
    try:
        return DistributedNet(net, gguf, planned, opts, spec, progress), planned.auto
    except BaseException:
        _close_clients(planned.clients)
        raise


def remote_segments(net: Any) -> Sequence[Segment]:
    """The segments that run on workers (empty for a local network)."""
    return [s for _, s in getattr(net, "remote", [])]

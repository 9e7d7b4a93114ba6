"""Segment programs: a run of ops with its weights named by digest, encoded as plain records and run by a worker."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from engine.architectures import REGISTRY, ModelConfig, of_config
from engine.batch import Batch, SeqRun, batch_positions
from engine.config import RopeConfig, shape_problem
from engine.cuda import require
from engine.cuda import tensors as cuda_tensors
from engine.errors import IkctlError
from engine.forward_pass import Op
from engine.ik_types import is_ik, quant_type, type_name
from engine.kernels import MATVEC_MAX_T, TILE_BYTES, activations, drop_tile_scratch
from engine.kv_cache import CACHE_TYPES, KVCache, row_bytes
from engine.moe import NO_EXPERT
from engine.ops import to_host
from engine.placement import op_part, tensor_layer
from engine.quant import QTensor
from engine.rope import table_bytes

Scalar = str | int | float | bool
Record = tuple[str, dict[str, Any]]  # (op name, args): what rpcnode.client turns into protocol OpRecords
TensorRef = tuple[str, int, tuple[int, ...]]  # digest, GGML type, NumPy shape
# The entries a GPU segment keeps on its device (token ids, routing and counts stay host arrays).
DEVICE_STATE = frozenset({"x", "h", "y", "shared"})
# KV caches a worker keeps per segment, the least recently used one goes beyond this; also the most sequences one
# run may hold (as many as the decode kernels take rows in one read of the weights: engine.kernels.MATVEC_MAX_T)
MAX_SEQUENCES = 16
# A worker's cap on a program's attention score scratch (-amb): a peer's value would size it unbounded. Attention
# runs in query chunks of this size, so a lower cap changes the speed of a long prefill, never its results.
MAX_AMB_BYTES = 1 << 30
_TENSOR_PREFIX = "t."


class ProgramError(IkctlError):
    """A segment program the worker cannot run (bad records, missing tensors, unsupported architecture)."""


class UnknownSequence(ProgramError):
    """Tokens that do not continue a sequence this segment holds (evicted, or never started here)."""


class KVOutOfMemory(IkctlError):
    """A run's sequences' KV caches would grow past what the worker's memory limit leaves, even alone."""


# ---- the model config as flat scalars (DefineSegment args hold scalars only) -------------------------------


def config_args(cfg: ModelConfig) -> dict[str, Scalar]:
    """The hyper-parameters as `cfg.<field>` / `cfg.rope.<field>` scalars; None values are left out."""
    out: dict[str, Scalar] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, RopeConfig):
            out.update({f"cfg.rope.{k}": v for k, v in dataclasses.asdict(value).items() if v is not None})
        elif value is not None:
            out[f"cfg.{f.name}"] = value
    return out


# Bounds on a program's hyper-parameters: a peer's config sizes lists, tables and caches on the worker before any
# tensor is looked at, so a value past these is refused (real models stay far below: DeepSeek-V3 has 61 layers,
# 256 experts, a 129280-token vocabulary).
CONFIG_INT_MAX = 1 << 24
CONFIG_INT_LIMITS = {"n_layers": 4096, "n_heads": 1 << 14, "n_kv_heads": 1 << 14, "n_routed_experts": 1 << 16,
                     "n_experts_per_tok": 1 << 16, "n_shared_experts": 1 << 16, "n_group": 1 << 16,
                     "topk_group": 1 << 16}


def _field_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _check_config_value(key: str, value: Any, kind: str | None) -> None:
    """One `cfg.*` value against its field's declared type and the bounds above (unknown keys are left to the
    dataclass, which refuses them)."""
    name = key.rsplit(".", 1)[-1]
    if kind is None:
        return
    if value is None:
        ok = "None" in kind
    elif kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool) and \
            0 <= value <= CONFIG_INT_LIMITS.get(name, CONFIG_INT_MAX)
    elif kind.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and abs(value) <= 1e12
    elif kind.startswith("str"):
        ok = isinstance(value, str) and len(value) <= 32
    else:
        ok = False
    if not ok:
        raise ProgramError(f"model config {key} = {value!r:.40} is out of bounds or not a {kind}")


def config_from_args(args: Mapping[str, Any], arch: str = "deepseek2") -> ModelConfig:
    """The inverse of config_args; a missing, mistyped or out-of-bounds field is a ProgramError."""
    top_types, rope_types = _field_types(REGISTRY[arch].config), _field_types(RopeConfig)
    for key, value in args.items():
        if key.startswith("cfg.rope."):
            _check_config_value(key, value, rope_types.get(key[len("cfg.rope."):]))
        elif key.startswith("cfg."):
            _check_config_value(key, value, top_types.get(key[len("cfg."):]))
    rope = {k[len("cfg.rope."):]: v for k, v in args.items() if k.startswith("cfg.rope.")}
    top = {k[len("cfg."):]: v for k, v in args.items() if k.startswith("cfg.") and not k.startswith("cfg.rope.")}
    try:
        return REGISTRY[arch].config(**top, rope=RopeConfig(**rope))
    except (TypeError, ValueError) as e:
        raise ProgramError(f"bad model config in the segment program: {e}") from None


# ---- which tensors an op needs -----------------------------------------------------------------------------


def op_tensor_names(names: Iterable[str], op: Op, n_layers: int) -> list[str]:
    """The tensors op (layer, part) reads; the output op of a model with tied embeddings reads token_embd too."""
    layer, part = op
    names = list(names)
    if part == "embd":
        return [n for n in names if op_part(n) == "embd"]
    if part == "output":
        out = [n for n in names if op_part(n) == "output"]
        return out if "output.weight" in names else [*out, "token_embd.weight"]
    return [n for n in names if tensor_layer(n) == layer and op_part(n) == part]


def segment_records(cfg: ModelConfig, ops: Sequence[Op], tensors: Mapping[str, TensorRef], *, mla: int,
                    amb_bytes: int, cache_type: str, n_ctx: int, model: str = "", int8: bool = True) -> list[Record]:
    """A segment program: a "config" record, then one record per op naming its tensors by digest. int8: the
    worker multiplies with int8-quantized activations, as the coordinator does (engine.kernels.activations)."""
    head: dict[str, Any] = {"arch": of_config(cfg).name, "model": model[:256], "mla": mla, "amb_bytes": amb_bytes,
                            "cache_type": cache_type, "n_ctx": n_ctx, "int8": int8, **config_args(cfg)}
    records: list[Record] = [("config", head)]
    for layer, part in ops:
        args: dict[str, Any] = {"layer": layer}
        for name in op_tensor_names(tensors, (layer, part), cfg.n_layers):
            digest, qtype, shape = tensors[name]
            args[_TENSOR_PREFIX + name] = [digest, qtype, *shape]
        records.append((part, args))
    return records


@dataclass(frozen=True)
class Program:
    """A decoded segment program."""

    cfg: ModelConfig
    ops: tuple[Op, ...]
    tensors: dict[str, TensorRef]
    mla: int
    amb_bytes: int
    cache_type: str
    n_ctx: int
    int8: bool = True


def parse_program(records: Sequence[Record]) -> Program:
    """Check and decode records made by segment_records; anything else is a ProgramError."""
    if not records or records[0][0] != "config":
        raise ProgramError("a segment program starts with a 'config' record")
    head = records[0][1]
    arch = head.get("arch")
    if not isinstance(arch, str) or arch not in REGISTRY:  # a peer's value: a list is not even hashable
        raise ProgramError(f"architecture {arch!r} is not supported by workers ({', '.join(REGISTRY)})")
    cache_type = head.get("cache_type")
    if cache_type not in CACHE_TYPES:
        raise ProgramError(f"KV cache type {cache_type!r} is not one of {', '.join(CACHE_TYPES)}")
    int8 = head.get("int8", True)
    if not isinstance(int8, bool):
        raise ProgramError(f"'int8' must be true or false, got {int8!r:.40}")
    cfg = config_from_args(head, arch)
    ops: list[Op] = []
    tensors: dict[str, TensorRef] = {}
    for part, args in records[1:]:
        layer = args.get("layer")
        if part not in REGISTRY[arch].parts or not isinstance(layer, int):
            raise ProgramError(f"bad op record {part!r} (layer {layer!r})")
        _check_op_layer(cfg, part, layer)
        ops.append((layer, part))
        for key, value in args.items():
            if key.startswith(_TENSOR_PREFIX):
                tensors[key[len(_TENSOR_PREFIX):]] = _tensor_ref(key, value)
    # the hyper-parameters size tables and scratch: they must be those of the tensors named (held ones are
    # checked against these shapes when the runner is built)
    problems = [cfg.rope_problem(), *(shape_problem(cfg, name, ref[2]) for name, ref in tensors.items())]
    problem = next((p for p in problems if p), None)
    if problem:
        raise ProgramError(f"the program's model config does not fit its tensors: {problem}")
    n_ctx = _int(head, "n_ctx")
    if n_ctx < 1:  # every run needs 1 <= n_tokens <= n_ctx, and a KV cache a position
        raise ProgramError(f"'n_ctx' must be at least 1, got {n_ctx}")
    return Program(cfg, tuple(ops), tensors, _int(head, "mla"), min(_int(head, "amb_bytes"), MAX_AMB_BYTES),
                   cache_type, n_ctx, int8)


RUN_FIXED_BYTES = 1 << 20
# What the arrays counted below do not show: NumPy's and BLAS's own buffers, the allocator's slack; 1/SCRATCH_MARGIN
# more is counted (the fuzz campaign's 8192-token prefill of a small MLA model grew a worker's RSS by 1.14 times the
# count before the score chunk's copy was counted, and took it past its memory cgroup)
SCRATCH_MARGIN = 8


def run_scratch_bytes(p: Program, n_tokens: int, n_keys: int, n_out: int, kv_decode: bool = True) -> int:
    """An upper bound on the bytes of f32 arrays a run of n_tokens (T) allocates besides its KV rows, attending
    over n_keys (S) cached positions and keeping n_out rows of logits: the batch, the position and the program
    are a peer's choice, so the worker counts this before running. Measured against tracemalloc's peak on odd
    shapes (wide FFNs and experts, many heads, big vocabularies, T 1-300, S to 440): 0.3-0.95 of it, before the
    score chunk's copy and the margin were counted; but at T = S = 8192 the worker's RSS grew by 1.14 times that
    count (tests/rpcnode/test_hostile_peers.py holds a run's growth within the pool and -m).

    In floats, the most any op keeps alive at once (an op's locals live until it returns, so they are summed),
    beside RUN_FIXED_BYTES (positions, routing, small per-op arrays) and, for T > MATVEC_MAX_T, the weight tile:
      hidden:      T * 8 D                      x in and out, h, shared, y, rms_norm's temporaries
      embd:        nothing beyond hidden
      output:      n_out * V                    the logits
      ffn:         T * (3 max(F, Fs) + 4 E + 2 K)  gate, silu (two temporaries), up; router scores; routing
      moe_experts: T * K * (3 Fe + 3 D)         all (token, expert) pairs at once, for T <= MATVEC_MAX_T
                   T * (3 Fe + 4 D)             else one expert's tokens at a time (each token picks an expert
                                                once: SegmentRunner.run checks the rows of idx)
      attn (MLA):  T * (H (4 dn + 9 dr + 4 r + 2 dv) + 2 q_lora + 3 r + 7 dr)   projections, rope, concatenations
                   + S * ((r + dr) + H (2 dn + dr + dv))       the cache read as f32, K and V decompressed
                   + 2 H (dn + dv) r  (kv_decode)             Wk/Wv decoded for this call
                   + scores
      attn (llama):T * (7 H hd + 5 Hkv hd) + S * 2 Hkv hd + scores   (hd: head_dim, Hkv: n_kv_heads)
      scores:      Tc * (2 Hs S + 2 S + 2 Hs), Tc = min(T, max(1, amb / (4 Hs S)))  one chunk, at least a row:
                   the scores, the copy NumPy's matmul makes of them (transposed) for the product with V, the mask
                   (Hs: heads sharing one key head: n_heads for MLA, n_heads / n_kv_heads for llama)
    D hidden, V vocabulary, F dense FFN, Fs = n_shared_experts * Fe, Fe expert FFN, E routed experts, K experts
    per token, H heads; int8-quantized copies of inputs (1 byte per float) fit in these margins. The sum is
    counted with a margin of 1/SCRATCH_MARGIN for what no array above shows."""
    c, T, S = p.cfg, n_tokens, n_keys
    parts = {part for _, part in p.ops}
    g = lambda name: int(getattr(c, name, 0) or 0)  # noqa: E731 (fields the architecture lacks count 0)
    D, H = c.hidden_size, c.n_heads
    floats = RUN_FIXED_BYTES // 4 + T * 8 * D
    if T > MATVEC_MAX_T:  # engine.kernels.matmul_tiled decodes weight rows into one tile (dropped after the run)
        widest_row = max(D, c.intermediate_size, g("moe_intermediate_size"), H * g("v_head_dim"),
                         H * g("head_dim"), g("q_lora_rank"), g("kv_lora_rank"))
        floats += max(TILE_BYTES, 4 * widest_row) // 4
    if "output" in parts:
        floats += min(max(n_out, 1), T) * c.n_vocab
    if "ffn" in parts:
        E, K = g("n_routed_experts"), g("n_experts_per_tok")
        floats += T * (3 * max(c.intermediate_size, g("n_shared_experts") * g("moe_intermediate_size"))
                       + 4 * E + 2 * K)
    if "moe_experts" in parts:
        Fe, K = g("moe_intermediate_size"), g("n_experts_per_tok")
        floats += T * K * (3 * Fe + 3 * D) if T <= MATVEC_MAX_T else T * (3 * Fe + 4 * D)
    if "attn" in parts:
        attn, shared = of_config(c).network.attention_scratch(c, T, S, kv_decode)
        floats += attn
        rows = min(T, max(1, p.amb_bytes // max(1, 4 * shared * S)))
        floats += rows * (2 * shared * S + 2 * S + 2 * shared)
    return 4 * floats + 4 * floats // SCRATCH_MARGIN


# A runner's own objects (network, layer list, program) and each op's (its layer, QTensor views): measured at
# 14 KiB for a small model's whole program and 51-230 KiB for SmolLM2's and a V3-shaped one; counted generously.
PROGRAM_BASE_BYTES = 64 << 10
OP_BYTES = 8 << 10


def program_kv_bytes(p: Program) -> int:
    """One sequence's KV cache over the whole context: counted from the start, as llama.cpp allocates it."""
    n_attn = len({layer for layer, part in p.ops if part == "attn"})
    return n_attn * row_bytes(p.cfg.cache_widths(p.mla), p.cache_type) * p.n_ctx


def program_host_bytes(p: Program) -> int:
    """An upper bound on what a runner for p keeps on the host besides the tensors it reads and its KV rows (a
    peer's program: charged to the worker's -m when it is defined, before the runner is built): the runner's
    objects, a float32 copy of every vector it names (norms, biases: each layer's are decoded at build), the
    decoded per-head Wk/Wv of its attention layers where the network keeps them (DeepSeek2.kv_weights), and its
    rope table (engine.rope.table_bytes)."""
    c = p.cfg
    n_attn = sum(part == "attn" for _, part in p.ops)
    vectors = 4 * sum(int(np.prod(ref[2], dtype=np.int64)) for ref in p.tensors.values() if len(ref[2]) == 1)
    kv_weights = n_attn * c.kept_attn_bytes()
    rope = table_bytes(c.rope.n_rot, p.n_ctx) if n_attn else 0
    return PROGRAM_BASE_BYTES + OP_BYTES * len(p.ops) + 8 * c.n_layers + vectors + kv_weights + rope


def _check_op_layer(cfg: ModelConfig, part: str, layer: int) -> None:
    """An op at the layer it can run at (as engine.placement makes them): embd at -1, output at n_layers, the
    others at a layer of the model, moe_experts at one with routed experts. Another layer would run with weights
    that were never loaded (a negative one would even index from the end)."""
    where = {"embd": (-1, -1), "output": (cfg.n_layers, cfg.n_layers)}.get(part, (0, cfg.n_layers - 1))
    if not where[0] <= layer <= where[1]:
        raise ProgramError(f"op {part} names layer {layer}; the model has {cfg.n_layers} layers (embd is -1, "
                           f"output {cfg.n_layers})")
    if part == "moe_experts" and part not in cfg.layer_parts(layer):
        raise ProgramError(f"op moe_experts names layer {layer}, which has no routed experts")


def _int(args: Mapping[str, Any], key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProgramError(f"'{key}' must be a non-negative integer, got {value!r}")
    return value


def _tensor_ref(key: str, value: Any) -> TensorRef:
    ok = isinstance(value, list) and len(value) >= 2 and isinstance(value[0], str)
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value[1:]):
        raise ProgramError(f"{key}: expected [digest, ggml_type, *shape], got {value!r:.100}")
    return value[0], value[1], tuple(value[2:])


# ---- tensors from raw bytes ---------------------------------------------------------------------------------


def qtensor_from_bytes(name: str, raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> QTensor:
    """A QTensor over a flat uint8 array, in GGUFFile.raw's layout (float types shaped, others bytes per row)."""
    t = quant_type(qtype)
    count = int(np.prod(shape, dtype=np.int64))
    if t is None or not shape or shape[-1] % t.qk or count // shape[-1] * t.row_bytes(shape[-1]) != raw.nbytes:
        raise ProgramError(f"tensor '{name}': {raw.nbytes} bytes do not hold {type_name(qtype)}{list(shape)}")
    if qtype == gguf.GGMLQuantizationType.F32:
        data = raw.view(np.float32).reshape(shape)
    elif qtype == gguf.GGMLQuantizationType.F16:
        data = raw.view(np.float16).reshape(shape)
    else:
        data = raw.reshape(*shape[:-1], t.row_bytes(shape[-1]))
    return QTensor(name, data, qtype, shape)


# ---- the worker's side: a built segment ----------------------------------------------------------------------


class SegmentRunner:
    """A program's network (only its weights) and its KV caches per sequence; `run` applies the ops in order.

    With `cuda_device` the weights are uploaded to that GPU (engine.cuda) and the ops and caches run there; the
    pass state comes in and goes out as host arrays either way."""

    def __init__(self, program: Program, lookup: Callable[[str], np.ndarray | None],
                 cuda_device: int | None = None) -> None:
        self.program = program
        self.cuda_device = cuda_device
        self.digests = {ref[0] for ref in program.tensors.values()}

        def get(name: str) -> QTensor | None:
            ref = program.tensors.get(name)
            if ref is None:
                return None
            raw = lookup(ref[0])
            if raw is None:
                raise ProgramError(f"tensor '{name}' ({ref[0][:16]}…) is not held by this worker")
            return qtensor_from_bytes(name, raw, ref[1], ref[2])

        arch = of_config(program.cfg)
        xp: Any = np
        getter: Callable[[str], Any] = get
        if cuda_device is not None:
            if not arch.on_gpu:
                raise ProgramError(f"{arch.name} layers cannot run on a GPU yet (CUDA runs deepseek2 models); keep "
                                   "them on the CPU or on CPU workers")
            ik = sorted(n for n, ref in program.tensors.items() if is_ik(ref[1]))
            if ik:  # no CUDA kernel; a host-decoded f16 copy would take several times the bytes the plan reserved
                raise ProgramError(f"tensor '{ik[0]}' has type {type_name(program.tensors[ik[0]][1])} (ik_llama.cpp), "
                                   f"which ikctl cannot run on a GPU ({len(ik)} such tensors here); keep them on the "
                                   f"CPU or on CPU workers (-ot '{ik[0]}=CPU')")
            xp = require(cuda_device)
            getter = cuda_tensors.upload_getter(get, cuda_device)
        with self._on_device():
            self.net: Any = arch.network.from_parts(program.cfg, getter, program.ops, program.mla,
                                                    program.amb_bytes, xp)
        self._attn_layers = {i for i, p in program.ops if p == "attn"}
        self._caches: OrderedDict[int, KVCache] = OrderedDict()

    def scratch_bytes(self, seqs: Sequence[SeqRun], n_out: int) -> int:
        """run_scratch_bytes for a run of these sequences: all their rows go through each op at once, attention
        runs one sequence at a time (so the longest one's keys count), each keeps n_out rows of logits."""
        p = self.program
        n_tokens = sum(s.n_tokens for s in seqs)
        n_keys = max(min(s.pos_start + s.n_tokens, p.n_ctx) for s in seqs) if self._attn_layers else 0
        # Wk/Wv are decoded for the call unless all rows are decode steps of the absorbed path, few enough to
        # multiply by attn_k_b/attn_v_b in their encoding
        absorbed = max(s.n_tokens for s in seqs) == 1 and n_tokens <= MATVEC_MAX_T and p.mla != 0 and p.int8 and \
            self.cuda_device is None and any(n.endswith("attn_k_b.weight") for n in p.tensors)
        out_rows = sum(min(max(n_out, 1), s.n_tokens) for s in seqs)
        return run_scratch_bytes(p, n_tokens, n_keys, out_rows, kv_decode=not absorbed)

    def _new_cache(self) -> KVCache:
        cache = self.net.new_cache(self.program.n_ctx, self.program.cache_type)
        # streams only for this segment's attention layers; the others live elsewhere
        cache.layers = [layer if i in self._attn_layers else {} for i, layer in enumerate(cache.layers)]
        return cache

    def kv_grows(self, seqs: Sequence[SeqRun]) -> bool:
        """Whether `run_batch` would allocate KV rows (a new sequence, or one past its capacity): most steps do not."""
        if not self._attn_layers:
            return False
        for s in seqs:
            cache = self._caches.get(s.seq_id)
            if cache is None and not s.pos_start:
                return True
            if cache is not None and cache.nbytes_holding(min(s.pos_start, cache.n_past) + s.n_tokens) > cache.nbytes:
                return True
        return False

    def fit_kv(self, seqs: Sequence[SeqRun], free_bytes: int) -> int:
        """Before `run_batch` (its sequences checked): make the growth of their KV caches fit in `free_bytes` (what
        the worker's memory limit leaves), dropping this segment's least recently used other sequences while it
        does not (as a new sequence beyond MAX_SEQUENCES drops one); the bytes kv_accounted_bytes will come to. One
        sequence always fits once it is alone, as one sequence's whole context was reserved when the segment was
        defined; several may not: KVOutOfMemory then, with nothing grown or dropped."""
        if not self._attn_layers:
            return self.kv_accounted_bytes
        batch = {s.seq_id for s in seqs}
        after = 0
        for s in seqs:
            cache = self._caches.get(s.seq_id)
            start = 0 if cache is None else min(s.pos_start, cache.n_past)
            after += (cache or self._new_cache()).nbytes_holding(start + s.n_tokens)
        before = self.kv_accounted_bytes
        others = [s for s in self._caches if s not in batch]  # least recently used first

        def need(dropped: int) -> int:
            kept = sum(self._caches[s].nbytes for s in others[dropped:])
            return max(self.kv_reserved_bytes, kept + after) - before

        if need(len(others)) > free_bytes:  # not even alone: refused before anything is dropped
            raise KVOutOfMemory(f"the KV caches of {len(seqs)} sequences need {need(len(others))} bytes more, "
                                f"{free_bytes} free; run fewer sequences at once, lower -c, use -ctk q8_0, or raise -m")
        new = len(batch - set(self._caches))
        dropped = max(0, len(self._caches) + new - MAX_SEQUENCES)  # as _cache drops the oldest to make room
        while need(dropped) > free_bytes:
            dropped += 1
        for s in others[:dropped]:
            del self._caches[s]
        return before + need(dropped)

    def _cache(self, seq_id: int, pos_start: int) -> KVCache:
        """The sequence's cache, checked by _check_continues: a new one at position 0 (the least recently used goes
        beyond MAX_SEQUENCES; never one of the run's, which were all used just now), or one cut back to pos_start."""
        self._check_continues(SeqRun(seq_id, pos_start, 0))
        cache = self._caches.get(seq_id)
        if cache is None:
            cache = self._caches[seq_id] = self._new_cache()
            while len(self._caches) > MAX_SEQUENCES:
                self._caches.popitem(last=False)
        self._caches.move_to_end(seq_id)
        if pos_start < cache.n_past:  # the coordinator went back (a truncate it did not tell us about)
            cache.truncate(pos_start)
        return cache

    def _on_device(self) -> Any:
        if self.cuda_device is None:
            return contextlib.nullcontext()
        # cupy: optional, loaded only where a GPU is used
        import cupy

        return cupy.cuda.Device(self.cuda_device)

    def check_inputs(self, seqs: Sequence[SeqRun], state: Mapping[str, np.ndarray]) -> None:
        """Before anything is sized by a peer's run (the scratch estimate included): ValueError unless it names 1 to
        MAX_SEQUENCES distinct sequences, each of at least one token within the context, whose tokens are the rows
        of every per-token array, and the arrays have the model's widths; UnknownSequence unless each sequence
        starts a new one here (at position 0) or continues (or goes back in) one this segment holds."""
        if not 1 <= len(seqs) <= MAX_SEQUENCES:
            raise ValueError(f"a run holds 1 to {MAX_SEQUENCES} sequences, not {len(seqs)}")
        if len({s.seq_id for s in seqs}) != len(seqs):
            raise ValueError(f"a run names sequence {_repeated([s.seq_id for s in seqs])} twice")
        n_tokens = sum(s.n_tokens for s in seqs)
        rows = {k: int(v.shape[0]) for k, v in state.items() if k != "n_out" and getattr(v, "ndim", 0) >= 1}
        if len(rows) < len(state) - ("n_out" in state):
            raise ValueError(f"{', '.join(sorted(set(state) - set(rows) - {'n_out'}))} must have a row per token")
        if any(r != n_tokens for r in rows.values()):
            raise ValueError(f"{n_tokens} tokens do not fit the arrays' rows {rows}")
        n_ctx = self.program.n_ctx
        for s in seqs:
            if s.n_tokens < 1 or s.pos_start + s.n_tokens > n_ctx:
                raise ValueError(f"sequence {s.seq_id}: {s.n_tokens} tokens at position {s.pos_start} do not fit "
                                 f"the context of {n_ctx}")
        self._check_widths(state)
        if self._attn_layers:
            for s in seqs:
                self._check_continues(s)

    def _check_continues(self, s: SeqRun) -> None:
        cache = self._caches.get(s.seq_id)
        if cache is None and s.pos_start:
            raise UnknownSequence(f"sequence {s.seq_id} is unknown here but the tokens start at position "
                                  f"{s.pos_start} (a segment keeps {MAX_SEQUENCES} sequences, fewer when -m is "
                                  "short: the least recently used makes room)")
        if cache is not None and s.pos_start > cache.n_past:
            raise UnknownSequence(f"sequence {s.seq_id} holds {cache.n_past} positions; tokens cannot start at "
                                  f"{s.pos_start}")

    def run(self, seq_id: int, pos_start: int, n_tokens: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """run_batch for one sequence's tokens at pos_start.."""
        return self.run_batch([SeqRun(seq_id, pos_start, n_tokens)], state)

    def run_batch(self, seqs: Sequence[SeqRun], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the ops on the pass state (see DeepSeek2.run_op) for the sequences' tokens, their rows one sequence
        after another; the state after. The sequences come from a peer: check_inputs refuses them (ValueError,
        UnknownSequence) before anything is sized by them."""
        self.check_inputs(seqs, state)
        with self._on_device(), activations(self.program.int8):
            caches = [self._cache(s.seq_id, s.pos_start) if self._attn_layers else None for s in seqs]
            for cache, s in zip(caches, seqs, strict=True):
                if cache is not None:
                    cache.reserve(s.n_tokens)
            positions = batch_positions([s.pos_start for s in seqs], [s.n_tokens for s in seqs])
            batch = Batch.of(caches, [s.n_tokens for s in seqs])
            xp = self.net.xp
            state = {k: xp.asarray(v) if k in DEVICE_STATE else v for k, v in state.items()}
            try:
                for op in self.program.ops:
                    self.net.run_op(op, state, positions, batch)
            finally:
                drop_tile_scratch()  # counted for this run only (run_scratch_bytes)
            for cache, s in zip(caches, seqs, strict=True):
                if cache is not None:
                    cache.advance(s.n_tokens)
            return {k: to_host(v) for k, v in state.items()} if xp is not np else state

    def _check_widths(self, state: Mapping[str, np.ndarray]) -> None:
        """Hidden states as wide as the model's, routing of n_experts_per_tok distinct experts per token, float64
        for w alone: the scratch counted before the run (run_scratch_bytes) holds for these only."""
        c = self.program.cfg
        widths = {"x": c.hidden_size, "h": c.hidden_size, "shared": c.hidden_size, "y": c.hidden_size,
                  "idx": getattr(c, "n_experts_per_tok", 0), "w": getattr(c, "n_experts_per_tok", 0)}
        for name, width in widths.items():
            a = state.get(name)
            if a is not None and tuple(a.shape[1:]) != (width,):
                raise ValueError(f"{name} has shape {list(a.shape)}; the model's rows have {width} values")
        wide = sorted(k for k, v in state.items() if getattr(v, "dtype", None) == np.float64 and k != "w")
        if wide:  # the scratch counted holds for 4-byte floats; only a split layer's routing weights are wider
            raise ValueError(f"{', '.join(wide)} may not be float64 (only w, a split layer's routing weights)")
        idx = state.get("idx")
        if idx is not None and idx.shape[1] > 1 and idx.size:
            ordered = np.sort(np.asarray(idx), axis=1)
            if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != NO_EXPERT)).any():
                raise ValueError("idx names an expert twice for one token")

    def kv(self, op: str, seq_id: int, n: int) -> int:
        """Clear or truncate a sequence's cache; its length after."""
        cache = self._caches.get(seq_id)
        if cache is None:
            return 0
        if op == "clear":
            cache.clear()
        else:
            cache.truncate(min(n, cache.n_past))
        return cache.n_past

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self._caches.values())

    @property
    def kv_reserved_bytes(self) -> int:
        return program_kv_bytes(self.program)

    @property
    def kv_accounted_bytes(self) -> int:
        """What the worker's memory limit counts for this segment's caches."""
        return max(self.kv_reserved_bytes, self.kv_bytes)


def _repeated(values: Sequence[int]) -> int:
    return next(v for k, v in enumerate(values) if v in values[:k])



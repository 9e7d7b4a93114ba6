"""Placement: a pure planner mapping every tensor to a device by llama.cpp's --rpc, -ot, -ngl and -ts rules."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from engine.errors import IkctlError

DeviceKind = Literal["cpu", "rpc", "cuda"]
Op = tuple[int, str]  # (layer, part); part is one of OP_PARTS
OP_PARTS = ("embd", "attn", "ffn", "moe_experts", "output")

CPU = "CPU"
_ENDPOINT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):(?P<port>\d{1,5})")
_RPC_NAME = re.compile(r"RPC(?P<index>\d*)\[(?P<endpoint>[^\[\]]*)\]")
_CUDA_NAME = re.compile(r"CUDA\d+")
_LAYER = re.compile(r"blk\.(\d+)\.")
_EXPERTS = re.compile(r"ffn_(gate|up|down|gate_up)_exps\.")
# llama.cpp's LLM_TENSOR_LAYER_INPUT / _OUTPUT tensors (src/llama-arch.cpp, LLM_TENSOR_INFOS)
_INPUT_STEMS = frozenset({"token_embd", "pos_embd", "token_types"})
_OUTPUT_STEMS = frozenset({"output", "output_norm", "cls", "cls.output"})
_SIZE = re.compile(r"(?P<value>\d+(?:\.\d*)?)\s*(?P<unit>[A-Za-z]*)")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mi": 1 << 20,
          "mib": 1 << 20, "mb": 10**6, "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40,
          "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12}


class PlacementError(IkctlError):
    """Bad placement flags, or a plan that does not fit; overflow errors carry the numbers as fields."""

    def __init__(self, message: str, device: str | None = None, need_bytes: int | None = None,
                 capacity_bytes: int | None = None) -> None:
        super().__init__(message)
        self.device = device
        self.need_bytes = need_bytes
        self.capacity_bytes = capacity_bytes


class TensorLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def n_bytes(self) -> int: ...


# ---- inputs ------------------------------------------------------------------------------------------------


def parse_endpoint(text: str) -> str:
    """`host:port` checked (a port in 1..65535; IPv6 hosts in brackets), returned stripped."""
    text = text.strip()
    m = _ENDPOINT.fullmatch(text)
    if m is None:
        raise PlacementError(f"'{text}' is not host:port (e.g. 192.168.1.20:50052)")
    if not 0 < int(m["port"]) < 65536:
        raise PlacementError(f"'{text}': port {m['port']} is not in 1..65535")
    return text


def parse_rpc(text: str) -> list[str]:
    """`--rpc h1:p1,h2:p2` as endpoints, in order (the order -ts indexes)."""
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or not all(items):
        raise PlacementError(f"--rpc '{text}' needs host:port[,host:port...] with no empty entry")
    try:
        endpoints = [parse_endpoint(s) for s in items]
    except PlacementError as e:
        raise PlacementError(f"--rpc {e}") from None
    dup = next((e for i, e in enumerate(endpoints) if e in endpoints[:i]), None)
    if dup is not None:
        raise PlacementError(f"--rpc lists {dup} twice; each worker is one device")
    return endpoints


def parse_tensor_split(text: str) -> list[float]:
    """`-ts 3,1` (or `3/1`, as llama.cpp splits on `,` and `/`) as non-negative proportions."""
    out = []
    for item in re.split(r"[,/]+", text.strip()):
        try:
            value = float(item)
        except ValueError:
            raise PlacementError(f"-ts '{text}': '{item}' is not a number (e.g. -ts 3,1)") from None
        if not math.isfinite(value) or value < 0:
            raise PlacementError(f"-ts '{text}': {item} must be a finite proportion >= 0")
        out.append(value)
    return out


def device_name(text: str) -> str:
    """A device as -ot/--device-mem name it: `CPU`, `CUDA<n>` or `RPC[host:port]`.

    Mainline llama.cpp now names RPC devices `RPC<n>[host:port]` (device n of a server); an ikctl
    worker owns one device, so `RPC0[host:port]` is accepted as `RPC[host:port]`."""
    if text == CPU or _CUDA_NAME.fullmatch(text):
        return text
    m = _RPC_NAME.fullmatch(text)
    if m is None:
        hint = f" (did you mean {text.upper()}?)" if text.upper() == CPU or _CUDA_NAME.fullmatch(text.upper()) else ""
        raise PlacementError(f"unknown device '{text}'{hint}: a device is CPU, CUDA0, CUDA1... or RPC[host:port]")
    if m["index"] not in ("", "0"):
        raise PlacementError(f"'{text}': an ikctl worker owns one device; start one rpcnode per device and "
                             f"name it RPC[{m['endpoint']}]")
    return f"RPC[{parse_endpoint(m['endpoint'])}]"


@dataclass(frozen=True)
class Device:
    """One place tensors can live. `capacity_bytes` None: unknown (not checked)."""

    name: str
    kind: DeviceKind
    capacity_bytes: int | None = None

    def __post_init__(self) -> None:
        expected = {"cpu": "CPU", "rpc": "RPC[host:port]", "cuda": "CUDA<n>"}.get(self.kind)
        if expected is None:
            raise PlacementError(f"device {self.name}: kind '{self.kind}' is not cpu, rpc or cuda")
        if device_name(self.name) != self.name or _kind_of(self.name) != self.kind:
            raise PlacementError(f"a {self.kind} device is named {expected}, not '{self.name}'")
        if self.capacity_bytes is not None and self.capacity_bytes < 0:
            raise PlacementError(f"device {self.name}: capacity {self.capacity_bytes} bytes is negative")


def _kind_of(name: str) -> DeviceKind:
    return "cpu" if name == CPU else "rpc" if name.startswith("RPC") else "cuda"


@dataclass(frozen=True)
class OverrideRule:
    """One `-ot REGEX=DEV`: tensors whose name the regex finds (std::regex_search semantics) go to DEV.

    Python's `re` stands in for std::regex's ECMAScript grammar; they agree on what -ot patterns use
    (`.`, `\\.`, `[0-9]`, `(a|b)`, `{m,n}`, anchors)."""

    pattern: str
    device: str
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pattern:
            raise PlacementError(f"-ot '={self.device}' has an empty regex; write REGEX={self.device}")
        try:
            regex = re.compile(self.pattern)
        except re.error as e:
            raise PlacementError(f"-ot '{self}': '{self.pattern}' is not a valid regex ({e})") from None
        try:
            device = device_name(self.device)
        except PlacementError as e:
            raise PlacementError(f"-ot '{self}': {e}") from None
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "regex", regex)

    @classmethod
    def parse(cls, text: str) -> OverrideRule:
        """One `REGEX=DEV`; split at the last `=` (device names have none), so the regex may hold `=`."""
        pattern, eq, dev = text.rpartition("=")
        if not eq:
            raise PlacementError(f"-ot '{text}' needs REGEX=DEV (e.g. -ot exps=CPU)")
        return cls(pattern, dev)

    def matches(self, tensor_name: str) -> bool:
        return self.regex.search(tensor_name) is not None

    def __str__(self) -> str:
        return f"{self.pattern}={self.device}"


def parse_override(text: str) -> list[OverrideRule]:
    """One -ot value. Like llama.cpp it may list several rules (`a=CPU,b=RPC[h:p]`); a comma splits only
    after a complete `=DEV`, so regexes such as `blk\\.[0-9]{1,2}\\.` keep their commas."""
    rules, rest = [], text
    while True:
        m = re.match(r"(.+?=(?:CPU|CUDA\d+|RPC\d*\[[^\[\]]*\])),(?=.+=)", rest)
        if m is None:
            rules.append(OverrideRule.parse(rest))
            return rules
        rules.append(OverrideRule.parse(m[1]))
        rest = rest[m.end():]


def parse_size(text: str) -> int:
    """`512MiB`, `8G`, `1.5GiB`, `1000000`: K/M/G/T and KiB... are powers of 1024, KB/MB... of 1000."""
    m = _SIZE.fullmatch(text.strip())
    unit = _UNITS.get(m["unit"].lower()) if m else None
    if m is None or unit is None:
        raise PlacementError(f"'{text}' is not a size (e.g. 512MiB, 24GiB, 1000000)")
    return int(float(m["value"]) * unit)


def parse_device_mem(text: str) -> tuple[str, int]:
    """`--device-mem DEV=SIZE`, e.g. `RPC[10.0.0.2:50052]=48GiB`: a capacity to plan against offline."""
    dev, eq, size = text.rpartition("=")
    if not eq or not dev:
        raise PlacementError(f"--device-mem '{text}' needs DEV=SIZE (e.g. RPC[127.0.0.1:50052]=512MiB)")
    try:
        return device_name(dev), parse_size(size)
    except PlacementError as e:
        raise PlacementError(f"--device-mem '{text}': {e}") from None


@dataclass(frozen=True)
class PlacementRules:
    """The flags, as llama.cpp means them. Sequences are stored as tuples."""

    override_tensor: Sequence[OverrideRule] = ()
    n_gpu_layers: int = 0
    tensor_split: Sequence[float] | None = None
    rpc: Sequence[str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "override_tensor", tuple(self.override_tensor))
        object.__setattr__(self, "rpc", tuple(self.rpc))
        if self.tensor_split is not None:
            object.__setattr__(self, "tensor_split", tuple(self.tensor_split))

    @classmethod
    def from_flags(cls, override_tensor: Iterable[str] = (), n_gpu_layers: int = 0,
                   tensor_split: str | None = None, rpc: str | None = None) -> PlacementRules:
        """The rules from flag strings as typed on a command line."""
        rules = [r for text in override_tensor for r in parse_override(text)]
        return cls(rules, n_gpu_layers, parse_tensor_split(tensor_split) if tensor_split else None,
                   parse_rpc(rpc) if rpc else ())


def devices_for(rpc: Sequence[str], capacities: Mapping[str, int] | None = None) -> list[Device]:
    """CPU plus one device per --rpc endpoint, with the capacities given (e.g. by --device-mem)."""
    devices = [Device(CPU, "cpu"), *(Device(f"RPC[{ep}]", "rpc") for ep in rpc)]
    caps = dict(capacities or {})
    names = [d.name for d in devices]
    unknown = [n for n in caps if n not in names]
    if unknown:
        raise PlacementError(f"--device-mem names {unknown[0]}, which is not a device here ({', '.join(names)}); "
                             "add its endpoint to --rpc")
    return [Device(d.name, d.kind, caps.get(d.name)) for d in devices]


# ---- tensor names ------------------------------------------------------------------------------------------


def tensor_layer(name: str) -> int | None:
    """The repeating layer (`blk.N.`) a tensor belongs to; None for input/output/global tensors."""
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def _stem(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    return base if suffix in ("weight", "bias") else name


def op_part(name: str) -> str | None:
    """The op whose weights the tensor is: embd, attn, ffn, moe_experts or output (None: no op of ikctl's)."""
    stem = _stem(name)
    if stem in _INPUT_STEMS:
        return "embd"
    if stem in _OUTPUT_STEMS:
        return "output"
    m = _LAYER.match(name)
    if m is None:
        return None
    rest = name[m.end():]
    if rest.startswith("attn_"):
        return "attn"
    if _EXPERTS.match(rest):
        return "moe_experts"
    if rest.startswith(("ffn_", "exp_probs_b")):
        return "ffn"
    return None


def layer_ops(names: Iterable[str], n_layers: int) -> list[Op]:
    """The forward pass as ops in order: (-1, embd), per layer attn, ffn (+ moe_experts), (n_layers, output)."""
    parts = {(tensor_layer(n), op_part(n)) for n in names}
    ops: list[Op] = [(-1, "embd")]
    for i in range(n_layers):
        ops += [(i, p) for p in ("attn", "ffn", "moe_experts") if (i, p) in parts]
    return [*ops, (n_layers, "output")]


# ---- the plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Consecutive ops whose weights sit on one device: one round trip when the device is remote."""

    device: str
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Placement:
    """Where each tensor goes and why; byte totals per device (every device listed, in the given order)."""

    devices: tuple[Device, ...]
    n_layers: int
    device_of: dict[str, str]
    reason_of: dict[str, str]
    bytes_of: dict[str, int]
    bytes_per_device: dict[str, int]
    warnings: tuple[str, ...] = ()

    def tensors_on(self, device: str) -> list[str]:
        return [n for n, d in self.device_of.items() if d == device]

    def layers_of(self, device: str) -> list[int]:
        """Repeating layers with at least one tensor on the device."""
        return sorted({i for n in self.tensors_on(device) if (i := tensor_layer(n)) is not None})

    def explain(self, name: str) -> str:
        """`blk.12.ffn_up_exps.weight → RPC[10.0.0.2:50052] by rule 3 (-ot exps=RPC[10.0.0.2:50052])`."""
        if name not in self.device_of:
            raise PlacementError(f"no tensor named '{name}' in this plan")
        reason = self.reason_of[name]
        how = f"by {reason}" if reason.startswith("rule ") else f"({reason})"
        return f"{name} → {self.device_of[name]} {how}"

    def overflows(self) -> list[tuple[str, int, int]]:
        """(device, need_bytes, capacity_bytes) for each device whose known capacity is exceeded."""
        return [(d.name, self.bytes_per_device[d.name], d.capacity_bytes) for d in self.devices
                if d.capacity_bytes is not None and self.bytes_per_device[d.name] > d.capacity_bytes]

    def check_capacity(self) -> None:
        over = self.overflows()
        if over:
            parts = [f"{dev} would hold {format_bytes(need)} but has {format_bytes(cap)}" for dev, need, cap in over]
            dev, need, cap = over[0]
            raise PlacementError("; ".join(parts) + "; move tensors elsewhere with -ot or lower -ngl",
                                 device=dev, need_bytes=need, capacity_bytes=cap)

    def segments(self, ops: Sequence[Op]) -> list[Segment]:
        """Group consecutive ops by the device of their weights. An op whose weights span two devices is an
        error in v1. (i, "ffn") covers the layer's experts too unless (i, "moe_experts") is its own op."""
        own_experts = {i for i, p in ops if p == "moe_experts"}
        weights: dict[tuple[int | None, str], list[str]] = {}
        for name in self.device_of:
            part, layer = op_part(name), tensor_layer(name)
            if part == "moe_experts" and layer not in own_experts:
                part = "ffn"
            if part is not None:
                weights.setdefault((layer, part), []).append(name)
        out: list[Segment] = []
        for layer, part in ops:
            names = weights.get((None if part in ("embd", "output") else layer, part), [])
            device = self._op_device((layer, part), names)
            if out and out[-1].device == device:
                out[-1] = Segment(device, (*out[-1].ops, (layer, part)))
            else:
                out.append(Segment(device, ((layer, part),)))
        return out

    def _op_device(self, op: Op, names: list[str]) -> str:
        layer, part = op
        if part not in OP_PARTS:
            raise PlacementError(f"op {op}: part '{part}' is not one of {', '.join(OP_PARTS)}")
        if not names:
            raise PlacementError(f"op (layer {layer}, {part}) has no weights in this model")
        devices = {self.device_of[n] for n in names}
        if len(devices) > 1:
            first = {self.device_of[n]: n for n in reversed(names)}
            where = ", ".join(f"{n} on {d}" for d, n in first.items())
            raise PlacementError(f"op (layer {layer}, {part}) has weights on {len(devices)} devices ({where}); "
                                 "ikctl runs an op where its weights are, so keep them together with -ot")
        return devices.pop()


def _records(tensors: Iterable[TensorLike | tuple[str, int]]) -> list[tuple[str, int]]:
    out = []
    for t in tensors:
        name, n_bytes = t if isinstance(t, tuple) else (t.name, t.n_bytes)
        out.append((str(name), int(n_bytes)))
    return out


def _offload_devices(devices: Sequence[Device], rules: PlacementRules) -> list[Device]:
    """llama.cpp's model device list: RPC devices first, in --rpc order, then local GPUs (src/llama.cpp)."""
    by_name = {d.name: d for d in devices}
    rpc_names = [f"RPC[{ep}]" for ep in rules.rpc]
    missing = [n for n in rpc_names if n not in by_name]
    if missing:
        raise PlacementError(f"--rpc lists {missing[0][4:-1]} but no device {missing[0]} was given")
    extra = [d.name for d in devices if d.kind == "rpc" and d.name not in rpc_names]
    if extra:
        raise PlacementError(f"device {extra[0]} is not in --rpc ({', '.join(rules.rpc) or 'empty'})")
    return [by_name[n] for n in rpc_names] + [d for d in devices if d.kind == "cuda"]


def _split_points(offload: Sequence[Device], tensor_split: Sequence[float] | None) -> tuple[list[float], str]:
    """Cumulative, normalised split points in float32 as llama.cpp computes them, and how they were chosen."""
    if tensor_split is not None and len(tensor_split) > len(offload):
        names = ", ".join(d.name for d in offload) or "none"
        raise PlacementError(f"-ts has {len(tensor_split)} values but there {'is' if len(offload) == 1 else 'are'} "
                             f"{len(offload)} RPC/GPU device{'' if len(offload) == 1 else 's'} ({names}; RPC "
                             "devices come first, in --rpc order)")
    given = list(tensor_split or []) + [0.0] * (len(offload) - len(tensor_split or []))
    if any(given):
        weights, how = given, "-ts " + ",".join(f"{v:g}" for v in tensor_split or [])
    elif all(d.capacity_bytes for d in offload):
        # llama.cpp splits by each device's free memory when -ts is absent or all zero
        weights, how = [float(d.capacity_bytes or 0) for d in offload], "capacity split (no -ts)"
    else:
        weights, how = [1.0] * len(offload), "even split (no -ts, capacities unknown)"
    acc, points = np.float32(0), []
    for w in weights:
        acc = np.float32(acc + np.float32(w))
        points.append(acc)
    return [float(np.float32(p / acc)) for p in points], how


def _validate(records: list[tuple[str, int]], n_layers: int, devices: Sequence[Device], rules: PlacementRules) -> None:
    names = [d.name for d in devices]
    if names.count(CPU) != 1 or len(set(names)) != len(names):
        raise PlacementError(f"devices must be unique and include CPU exactly once, got {', '.join(names)}")
    if n_layers < 0:
        raise PlacementError(f"the model's layer count {n_layers} is negative")
    if rules.n_gpu_layers < 0:
        raise PlacementError(f"-ngl {rules.n_gpu_layers} must be >= 0 (use a large number such as 99 for all layers)")
    for k, rule in enumerate(rules.override_tensor, 1):
        if rule.device not in names:
            hint = " (add its endpoint to --rpc)" if rule.device.startswith("RPC[") else ""
            raise PlacementError(f"-ot rule {k} ({rule}): unknown device {rule.device}{hint}; devices here: "
                                 f"{', '.join(names)}")
    seen: set[str] = set()
    for name, n_bytes in records:
        layer = tensor_layer(name)
        if name in seen:
            raise PlacementError(f"tensor '{name}' is listed twice")
        if n_bytes < 0:
            raise PlacementError(f"tensor '{name}' has a negative size ({n_bytes} bytes)")
        if layer is not None and layer >= n_layers:
            raise PlacementError(f"tensor '{name}' is in layer {layer}, past the model's {n_layers} layers")
        seen.add(name)


def plan(tensors: Iterable[TensorLike | tuple[str, int]], n_layers: int, devices: Sequence[Device],
         rules: PlacementRules, check_capacity: bool = True) -> Placement:
    """Place every tensor, as llama.cpp's load_tensors would (src/llama-model.cpp):

    1. the first -ot rule whose regex the name matches (std::regex_search) decides;
    2. else input tensors (token_embd) stay on CPU;
    3. else with -ngl N the last N repeating layers, and the output layer when N > n_layers, go to the
       offload devices (RPC first, then GPUs): layer il goes to the first device whose cumulative -ts
       split point is > (il - first offloaded layer) / offloaded count;
    4. else CPU.
    With check_capacity, a device whose known capacity is exceeded is a PlacementError.
    """
    records = _records(tensors)
    _validate(records, n_layers, devices, rules)
    offload = _offload_devices(devices, rules)
    points, how = _split_points(offload, rules.tensor_split)
    ngl = rules.n_gpu_layers
    first = max(n_layers - ngl, 0)
    n_active = min(ngl, n_layers + 1) if offload else 0

    def layer_place(il: int, what: str) -> tuple[str, str]:
        if first <= il < first + n_active:
            dev = offload[bisect.bisect_right(points, float(np.float32(il - first) / np.float32(n_active)))].name
            return dev, f"-ngl {ngl}: {what} → {dev} by {how}"
        if ngl == 0:
            return CPU, "default: CPU"
        if not offload:
            return CPU, f"-ngl {ngl} but no GPU or RPC device: CPU"
        if il == n_layers:
            return CPU, f"-ngl {ngl} ≤ {n_layers} layers: output layer stays on CPU"
        return CPU, f"-ngl {ngl} offloads layers {first}-{n_layers - 1}: {what} stays on CPU"

    device_of, reason_of, used = {}, {}, set()
    for name, _ in records:
        rule_no = next((k for k, r in enumerate(rules.override_tensor, 1) if r.matches(name)), None)
        layer, stem = tensor_layer(name), _stem(name)
        if rule_no is not None:
            rule = rules.override_tensor[rule_no - 1]
            used.add(rule_no)
            dev, reason = rule.device, f"rule {rule_no} (-ot {rule})"
        elif layer is not None:
            dev, reason = layer_place(layer, f"layer {layer}")
        elif stem in _OUTPUT_STEMS:
            dev, reason = layer_place(n_layers, "output layer")
        elif stem in _INPUT_STEMS:
            dev, reason = CPU, f"{stem} stays on CPU"
        else:
            dev, reason = CPU, "default: CPU (not in a layer)"
        device_of[name], reason_of[name] = dev, reason
    bytes_per_device = {d.name: 0 for d in devices}
    for name, n_bytes in records:
        bytes_per_device[device_of[name]] += n_bytes
    placement = Placement(tuple(devices), n_layers, device_of, reason_of, dict(records), bytes_per_device,
                          tuple(_warnings(rules, offload, used, bytes_per_device)))
    if check_capacity:
        placement.check_capacity()
    return placement


def _warnings(rules: PlacementRules, offload: Sequence[Device], used: set[int],
              bytes_per_device: Mapping[str, int]) -> list[str]:
    out = []
    if rules.n_gpu_layers > 0 and not offload:
        out.append(f"-ngl {rules.n_gpu_layers} has no effect: there is no GPU or RPC device (add --rpc host:port)")
    for k, rule in enumerate(rules.override_tensor, 1):
        if k not in used:
            out.append(f"-ot rule {k} ({rule}) placed no tensor: no name matches, or an earlier rule took them")
    for d in offload:
        if bytes_per_device[d.name] == 0:
            out.append(f"{d.name} holds no tensor; place some with -ngl or -ot")
    return out


# ---- display -----------------------------------------------------------------------------------------------


def format_bytes(n_bytes: int) -> str:
    """Binary units, one decimal: `812.4 MiB`."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{n_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ranges(layers: Sequence[int]) -> str:
    spans: list[list[int]] = []
    for i in layers:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _layers_column(placement: Placement, device: str) -> str:
    names = placement.tensors_on(device)
    parts = ["embd"] if any(op_part(n) == "embd" for n in names) else []
    if layers := placement.layers_of(device):
        parts.append(_ranges(layers))
    if any(op_part(n) == "output" for n in names):
        parts.append("output")
    return " ".join(parts) or "-"


def format_table(placement: Placement, devices: Sequence[Device] | None = None) -> str:
    """The per-device table: tensors, bytes, capacity and use where known, and the layers it holds."""
    devices = devices or placement.devices
    width = max(len("device"), *(len(d.name) for d in devices))
    head = f"{'device':<{width}}  {'tensors':>7}  {'bytes':>10}  {'capacity':>10}  {'use':>5}  layers"
    lines = [head, "-" * len(head)]
    for d in devices:
        n = len(placement.tensors_on(d.name))
        need = placement.bytes_per_device.get(d.name, 0)
        cap = "-" if d.capacity_bytes is None else format_bytes(d.capacity_bytes)
        use = "-" if not d.capacity_bytes else f"{100 * need / d.capacity_bytes:.0f}%"
        lines.append(f"{d.name:<{width}}  {n:>7}  {format_bytes(need):>10}  {cap:>10}  {use:>5}  "
                     f"{_layers_column(placement, d.name)}")
    total = sum(placement.bytes_per_device.values())
    lines.append(f"{'total':<{width}}  {len(placement.device_of):>7}  {format_bytes(total):>10}")
    return "\n".join(lines)

"""Placement: a pure planner mapping every tensor to a device by llama.cpp's --rpc, -ot, -ngl and -ts rules."""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.byte_sizes import format_bytes
from engine.forward_pass import Op
from engine.placement_rules import (  # noqa: F401  (re-exported: callers import the planner's inputs from here)
    CPU,
    Device,
    DeviceKind,
    OverrideRule,
    PlacementError,
    PlacementRules,
    device_kind,
    device_name,
    devices_for,
    parse_device_mem,
    parse_endpoint,
    parse_override,
    parse_rpc,
    parse_tensor_split,
)
from rpcnode.protocol import rpc_device

OP_PARTS = ("embd", "attn", "ffn", "moe_experts", "output")

_LAYER = re.compile(r"blk\.(\d+)\.")
_EXPERTS = re.compile(r"ffn_(gate|up|down|gate_up)_exps\.")
# llama.cpp's LLM_TENSOR_LAYER_INPUT / _OUTPUT tensors (src/llama-arch.cpp, LLM_TENSOR_INFOS)
_INPUT_STEMS = frozenset({"token_embd", "pos_embd", "token_types"})
_OUTPUT_STEMS = frozenset({"output", "output_norm", "cls", "cls.output"})


class TensorLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def n_bytes(self) -> int: ...


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
class ExpertSlice:
    """Experts [first, first + count) of a layer's expert tensors, held by one device."""

    device: str
    first: int
    count: int

    @property
    def stop(self) -> int:
        return self.first + self.count


def split_experts(n_experts: int, devices: Sequence[str], shares: Sequence[float] | None = None,
                  ) -> tuple[ExpertSlice, ...]:
    """Contiguous expert ranges in device order, sized by the shares (even without them): range i ends at
    round(n_experts * (shares up to i) / total). Every device gets at least one expert."""
    weights = [float(w) for w in shares] if shares else [1.0] * len(devices)
    total, acc, bounds = sum(weights), 0.0, [0]
    for w in weights:
        acc += w
        bounds.append(round(n_experts * acc / total))
    slices = tuple(ExpertSlice(d, a, b - a) for d, a, b in zip(devices, bounds, bounds[1:], strict=False))
    empty = next((s.device for s in slices if s.count < 1), None)
    if empty is not None:
        how = "shares " + ",".join(f"{w:g}" for w in weights) if shares else "an even split"
        raise PlacementError(f"{n_experts} experts over {len(devices)} devices by {how} leave {empty} none; "
                             "list fewer devices or give it a larger share")
    return slices


@dataclass(frozen=True)
class Segment:
    """Consecutive ops whose weights sit on one device: one round trip when the device is remote. A layer's
    routed experts split over several devices are a segment of their own, `experts` naming each device's range
    (`device` is then the first of them)."""

    device: str
    ops: tuple[Op, ...]
    experts: tuple[ExpertSlice, ...] = ()


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
    kv_bytes_per_device: dict[str, int] = field(default_factory=dict)  # the KV cache of the -c context
    # what a worker's segment programs keep besides weights and KV (engine.segments.program_host_bytes)
    program_bytes_per_device: dict[str, int] = field(default_factory=dict)
    # expert tensors split over several devices (device_of names the first): each device's range
    experts_of: dict[str, tuple[ExpertSlice, ...]] = field(default_factory=dict)

    def need_bytes(self, device: str) -> int:
        """Weights, KV cache and segment programs: what the device must hold."""
        return (self.bytes_per_device.get(device, 0) + self.kv_bytes_per_device.get(device, 0)
                + self.program_bytes_per_device.get(device, 0))

    def devices_of(self, name: str) -> tuple[str, ...]:
        """The devices holding a tensor (several for split experts)."""
        split = self.experts_of.get(name)
        return tuple(s.device for s in split) if split else (self.device_of[name],)

    def tensors_on(self, device: str) -> list[str]:
        """Tensors with bytes on the device (split expert tensors on each device holding a range)."""
        return [n for n in self.device_of if device in self.devices_of(n)]

    def devices_used(self) -> set[str]:
        return {d for n in self.device_of for d in self.devices_of(n)}

    def layers_of(self, device: str) -> list[int]:
        """Repeating layers with at least one tensor on the device."""
        return sorted({i for n in self.tensors_on(device) if (i := tensor_layer(n)) is not None})

    def explain(self, name: str) -> str:
        """`blk.12.ffn_up_exps.weight → RPC[10.0.0.2:50052] by rule 3 (-ot exps=RPC[10.0.0.2:50052])`."""
        if name not in self.device_of:
            raise PlacementError(f"no tensor named '{name}' in this plan")
        reason = self.reason_of[name]
        how = f"by {reason}" if reason.startswith("rule ") else f"({reason})"
        split = self.experts_of.get(name)
        where = ", ".join(f"{_expert_range(s)} on {s.device}" for s in split) if split else self.device_of[name]
        return f"{name} → {where} {how}"

    def overflows(self) -> list[tuple[str, int, int]]:
        """(device, need_bytes, capacity_bytes) for each device whose known capacity is exceeded."""
        return [(d.name, self.need_bytes(d.name), d.capacity_bytes) for d in self.devices
                if d.capacity_bytes is not None and self.need_bytes(d.name) > d.capacity_bytes]

    def check_capacity(self) -> None:
        over = self.overflows()
        if over:
            parts = [f"{dev} would hold {format_bytes(need)}{self._kv_note(dev)} but has {format_bytes(cap)}"
                     for dev, need, cap in over]
            dev, need, cap = over[0]
            raise PlacementError("; ".join(parts) + "; move tensors elsewhere with -ot or lower -ngl",
                                 device=dev, need_bytes=need, capacity_bytes=cap)

    def _kv_note(self, device: str) -> str:
        kv, programs = self.kv_bytes_per_device.get(device, 0), self.program_bytes_per_device.get(device, 0)
        if not kv and not programs:
            return ""
        parts = [f"{format_bytes(self.bytes_per_device[device])} weights",
                 *([f"{format_bytes(kv)} KV cache for -c"] if kv else []),
                 *([f"{format_bytes(programs)} programs"] if programs else [])]
        return f" ({' + '.join(parts)})"

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
            split = self._op_split((layer, part), names)
            if split:
                out.append(Segment(device, ((layer, part),), split))
            elif out and out[-1].device == device and not out[-1].experts:
                out[-1] = Segment(device, (*out[-1].ops, (layer, part)))
            else:
                out.append(Segment(device, ((layer, part),)))
        return out

    def _op_split(self, op: Op, names: list[str]) -> tuple[ExpertSlice, ...]:
        """The expert ranges of an op whose expert tensors are split (all alike), else ()."""
        splits = {self.experts_of.get(n, ()) for n in names}
        if len(splits) > 1:
            raise PlacementError(f"op (layer {op[0]}, {op[1]}): its expert tensors are split differently "
                                 f"({', '.join(names)}); split them with one -ot rule")
        return splits.pop() if splits else ()

    def _op_device(self, op: Op, names: list[str]) -> str:
        layer, part = op
        if part not in OP_PARTS:
            raise PlacementError(f"op {op}: part '{part}' is not one of {', '.join(OP_PARTS)}")
        if not names:
            raise PlacementError(f"op (layer {layer}, {part}) has no weights in this model")
        if all(n in self.experts_of for n in names):
            return self.device_of[names[0]]
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
    rpc_names = [rpc_device(ep) for ep in rules.rpc]
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
        for device in rule.devices:
            if device not in names:
                hint = " (add its endpoint to --rpc)" if device_kind(device) == "rpc" else ""
                raise PlacementError(f"-ot rule {k} ({rule}): unknown device {device}{hint}; devices here: "
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
         rules: PlacementRules, check_capacity: bool = True, kv_bytes_per_layer: int = 0,
         program_bytes_per_layer: int = 0, n_experts: int = 0) -> Placement:
    """Place every tensor, as llama.cpp's load_tensors would (src/llama-model.cpp):

    1. the first -ot rule whose regex the name matches (std::regex_search) decides;
    2. else input tensors (token_embd) stay on CPU;
    3. else with -ngl N the last N repeating layers, and the output layer when N > n_layers, go to the
       offload devices (RPC first, then GPUs): layer il goes to the first device whose cumulative -ts
       split point is > (il - first offloaded layer) / offloaded count;
    4. else CPU.
    A rule naming several devices splits the expert tensors it matches along their first axis (n_experts) over
    them (split_experts). Each layer's KV cache (kv_bytes_per_layer: the whole -c context) counts on the device of
    its attention, and program_bytes_per_layer on each worker holding a part of the layer.
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

    device_of, reason_of, used, experts_of = {}, {}, set(), {}
    for name, _ in records:
        rule_no = next((k for k, r in enumerate(rules.override_tensor, 1) if r.matches(name)), None)
        layer, stem = tensor_layer(name), _stem(name)
        if rule_no is not None:
            rule = rules.override_tensor[rule_no - 1]
            used.add(rule_no)
            dev, reason = rule.devices[0], f"rule {rule_no} (-ot {rule})"
            if rule.split:
                experts_of[name] = _split_rule(rule_no, rule, name, n_experts)
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
        for s in experts_of.get(name, ()):
            bytes_per_device[s.device] += n_bytes // n_experts * s.count  # an expert's bytes: a whole share
        if name not in experts_of:
            bytes_per_device[device_of[name]] += n_bytes
    kv_per_device = {d.name: 0 for d in devices}
    if kv_bytes_per_layer:
        attn_device = {tensor_layer(n): device_of[n] for n, _ in records if op_part(n) == "attn"}
        for layer, dev in attn_device.items():
            if layer is not None:
                kv_per_device[dev] += kv_bytes_per_layer
    program_per_device = {d.name: 0 for d in devices}
    held = {(tensor_layer(n), s.device) for n, _ in records
            for s in experts_of.get(n, (ExpertSlice(device_of[n], 0, 1),))}
    for _layer, dev in held:
        if device_kind(dev) == "rpc":  # workers charge them to -m; this process's own are its business
            program_per_device[dev] += program_bytes_per_layer
    placement = Placement(tuple(devices), n_layers, device_of, reason_of, dict(records), bytes_per_device,
                          tuple(_warnings(rules, offload, used, bytes_per_device)), kv_per_device,
                          program_per_device, experts_of)
    if check_capacity:
        placement.check_capacity()
    return placement


def _split_rule(rule_no: int, rule: OverrideRule, name: str, n_experts: int) -> tuple[ExpertSlice, ...]:
    if op_part(name) != "moe_experts":
        raise PlacementError(f"-ot rule {rule_no} ({rule}) splits tensors over {len(rule.devices)} devices, which "
                             f"only expert tensors (ffn_*_exps) can be; {name} is not one: narrow the regex")
    if n_experts < 1:
        raise PlacementError(f"-ot rule {rule_no} ({rule}): {name} has no expert count to split")
    try:
        return split_experts(n_experts, rule.devices, rule.shares)
    except PlacementError as e:
        raise PlacementError(f"-ot rule {rule_no} ({rule}): {e}") from None


def _expert_range(s: ExpertSlice) -> str:
    return f"expert {s.first}" if s.count == 1 else f"experts {s.first}-{s.stop - 1}"


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
    kv = any(placement.kv_bytes_per_device.values())
    kv_head = f"  {'KV cache':>10}" if kv else ""
    head = f"{'device':<{width}}  {'tensors':>7}  {'bytes':>10}{kv_head}  {'capacity':>10}  {'use':>5}  layers"
    lines = [head, "-" * len(head)]
    for d in devices:
        n = len(placement.tensors_on(d.name))
        weights, need = placement.bytes_per_device.get(d.name, 0), placement.need_bytes(d.name)
        kv_cell = f"  {format_bytes(placement.kv_bytes_per_device.get(d.name, 0)):>10}" if kv else ""
        cap = "-" if d.capacity_bytes is None else format_bytes(d.capacity_bytes)
        use = "-" if not d.capacity_bytes else f"{100 * need / d.capacity_bytes:.0f}%"
        lines.append(f"{d.name:<{width}}  {n:>7}  {format_bytes(weights):>10}{kv_cell}  {cap:>10}  {use:>5}  "
                     f"{_layers_column(placement, d.name)}")
    total = sum(placement.bytes_per_device.values())
    kv_total = f"  {format_bytes(sum(placement.kv_bytes_per_device.values())):>10}" if kv else ""
    lines.append(f"{'total':<{width}}  {len(placement.device_of):>7}  {format_bytes(total):>10}{kv_total}")
    return "\n".join(lines)

"""Automatic placement (`--auto`): the placements a user would try by hand, each planned against the devices'
memory and its decode speed predicted from measured device speeds and links (engine.speed_model); the fastest that
fits wins. Pure: measuring the devices and links is the caller's (engine.measure).

Legend: a device's speed is GB of weights read per second while decoding, measured per GGML type; a model's
tensors are read at their type's speed, so a device's speed for a model is its per-type speeds weighted by the
bytes of each type one token reads (routed experts at K of E).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from engine.placement import Placement, PlacementError, layer_ops, plan, tensor_layer
from engine.placement_rules import CPU, OverrideRule, PlacementRules, devices_for
from engine.speed_model import Host, Link, ModelShape, Prediction, predict
from rpcnode.protocol import rpc_device

TIE = 0.02  # candidates predicted within 2% of the fastest count as equal: the simpler (earlier) one wins


@dataclass(frozen=True)
class TensorMeta:
    """What automatic placement needs of a tensor: its name, bytes and GGML type."""

    name: str
    n_bytes: int
    qtype: int


@dataclass(frozen=True)
class Measured:
    """The devices and links as measured: capacity in bytes (CPU: this machine's available memory), decode GB/s per
    GGML type, each worker's link, the software's cost per token, and where each device computes."""

    capacities: Mapping[str, int]
    gbps: Mapping[str, Mapping[int, float]]
    links: Mapping[str, Link]
    software_s: float = 0.0  # per token, beyond reading weights (the ops' Python, attention): on every placement
    hosts: Mapping[str, Host] = field(default_factory=dict)  # where each device computes (shared cores)


@dataclass(frozen=True)
class Candidate:
    """One placement weighed: its name, rules, and either its plan and predicted speed or why it cannot be used."""

    name: str
    rules: PlacementRules
    placement: Placement | None = None
    prediction: Prediction | None = None
    problem: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.prediction.tokens_per_s if self.prediction is not None else 0.0


@dataclass(frozen=True)
class AutoChoice:
    """The candidate chosen, every candidate weighed (those that fit fastest first, then those that do not), and
    why this one."""

    chosen: Candidate
    weighed: tuple[Candidate, ...]
    why: str
    measured: Measured | None = None  # what the candidates were weighed with


def model_gbps(per_type: Mapping[int, float], tensors: Sequence[TensorMeta], n_experts: int, n_used: int) -> float:
    """A device's decode speed for a model: total bytes one token reads over the time its types take. A type the
    device has no figure for is read at the mean of those it has."""
    known = [v for v in per_type.values() if v > 0]
    if not known:
        return 0.0
    fallback = sum(known) / len(known)
    total = seconds = 0.0
    for t in tensors:
        if "token_embd" in t.name:  # one row per token
            continue
        n = t.n_bytes * (n_used / n_experts if "_exps." in t.name and n_experts else 1.0)
        speed = per_type.get(t.qtype, 0.0) or fallback
        total += n
        seconds += n / speed
    return total / seconds if seconds else fallback


def _shares(devices: Sequence[str], weights: Mapping[str, float]) -> str:
    """`DEV:W,...` with weights rounded to 3 significant digits (what a user would type)."""
    return ",".join(f"{d}:{float(f'{max(weights[d], 1e-9):.3g}'):g}" for d in devices)


def _layer_ranges(layers: Sequence[int], weights: Sequence[float]) -> list[list[int]]:
    """Consecutive runs of `layers` in proportion to weights (each non-empty while there are layers enough)."""
    total = sum(weights)
    out, start, acc = [], 0, 0.0
    for k, w in enumerate(weights):
        acc += w
        stop = len(layers) if k == len(weights) - 1 else round(len(layers) * acc / total)
        stop = max(stop, min(start + 1, len(layers)))
        out.append(list(layers[start:stop]))
        start = stop
    return out


def _layers_regex(layers: Sequence[int]) -> str:
    return rf"^blk\.({'|'.join(str(i) for i in layers)})\.ffn_.*_exps"


def candidates(endpoints: Sequence[str], n_layers: int, moe_layers: Sequence[int], capacities: Mapping[str, int],
               speeds: Mapping[str, float]) -> list[tuple[str, PlacementRules]]:
    """The placements to weigh, simplest first: all here; each worker alone with the experts or every layer;
    layers split over the workers (by memory, llama.cpp's default, and by speed), and over this machine and the
    workers; experts split over the workers (expert parallel) and over this machine too, by speed; experts by
    layer ranges over the workers (by memory)."""
    workers = [rpc_device(ep) for ep in endpoints]
    every = n_layers + 1  # -ngl past the last layer takes the output layer too
    out: list[tuple[str, PlacementRules]] = [("all on this machine", PlacementRules())]
    for ep, dev in zip(endpoints, workers, strict=True):
        if moe_layers:
            out.append((f"experts on {dev}", PlacementRules([OverrideRule("exps", dev)], rpc=[ep])))
        out.append((f"every layer on {dev}", PlacementRules(n_gpu_layers=every, rpc=[ep])))
    if len(workers) > 1:
        out.append(("layers split over the workers by memory", PlacementRules(n_gpu_layers=every, rpc=endpoints)))
        out.append(("layers split over the workers by speed",
                    PlacementRules(n_gpu_layers=every, tensor_split=[speeds[d] for d in workers], rpc=endpoints)))
    if workers:
        mem = {d: float(capacities.get(d, 0)) for d in [CPU, *workers]}
        if all(mem.values()):  # this machine keeps the first layers, in proportion to its memory
            here = mem[CPU] / sum(mem.values())
            ngl = round(n_layers * (1 - here))
            if 1 <= ngl < n_layers:
                out.append((f"first {n_layers - ngl} layers here, the rest split over the workers by memory",
                            PlacementRules(n_gpu_layers=ngl, rpc=endpoints)))
    if moe_layers and len(workers) > 1:
        out.append(("experts split over the workers by speed (expert parallel)",
                    PlacementRules([OverrideRule("exps", _shares(workers, speeds))], rpc=endpoints)))
        mem = {d: float(capacities.get(d, 0)) or 1.0 for d in workers}
        ranges = _layer_ranges(list(moe_layers), [mem[d] for d in workers])
        rules = [OverrideRule(_layers_regex(r), d) for r, d in zip(ranges, workers, strict=True) if r]
        out.append(("experts by layer ranges over the workers by memory", PlacementRules(rules, rpc=endpoints)))
    if moe_layers and workers:
        out.append(("experts split over this machine and the workers by speed",
                    PlacementRules([OverrideRule("exps", _shares([CPU, *workers], speeds))], rpc=endpoints)))
    return out


def choose(tensors: Sequence[TensorMeta], n_layers: int, shape: ModelShape, endpoints: Sequence[str],
           measured: Measured, kv_bytes_per_layer: int = 0, program_bytes_per_layer: int = 0) -> AutoChoice:
    """Weigh every candidate: plan it against the measured capacities (KV cache of the context and segment
    programs counted, as a load does) and predict its tokens/s; the fastest that fits (within TIE of the fastest,
    the simplest). PlacementError when none fits."""
    sizes = [(t.name, t.n_bytes) for t in tensors]
    devices = [CPU, *(rpc_device(ep) for ep in endpoints)]
    speeds = {d: model_gbps(measured.gbps.get(d, {}), tensors, shape.n_experts, shape.n_used) for d in devices}
    moe_layers = sorted({layer for t in tensors if "_exps." in t.name
                         for layer in [tensor_layer(t.name)] if layer is not None})
    ops = layer_ops([t.name for t in tensors], n_layers)
    weighed, seen = [], set()
    for name, rules in candidates(endpoints, n_layers, moe_layers, measured.capacities, speeds):
        caps = {d: c for d, c in measured.capacities.items() if d == CPU or d in {rpc_device(e) for e in rules.rpc}}
        try:
            placement = plan(sizes, n_layers, devices_for(rules.rpc, caps), rules,
                             kv_bytes_per_layer=kv_bytes_per_layer, program_bytes_per_layer=program_bytes_per_layer,
                             n_experts=shape.n_experts)
        except PlacementError as e:
            weighed.append(Candidate(name, rules, problem=str(e)))
            continue
        same = (tuple(placement.device_of.items()), tuple((n, tuple(x)) for n, x in placement.experts_of.items()))
        if same in seen:  # another name for a placement weighed already
            continue
        seen.add(same)
        if any(speeds[d] <= 0 for d in placement.devices_used()):
            slow = next(d for d in sorted(placement.devices_used()) if speeds[d] <= 0)
            weighed.append(Candidate(name, rules, placement, problem=f"{slow} has no measured speed"))
            continue
        p = predict(placement.segments(ops), shape, speeds, measured.links, hosts=measured.hosts)
        weighed.append(Candidate(name, rules, placement, replace(p, seconds=p.seconds + measured.software_s)))
    fits = [c for c in weighed if c.problem is None]
    if not fits:
        why = "; ".join(f"{c.name}: {c.problem}" for c in weighed[:3])
        raise PlacementError(f"--auto: no placement fits the devices' memory ({why})")
    best = max(c.tokens_per_s for c in fits)
    chosen = next(c for c in fits if c.tokens_per_s >= best * (1 - TIE))
    ranked = sorted(fits, key=lambda c: -c.tokens_per_s) + [c for c in weighed if c.problem is not None]
    others = [c for c in ranked if c is not chosen and c.problem is None]
    why = f"the fastest predicted of {len(fits)} that fit" + (
        f"; next: {others[0].name} at {others[0].tokens_per_s:.2f} t/s" if others else "")
    if chosen.tokens_per_s < best:
        why = f"within {TIE:.0%} of the fastest ({best:.2f} t/s) and simpler"
    return AutoChoice(chosen, tuple(ranked), why, measured)

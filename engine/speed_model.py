"""Predicted decode speed of a placement from each device's measured speed and each link's (pure arithmetic).

Legend: a device decodes at `gbps` (GB of weights read per second while decoding: bytes read per token over time
per token, measured); a link is a round-trip time and a bandwidth. One decoded token of one sequence visits the
segments of a pass in order (engine.forward_pass.run_pass):

- a segment on this machine costs the bytes its ops read over this machine's speed;
- a worker's segment costs a round trip, its bytes on the wire over the link, and its bytes over the worker's
  speed; while a worker runs a layer's routed experts alone, this machine runs the shared experts meanwhile;
- a layer whose experts are split over devices (expert parallel) costs the slowest contacted device's part (its
  round trip, wire and its selected experts' bytes), the devices working at once, and this machine's shared
  experts meanwhile; a device none of whose experts a token picked is not contacted;
- devices that would share cores (processes on one machine with more threads than cores: `hosts=`) do not
  work at once: their parts add up.

A token reads K of a MoE layer's E experts: which ones decides the split's cost, so that part is averaged over
routings drawn uniformly (a fixed seed: the prediction is a pure function of its inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.forward_pass import Op
from engine.placement import CPU, Segment, op_part, tensor_layer
from engine.placement_rules import device_kind

MESSAGE_BYTES = 200  # a request's and its reply's frame headers and metadata
ROUTINGS = 4000  # routings averaged for a split layer


@dataclass(frozen=True)
class Link:
    """A worker's link: round-trip time, bandwidth, and what a round trip costs beyond them (framing, both sides'
    Python: measured as the time per round trip beyond the worker's compute, less RTT and wire time)."""

    rtt_s: float
    bytes_per_s: float
    overhead_s: float = 0.0


@dataclass(frozen=True)
class ModelShape:
    """What one decoded token reads: bytes per op (a MoE layer's routed experts at K of E; its ffn op without
    the shared experts), the shared experts' bytes per layer, one expert's bytes per layer, the hidden size, K and
    E, the vocabulary (logits on the wire)."""

    op_bytes: Mapping[Op, float]
    shared_bytes: Mapping[int, float]
    expert_bytes: Mapping[int, float]
    hidden: int
    n_used: int
    n_experts: int
    n_vocab: int


@dataclass(frozen=True)
class Prediction:
    seconds: float  # per token
    round_trips: float  # per token (a split layer: one per contacted device)
    wire_bytes: float  # per token, both directions

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds


def model_shape(tensor_bytes: Mapping[str, int], n_layers: int, n_experts: int, n_used: int, hidden: int,
                n_vocab: int) -> ModelShape:
    """A ModelShape from tensor name -> bytes (a GGUF's, or sizes computed for a model not at hand)."""
    ops: dict[Op, float] = {}
    shared: dict[int, float] = {}
    expert: dict[int, float] = {}
    for name, n in tensor_bytes.items():
        part, layer = op_part(name), tensor_layer(name)
        if part is None or part == "embd":  # the embedding reads one row per token
            continue
        key: Op = (n_layers if layer is None else layer, part)
        if part == "moe_experts" and layer is not None:
            expert[layer] = expert.get(layer, 0.0) + n / n_experts
            n = n * n_used / n_experts
        elif part == "ffn" and layer is not None and "_shexp." in name:  # counted where they run (predict)
            shared[layer] = shared.get(layer, 0.0) + n
            continue
        ops[key] = ops.get(key, 0.0) + n
    return ModelShape(ops, shared, expert, hidden, n_used, n_experts, n_vocab)


def _seconds(nbytes: float, gbps: float) -> float:
    return nbytes / (gbps * 1e9)


def _wire(seg: Segment, shape: ModelShape, wide: bool = False) -> float:
    """Bytes of one run of a worker's segment for one token, both ways."""
    D, K = shape.hidden, shape.n_used
    if seg.ops[0][1] == "moe_experts":  # h, idx and w out; y back (a split part's float64)
        out, back = 4 * D + 8 * K + (8 if wide else 4) * K, (8 if wide else 4) * D
    else:
        out, back = (8 if seg.ops[0][1] == "embd" else 4 * D), 4 * D
    if any(p == "output" for _, p in seg.ops):
        back = 4 * shape.n_vocab
    return out + back + MESSAGE_BYTES


@dataclass(frozen=True)
class Host:
    """Where a device computes: its machine (an identity), that machine's cores, the device's threads."""

    machine: str
    cores: int
    threads: int


def crowded(devices: Sequence[str], hosts: Mapping[str, Host]) -> bool:
    """Whether these devices, computing at once, would share cores: on one machine with more threads than cores."""
    known = [hosts[d] for d in devices if d in hosts]
    return (len(known) > 1 and len({h.machine for h in known}) == 1
            and sum(h.threads for h in known) > known[0].cores)


def predict(segments: Sequence[Segment], shape: ModelShape, gbps: Mapping[str, float],
            links: Mapping[str, Link], seed: int = 0, hosts: Mapping[str, Host] | None = None) -> Prediction:
    """Seconds, round trips and wire bytes per decoded token of one sequence (see the module's docstring).
    `hosts`: where each device computes; devices that would share cores (crowded) work one after the other."""
    rng = np.random.default_rng(seed)
    hosts = hosts or {}

    def together(t: float, shared: float, device: str) -> float:
        """A worker's part and this machine's shared experts meanwhile: at once, unless they share cores."""
        return t + shared if crowded([CPU, device], hosts) else max(t, shared)
    # the layers whose shared experts run here while workers run the routed ones (forward_pass's defer)
    overlapped = {s.ops[0][0] for s in segments
                  if s.experts or (device_kind(s.device) == "rpc" and s.ops == ((s.ops[0][0], "moe_experts"),))}
    seconds = trips = wire = 0.0
    for seg in segments:
        layer = seg.ops[0][0]
        if seg.experts:
            shared = _seconds(shape.shared_bytes.get(layer, 0.0), gbps[CPU])
            t, n, w = _split_layer(seg, shape, gbps, links, rng, hosts)
            busy = [x.device for x in seg.experts if x.device != CPU]
            seconds += t + shared if crowded([CPU, *busy], hosts) else max(t, shared)
            trips += n
            wire += w
            continue
        nbytes = sum(shape.op_bytes.get(op, 0.0) for op in seg.ops) + sum(
            shape.shared_bytes.get(i, 0.0) for i, p in seg.ops if p == "ffn" and i not in overlapped)
        if device_kind(seg.device) != "rpc":
            seconds += _seconds(nbytes, gbps[seg.device])
            continue
        link = links[seg.device]
        w = _wire(seg, shape)
        t = link.rtt_s + link.overhead_s + w / link.bytes_per_s + _seconds(nbytes, gbps[seg.device])
        if len(seg.ops) == 1 and seg.ops[0][1] == "moe_experts":  # the shared experts run here meanwhile
            t = together(t, _seconds(shape.shared_bytes.get(layer, 0.0), gbps[CPU]), seg.device)
        seconds += t
        trips += 1
        wire += w
    return Prediction(seconds, trips, wire)


def _split_layer(seg: Segment, shape: ModelShape, gbps: Mapping[str, float], links: Mapping[str, Link],
                 rng: np.random.Generator, hosts: Mapping[str, Host]) -> tuple[float, float, float]:
    """Mean over routings of (the slowest contacted device's seconds, devices contacted, wire bytes); devices that
    would share cores add their compute, the longest of their round trips standing for theirs."""
    layer = seg.ops[0][0]
    devices = [x.device for x in seg.experts]
    group = {d: "crowded" if crowded(devices, hosts) and d in hosts else d for d in devices}
    picks = np.argsort(rng.random((ROUTINGS, shape.n_experts)), axis=1)[:, : shape.n_used]
    compute: dict[str, np.ndarray] = {}
    fixed: dict[str, np.ndarray] = {}
    trips = wire = 0.0
    for part in seg.experts:
        n = ((picks >= part.first) & (picks < part.stop)).sum(axis=1)
        g = group.get(part.device, part.device)
        compute[g] = compute.get(g, 0.0) + _seconds(shape.expert_bytes.get(layer, 0.0), gbps[part.device]) * n
        contacted = n > 0
        if device_kind(part.device) == "rpc":
            link = links[part.device]
            w = _wire(Segment(part.device, seg.ops), shape, wide=True)
            fixed[g] = np.maximum(fixed.get(g, 0.0), contacted * (link.rtt_s + link.overhead_s + w / link.bytes_per_s))
            trips += float(contacted.mean())
            wire += w * float(contacted.mean())
    total = np.zeros(ROUTINGS)
    for g, t in compute.items():
        total = np.maximum(total, t + fixed.get(g, 0.0))
    return float(total.mean()), trips, wire

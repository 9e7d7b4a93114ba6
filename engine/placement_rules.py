"""The inputs of placement: devices, and llama.cpp's --rpc, -ot, -ngl, -ts and size flags parsed into rules."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.byte_sizes import SizeError, parse_size
from engine.errors import IkctlError
from rpcnode.endpoint import Endpoint, EndpointError
from rpcnode.protocol import rpc_device

DeviceKind = Literal["cpu", "rpc", "cuda"]

CPU = "CPU"
_RPC_NAME = re.compile(r"RPC(?P<index>\d*)\[(?P<endpoint>[^\[\]]*)\]")
_CUDA_NAME = re.compile(r"CUDA\d+")


class PlacementError(IkctlError):
    """Bad placement flags, or a plan that does not fit; overflow errors carry the numbers as fields."""

    def __init__(self, message: str, device: str | None = None, need_bytes: int | None = None,
                 capacity_bytes: int | None = None) -> None:
        super().__init__(message)
        self.device = device
        self.need_bytes = need_bytes
        self.capacity_bytes = capacity_bytes



def parse_endpoint(text: str) -> Endpoint:
    """`host:port` checked (a port in 1..65535; IPv6 hosts in brackets), stripped; a PlacementError if not."""
    try:
        return Endpoint(text)
    except EndpointError as e:
        raise PlacementError(str(e)) from None


def parse_rpc(text: str) -> list[Endpoint]:
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
    return rpc_device(parse_endpoint(m['endpoint']))


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
        if device_name(self.name) != self.name or device_kind(self.name) != self.kind:
            raise PlacementError(f"a {self.kind} device is named {expected}, not '{self.name}'")
        if self.capacity_bytes is not None and self.capacity_bytes < 0:
            raise PlacementError(f"device {self.name}: capacity {self.capacity_bytes} bytes is negative")


def device_kind(name: str) -> DeviceKind:
    """What a device name (CPU, CUDA<n>, RPC[host:port]; see device_name) names."""
    return "cpu" if name == CPU else "rpc" if name.startswith("RPC") else "cuda"


_DEVICE = r"(?:CPU|CUDA\d+|RPC\d*\[[^\[\]]*\])"
_SHARE = rf"({_DEVICE})(?::([^,=\[\]]*))?"  # a device, and its share of a split with `:W`
_DEVICE_LIST = re.compile(rf"{_SHARE}(?:,{_SHARE})*")


def parse_shares(text: str) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """`DEV` or `DEV1,DEV2[,...]` with optional `:W` shares (`RPC[a:50052]:3,RPC[b:50052]:1`): the devices and
    their weights (None when no share is given: an even split)."""
    devices, weights = [], []
    for m in re.finditer(_SHARE, text):
        devices.append(device_name(m[1]))
        if m[2] is not None:
            try:
                w = float(m[2])
            except ValueError:
                raise PlacementError(f"'{m[0]}': the share after ':' must be a number (e.g. RPC[a:50052]:3)") from None
            if not math.isfinite(w) or w <= 0:
                raise PlacementError(f"'{m[0]}': a device's share must be a finite number > 0")
            weights.append(w)
    if weights and len(weights) != len(devices):
        raise PlacementError(f"'{text}': give every device a share (DEV:W) or none (an even split)")
    dup = next((d for k, d in enumerate(devices) if d in devices[:k]), None)
    if dup is not None:
        raise PlacementError(f"'{text}' lists {dup} twice")
    return tuple(devices), tuple(weights) if weights else None


@dataclass(frozen=True)
class OverrideRule:
    """One `-ot REGEX=DEV`: tensors whose name the regex finds (std::regex_search semantics) go to DEV.

    `REGEX=DEV1,DEV2[,...]` splits expert tensors (ffn_*_exps) along the expert axis over the devices: evenly, or
    by the shares given as `DEV:W` (ikctl's extension: llama.cpp places a tensor on one device). Python's `re`
    stands in for std::regex's ECMAScript grammar; they agree on what -ot patterns use (`.`, `\\.`, `[0-9]`,
    `(a|b)`, `{m,n}`, anchors)."""

    pattern: str
    device: str  # as written: one device, or the split's list
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    devices: tuple[str, ...] = field(init=False, repr=False, compare=False)
    shares: tuple[float, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pattern:
            raise PlacementError(f"-ot '={self.device}' has an empty regex; write REGEX={self.device}")
        try:
            regex = re.compile(self.pattern)
        except re.error as e:
            raise PlacementError(f"-ot '{self}': '{self.pattern}' is not a valid regex ({e})") from None
        try:
            if _DEVICE_LIST.fullmatch(self.device) is None:
                device_name(self.device)  # names what is wrong with it
                raise PlacementError(f"'{self.device}' is not a device or a list of devices")
            devices, shares = parse_shares(self.device)
        except PlacementError as e:
            raise PlacementError(f"-ot '{self}': {e}") from None
        written = [f"{d}:{w:g}" for d, w in zip(devices, shares, strict=True)] if shares else list(devices)
        object.__setattr__(self, "device", ",".join(written))
        object.__setattr__(self, "regex", regex)
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "shares", shares)

    @property
    def split(self) -> bool:
        """Whether the rule splits expert tensors over several devices."""
        return len(self.devices) > 1

    @classmethod
    def parse(cls, text: str) -> OverrideRule:
        """One `REGEX=DEV`; split at the `=` before the device list (device names have none), so the regex may
        hold `=`."""
        m = re.fullmatch(rf"(.+)=((?:{_DEVICE_LIST.pattern}))", text)
        if m is not None:
            return cls(m[1], m[2])
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
    after a complete `=DEV` (or `=DEV1,DEV2` list), so regexes such as `blk\\.[0-9]{1,2}\\.` keep their commas."""
    rules, rest = [], text
    while True:
        m = re.match(rf"(.+?=(?:{_DEVICE_LIST.pattern})),(?=.+=)", rest)
        if m is None:
            rules.append(OverrideRule.parse(rest))
            return rules
        rules.append(OverrideRule.parse(m[1]))
        rest = rest[m.end():]


def parse_device_mem(text: str) -> tuple[str, int]:
    """`--device-mem DEV=SIZE`, e.g. `RPC[10.0.0.2:50052]=48GiB`: a capacity to plan against offline."""
    dev, eq, size = text.rpartition("=")
    if not eq or not dev:
        raise PlacementError(f"--device-mem '{text}' needs DEV=SIZE (e.g. RPC[127.0.0.1:50052]=512MiB)")
    try:
        return device_name(dev), parse_size(size)
    except (PlacementError, SizeError) as e:
        raise PlacementError(f"--device-mem '{text}': {e}") from None


@dataclass(frozen=True)
class PlacementRules:
    """The flags, as llama.cpp means them. Sequences are stored as tuples."""

    override_tensor: Sequence[OverrideRule] = ()
    n_gpu_layers: int = 0
    tensor_split: Sequence[float] | None = None
    rpc: Sequence[Endpoint] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "override_tensor", tuple(self.override_tensor))
        object.__setattr__(self, "rpc", tuple(Endpoint(e) for e in self.rpc))
        if self.tensor_split is not None:
            object.__setattr__(self, "tensor_split", tuple(self.tensor_split))

    @classmethod
    def from_flags(cls, override_tensor: Iterable[str] = (), n_gpu_layers: int = 0,
                   tensor_split: str | None = None, rpc: str | None = None) -> PlacementRules:
        """The rules from flag strings as typed on a command line."""
        rules = [r for text in override_tensor for r in parse_override(text)]
        return cls(rules, n_gpu_layers, parse_tensor_split(tensor_split) if tensor_split else None,
                   parse_rpc(rpc) if rpc else ())

    def without(self, device: str) -> PlacementRules:
        """These rules with one device gone (failover re-plans with them): its endpoint leaves --rpc and its value
        leaves -ts (RPC devices come first there, in --rpc order); a rule listing it among others keeps the
        others (and their shares); a rule naming only it goes, so its tensors follow the next matching rule or
        the default, as if it had never been written."""
        gone = [k for k, ep in enumerate(self.rpc) if rpc_device(ep) == device]
        ts = self.tensor_split
        if ts is not None and gone and gone[0] < len(ts):
            ts = tuple(v for k, v in enumerate(ts) if k != gone[0]) or None
        rules = []
        for r in self.override_tensor:
            if device not in r.devices:
                rules.append(r)
                continue
            kept = [(d, r.shares[k] if r.shares else None) for k, d in enumerate(r.devices) if d != device]
            if kept:
                rules.append(OverrideRule(r.pattern, ",".join(d if w is None else f"{d}:{w:g}" for d, w in kept)))
        rpc = [ep for k, ep in enumerate(self.rpc) if k not in gone]
        return PlacementRules(rules, self.n_gpu_layers, ts, rpc)

    def options(self) -> dict[str, Any]:
        """The rules as load_model keywords (rpc, override_tensor, n_gpu_layers, tensor_split)."""
        return {"rpc": ",".join(self.rpc), "override_tensor": [str(r) for r in self.override_tensor],
                "n_gpu_layers": self.n_gpu_layers,
                "tensor_split": list(self.tensor_split) if self.tensor_split is not None else None}

    def flags(self) -> list[str]:
        """The rules as command-line flags (what a user would type to pin them)."""
        out = [f"--rpc {','.join(self.rpc)}"] if self.rpc else []
        out += [f'-ot "{r}"' for r in self.override_tensor]
        if self.n_gpu_layers:
            out.append(f"-ngl {self.n_gpu_layers}")
        if self.tensor_split is not None:
            out.append("-ts " + ",".join(f"{v:g}" for v in self.tensor_split))
        return out


def devices_for(rpc: Sequence[str], capacities: Mapping[str, int] | None = None,
                cuda: Sequence[Device] = ()) -> list[Device]:
    """CPU, one device per --rpc endpoint, then the local CUDA devices (engine.cuda.devices.planner_devices: their
    free memory as capacity), with the capacities given (e.g. by --device-mem) taking precedence."""
    devices = [Device(CPU, "cpu"), *(Device(rpc_device(ep), "rpc") for ep in rpc), *cuda]
    caps = dict(capacities or {})
    names = [d.name for d in devices]
    unknown = [n for n in caps if n not in names]
    if unknown:
        hint = "no such GPU here" if _CUDA_NAME.fullmatch(unknown[0]) else "add its endpoint to --rpc"
        raise PlacementError(f"--device-mem names {unknown[0]}, which is not a device here ({', '.join(names)}); "
                             f"{hint}")
    return [Device(d.name, d.kind, caps.get(d.name, d.capacity_bytes)) for d in devices]

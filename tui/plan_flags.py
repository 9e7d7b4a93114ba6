"""The placement form's text fields as one record: parse them into rules, devices and a plan."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.cuda.local import local_gpus
from engine.model import Options
from engine.placement import (
    Device,
    Placement,
    PlacementError,
    PlacementRules,
    TensorLike,
    devices_for,
    plan,
)
from engine.placement_spec import PlacementSpec, placement_spec
from tui.formatting import size_flag


@dataclass(frozen=True)
class ModelHeader:
    """What planning needs from a GGUF header: tensor names and sizes, the layer and routed expert counts."""

    name: str
    arch: str
    n_layers: int
    tensors: tuple[tuple[str, int], ...]
    n_experts: int = 0

    @classmethod
    def from_tensors(cls, name: str, arch: str, n_layers: int, tensors: Sequence[TensorLike],
                     n_experts: int = 0) -> ModelHeader:
        return cls(name, arch, n_layers, tuple((t.name, t.n_bytes) for t in tensors), n_experts)

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.tensors)


@dataclass(frozen=True)
class PlanFlags:
    """-ot (one rule per line), -ngl, -ts, --rpc and --device-mem (one or more DEV=SIZE, space/comma/newline
    separated) exactly as typed."""

    override_tensor: str = ""
    n_gpu_layers: str = "0"
    tensor_split: str = ""
    rpc: str = ""
    device_mem: str = ""

    @classmethod
    def from_rules(cls, rules: PlacementRules | None, capacities: Mapping[str, int] | None = None) -> PlanFlags:
        rules = rules or PlacementRules()
        ts = ",".join(f"{v:g}" for v in rules.tensor_split) if rules.tensor_split is not None else ""
        mem = " ".join(f"{dev}={size_flag(size)}" for dev, size in (capacities or {}).items())
        return cls("\n".join(str(r) for r in rules.override_tensor), str(rules.n_gpu_layers), ts,
                   ",".join(rules.rpc), mem)

    def ot_lines(self) -> list[str]:
        return [ln.strip() for ln in self.override_tensor.splitlines() if ln.strip()]

    def ngl(self) -> int:
        text = self.n_gpu_layers.strip() or "0"
        try:
            return int(text)
        except ValueError:
            raise PlacementError(f"-ngl '{text}' is not a whole number (e.g. -ngl 99)") from None

    def options(self, tokens: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The fields as load_model keywords (with the workers' tokens per endpoint, when given)."""
        out: dict[str, Any] = {"rpc": self.rpc.strip(), "override_tensor": self.ot_lines(), "n_gpu_layers": self.ngl(),
                               "tensor_split": self.tensor_split.strip() or None,
                               "device_mem": self.device_mem_items()}
        if tokens:
            out["rpc_token"] = dict(tokens)
        return out

    def spec(self, tokens: Mapping[str, str] | None = None) -> PlacementSpec:
        """The fields as a placement spec, built as a load builds it; a bad field is one PlacementError line."""
        return placement_spec(Options(**self.options(tokens)))

    def rules(self) -> PlacementRules:
        return self.spec().rules

    def device_mem_items(self) -> list[str]:
        return self.device_mem.replace(",", " ").split()

    def capacities(self) -> dict[str, int]:
        return dict(self.spec().given_capacities)

    def devices(self, rules: PlacementRules) -> list[Device]:
        return devices_for(rules.rpc, self.capacities(), local_gpus(rules))

    def plan(self, header: ModelHeader, check_capacity: bool = True) -> Placement:
        """The plan, or a PlacementError naming the bad flag (or, when checking, the device that overflows)."""
        rules = self.rules()
        return plan(header.tensors, header.n_layers, self.devices(rules), rules, check_capacity=check_capacity,
                    n_experts=header.n_experts)

    def command_line(self, model: str | None = None) -> str:
        """The `ikctl plan` command that gives the same plan, for copying into a terminal."""
        args = ["ikctl", "plan"] + (["-m", model] if model else [])
        if self.rpc.strip():
            args += ["--rpc", self.rpc.strip()]
        for line in self.ot_lines():
            args += ["-ot", line]
        if self.ngl():
            args += ["-ngl", str(self.ngl())]
        if self.tensor_split.strip():
            args += ["-ts", self.tensor_split.strip()]
        for item in self.device_mem_items():
            args += ["--device-mem", item]
        return shlex.join(args)

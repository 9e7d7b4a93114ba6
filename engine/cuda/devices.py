"""This machine's CUDA devices (name, total and free memory, from CuPy) and the `--device` names of a worker."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.cuda import device_count
from engine.errors import IkctlError
from engine.placement_rules import Device

_DEVICE_FLAG = re.compile(r"(?:cuda:?|CUDA)(?P<index>\d+)|cuda")


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_bytes: int
    free_bytes: int

    @property
    def planner_name(self) -> str:
        return f"CUDA{self.index}"


def list_devices() -> list[CudaDevice]:
    """Every visible CUDA device with its memory now; empty without CuPy or a GPU (never raises for that)."""
    n, _ = device_count()
    if n == 0:
        return []
    # cupy: optional, loaded only where a GPU is used
    import cupy

    out = []
    for i in range(n):
        with cupy.cuda.Device(i):
            free, total = cupy.cuda.runtime.memGetInfo()
        name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
        out.append(CudaDevice(i, name.decode() if isinstance(name, bytes) else str(name), int(total), int(free)))
    return out


def planner_devices(devices: list[CudaDevice] | None = None) -> list[Device]:
    """The CUDA devices as placement devices `CUDA<n>` whose capacity is their free memory (as llama.cpp splits
    layers by free memory when -ts is absent)."""
    found = list_devices() if devices is None else devices
    return [Device(d.planner_name, "cuda", d.free_bytes) for d in found]


def parse_device(text: str) -> int | None:
    """A worker's `--device`: None for `cpu`, else the CUDA index of `cuda:N` (also `cuda`, `cudaN`, `CUDAN`)."""
    text = text.strip()
    if text.lower() == "cpu":
        return None
    m = _DEVICE_FLAG.fullmatch(text)
    if m is None:
        raise IkctlError(f"--device '{text}' is not cpu or cuda:N (e.g. --device cuda:0)")
    return int(m["index"] or 0)

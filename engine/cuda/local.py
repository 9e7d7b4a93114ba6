"""Segments placed on this machine's GPUs (`CUDA<n>` in a plan) run in-process, weights uploaded from the GGUF map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.cuda.devices import planner_devices
from engine.placement import Device, PlacementRules, Segment
from engine.placement_rules import device_kind
from engine.segments import Program, SegmentRunner, TensorRef, op_tensor_names

if TYPE_CHECKING:
    from engine.gguf_file import GGUFFile
    from engine.model import Options


def is_cuda(device: str) -> bool:
    return device_kind(device) == "cuda"


def local_gpus(rules: PlacementRules) -> list[Device]:
    """This machine's GPUs as placement devices when the flags can place anything on one (-ngl, or an -ot rule
    naming CUDA<n>); else none, and the GPUs are not queried (that creates a CUDA context on each)."""
    if rules.n_gpu_layers > 0 or any(is_cuda(d) for r in rules.override_tensor for d in r.devices):
        return planner_devices()
    return []


def gpu_runners(gguf: GGUFFile, cfg: Any, segments: Sequence[Segment], opts: Options,
                n_ctx: int) -> dict[int, SegmentRunner]:
    """A SegmentRunner on its GPU for each CUDA segment, by segment index; tensors are named by themselves."""
    out = {}
    for k, seg in enumerate(segments):
        if not is_cuda(seg.device):
            continue
        names = [n for op in seg.ops for n in op_tensor_names(gguf.tensors, op, cfg.n_layers)]
        tensors: dict[str, TensorRef] = {n: (n, gguf.tensors[n].qtype, tuple(gguf.tensors[n].shape)) for n in names}
        program = Program(cfg, tuple(seg.ops), tensors, opts.mla, opts.amb << 20, opts.cache_type_k, n_ctx,
                          int8=not opts.float_activations)
        out[k] = SegmentRunner(program, lambda name: gguf.raw(name).reshape(-1).view(np.uint8),
                               cuda_device=int(seg.device[len("CUDA"):]))
    return out

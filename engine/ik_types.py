"""GGML quant types that only ik_llama.cpp writes (IQ*_K, *_KS, *_KT, Q6_0, Q8_KV, row-interleaved *_R4/_R8/_R16):
names and ids. Their geometry (and mainline's) is `rpcnode.ggml_types`, shared with the worker's GGUF table
reader, which does not import the engine.
"""

from __future__ import annotations

import gguf

from rpcnode.ggml_types import IK_TYPES, QuantType, quant_type

__all__ = ["IK_IDS", "IK_TYPES", "QuantType", "is_ik", "quant_type", "type_id", "type_name"]

IK_IDS: dict[str, int] = {t.name: i for i, t in IK_TYPES.items()}


def type_name(type_id: int) -> str:
    """A GGML type's name (Q4_K, IQ4_KS, ...); `type <id>` for an id neither table knows."""
    t = quant_type(int(type_id))
    return t.name if t is not None else f"type {type_id}"


def type_id(name: str) -> int:
    """The GGML type id of a name (mainline or ik_llama.cpp-only); KeyError for an unknown name."""
    if name in IK_IDS:
        return IK_IDS[name]
    return int(gguf.GGMLQuantizationType[name])


def is_ik(type_id: int) -> bool:
    return int(type_id) in IK_TYPES

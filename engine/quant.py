"""Weights kept in their GGUF encoding, used through dequantize-per-tile matrix products.

Legend: R rows (output features), C columns (input features), T tokens.
"""

from __future__ import annotations

from functools import cache

import gguf
import numpy as np

from engine import kernels
from engine.errors import ModelFileError
from engine.ik_types import is_ik, type_name

# Rows dequantized at once by the generic path: bounds the float32 scratch to ~16 MiB per tile.
_TILE_ELEMENTS = 1 << 22
# Fused numba kernels (engine.kernels) when True; the generic gguf-dequantize path is the baseline.
_use_kernels = True


def use_kernels(enabled: bool) -> None:
    """Choose the fused kernels (default) or the generic dequantize-per-tile path (for comparisons)."""
    global _use_kernels
    _use_kernels = enabled


def _fast(qtype: int) -> bool:
    if is_ik(qtype):  # ik_llama.cpp's types have no gguf-package decoder: the kernels' decoders are their only path
        return kernels.supports(qtype)
    if not _use_kernels:
        return False

    return kernels.supports(qtype)


@cache
def can_dequantize(qtype: int) -> bool:
    """Whether ikctl can decode this type: ik_llama.cpp's by engine.ik_decoders, the others by the gguf package
    (probed once on one zero block)."""
    if is_ik(qtype):
        return kernels.supports(qtype)
    t = gguf.GGMLQuantizationType(qtype)
    nbytes = gguf.GGML_QUANT_SIZES[t][1]
    if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    try:
        gguf.quants.dequantize(np.zeros((1, nbytes), np.uint8), t)
    except (NotImplementedError, KeyError, ValueError, TypeError):
        return False
    return True


def qtype_name(qtype: int) -> str:
    return type_name(qtype)


class QTensor:
    """A weight tensor in its on-disk encoding (memory-mapped, never copied to float32 whole).

    `shape` is the logical NumPy shape. `data` is the reader's array: float types carry the logical
    shape; quantized (and BF16) types are uint8 with the last axis in bytes.
    """

    __slots__ = ("data", "name", "qtype", "shape")

    def __init__(self, name: str, data: np.ndarray, qtype: int, shape: tuple[int, ...]) -> None:
        self.name = name
        self.data = data
        self.qtype = int(qtype)
        self.shape = tuple(int(s) for s in shape)
        if not can_dequantize(self.qtype):
            raise ModelFileError(
                f"tensor '{name}' has type {qtype_name(self.qtype)}, which ikctl cannot decode; "
                "requantize the model to a standard llama.cpp type (Q8_0, Q4_K, ...)"
            )

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> QTensor:
        """Wrap a float32 array (used for derived weights and tests)."""
        a = np.ascontiguousarray(array, dtype=np.float32)
        return cls(name, a, gguf.GGMLQuantizationType.F32, a.shape)

    @property
    def qtype_name(self) -> str:
        return qtype_name(self.qtype)

    @property
    def is_float32(self) -> bool:
        return self.qtype == gguf.GGMLQuantizationType.F32

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __getitem__(self, index: int) -> QTensor:
        """Slice the leading axis (an expert of a stacked expert tensor, a head)."""
        if len(self.shape) == 2 and kernels.group_rows(self.qtype) > 1:
            raise ValueError(f"{self.name}: one row of {self.qtype_name} is interleaved with others; take whole groups")
        return QTensor(f"{self.name}[{index}]", self.data[index], self.qtype, self.shape[1:])

    def dequantize(self) -> np.ndarray:
        """The whole tensor as float32 (for small tensors and tests; big ones go through matmul_t)."""
        if _fast(self.qtype) and not self.is_float32 and len(self.shape) >= 1:
            rows = int(np.prod(self.shape[:-1], dtype=np.int64))
            return kernels.dequantize_rows(self.data, self.qtype, (rows, self.shape[-1])).reshape(self.shape)
        return self._decode(self.data).reshape(self.shape)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Selected rows of a 2-D tensor as float32 [len(index), C] (embedding lookup)."""
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):  # token ids from a peer must not wrap
            raise ValueError(f"row ids {index.min()}..{index.max()} do not fit the {self.shape[0]} rows of {self.name}")
        g = kernels.group_rows(self.qtype)
        if g > 1:  # rows are stored g to a group: decode the groups that hold them
            groups = np.unique(index // g)
            raw_groups = self.data.reshape(-1, g, self.data.shape[-1])[groups].reshape(-1, self.data.shape[-1])
            decoded = kernels.dequantize_rows(raw_groups, self.qtype, (len(groups) * g, self.shape[-1]))
            at = np.searchsorted(groups, index // g) * g + index % g
            return decoded[at]
        raw = self.data[index]
        if _fast(self.qtype) and not self.is_float32:
            return kernels.dequantize_rows(raw, self.qtype, (len(index), self.shape[-1]))
        return self._decode(raw).reshape(len(index), self.shape[-1])

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for a 2-D W [R, C] and x [T, C] -> [T, R] float32, one row tile at a time."""
        R, C = self.shape
        x = np.asarray(x, dtype=np.float32)
        if self.is_float32:
            return x @ self.data.T
        if _fast(self.qtype):
            return kernels.matmul_t(self.data, self.qtype, (R, C), x)
        out = np.empty((x.shape[0], R), dtype=np.float32)
        step = max(1, _TILE_ELEMENTS // C)
        for r0 in range(0, R, step):
            w = self._decode(self.data[r0 : r0 + step]).reshape(-1, C)
            np.matmul(x, w.T, out=out[:, r0 : r0 + w.shape[0]])
        return out

    def gather_matmul_t(self, experts: np.ndarray, x: np.ndarray) -> np.ndarray:
        """For a stacked 3-D W [E, R, C]: row n of the result is x[n] @ W[experts[n]].T; x [N, C] -> [N, R]."""
        if _fast(self.qtype):
            return kernels.gather_matvec(self.data, self.qtype, self.shape, experts, x)  # type: ignore[arg-type]
        return np.concatenate([self[int(e)].matmul_t(x[n : n + 1]) for n, e in enumerate(experts)], axis=0)

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return np.asarray(raw, dtype=np.float32)
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return np.asarray(raw).astype(np.float32)
        return gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(self.qtype)).astype(
            np.float32, copy=False
        )

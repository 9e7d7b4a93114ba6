"""A memory-mapped GGUF file: metadata as plain Python values and a table of tensors.

The header is parsed here (GGUF v2/v3) rather than with `gguf.GGUFReader`, which builds a NumPy view per
vocabulary string (hundreds of MiB and seconds for a 130k vocabulary). Type ids and block sizes come from
engine.ik_types (the `gguf` package's table plus ik_llama.cpp's own types). Tensor data is never read at
load: arrays are views of one read-only memory map.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engine.errors import ModelFileError
from engine.ik_types import quant_type, type_name

_MISSING = object()
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
               12: "<f8"}
_STRING, _ARRAY = 8, 9
# Limits checked before anything is allocated from a header value.
_MAX_DIMS = 4
_MAX_STRING = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is the NumPy (row-major) shape, i.e. ggml's `ne` reversed."""

    name: str
    shape: tuple[int, ...]
    qtype: int  # GGML type id (engine.ik_types)
    n_bytes: int
    offset: int  # absolute file offset of the data

    @property
    def qtype_name(self) -> str:
        return type_name(self.qtype)


class _Truncated(Exception):
    pass


class _Cursor:
    """Reads little-endian GGUF header values from a memory map."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise _Truncated
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise ValueError(f"a string of {n} bytes at offset {self.pos}")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if count > len(self.buf):
                raise _Truncated
            if itype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[itype])
                arr = np.frombuffer(self.take(count * dt.itemsize), dtype=dt)
                return (arr != 0).tolist() if itype == 7 else arr.tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown metadata value type {vtype} at offset {self.pos}")


class GGUFFile:
    """A GGUF model file opened read-only; tensor data stays memory-mapped (never copied)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._map = _open_map(self.path)
        try:
            self._parse()
        except _Truncated:
            raise ModelFileError(
                f"{self.path} is truncated: its header ends past the end of the file ({len(self._map)} bytes); "
                "download it again"
            ) from None
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise ModelFileError(f"{self.path} is not a valid GGUF file ({e}); the file may be corrupt") from None
        self._data = np.frombuffer(self._map, dtype=np.uint8)

    def _parse(self) -> None:
        cur = _Cursor(self._map)
        cur.take(4)  # the magic, checked when the file was opened
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, ne, type_id, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        size = len(self._map)
        for name, ne, type_id, offset in infos:
            qt = quant_type(type_id)
            if qt is None:
                raise ModelFileError(
                    f"{self.path}: tensor '{name}' has type id {type_id}, unknown to ikctl (neither a llama.cpp nor "
                    "an ik_llama.cpp type); the file may be corrupt or need a newer ikctl"
                )
            if ne and ne[0] % qt.qk:
                raise ModelFileError(f"{self.path}: tensor '{name}' has rows of {ne[0]}, not a multiple of "
                                     f"{qt.name}'s block of {qt.qk}")
            n_rows = int(np.prod(ne[1:], dtype=np.int64))
            if n_rows % qt.group:
                raise ModelFileError(f"{self.path}: tensor '{name}' has {n_rows} rows, not a multiple of the "
                                     f"{qt.group} rows {qt.name} interleaves")
            n_bytes = n_rows * qt.row_bytes(ne[0] if ne else 1)
            at = start + offset
            if at + n_bytes > size:
                raise ModelFileError(
                    f"{self.path} is truncated: tensor '{name}' ends at byte {at + n_bytes} but the file has "
                    f"{size} bytes; download it again"
                )
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), int(type_id), n_bytes, at)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    @property
    def expert_count(self) -> int:
        """Routed experts per MoE layer (0: a dense model); what expert tensors split over devices divide."""
        return int(self.get(f"{self.architecture}.expert_count", 0))

    @property
    def file_bytes(self) -> int:
        return len(self._map)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value; without a default a missing key is a ModelFileError naming it."""
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is missing; the file is not a complete "
                                 f"{self.architecture or 'GGUF'} model")
        return default

    def raw(self, name: str) -> np.ndarray:
        """The tensor's data as a view of the memory map: float32/float16 arrays of the logical shape for
        F32/F16, otherwise uint8 with the last axis in bytes (the `gguf` reader's convention)."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFileError(f"{self.path}: tensor '{name}' is missing from the file")
        data = self._data[info.offset : info.offset + info.n_bytes]
        if info.qtype == gguf.GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(info.shape)
        if info.qtype == gguf.GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(info.shape)
        qt = quant_type(info.qtype)
        assert qt is not None  # checked when the header was read
        return data.reshape(*info.shape[:-1], qt.row_bytes(info.shape[-1]))


def _open_map(path: Path) -> mmap.mmap:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (check the -m path)")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from None

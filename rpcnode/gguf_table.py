"""A minimal reader of a GGUF file's tensor table (name, absolute data offset, byte size), independent of engine."""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

from rpcnode.ggml_types import quant_type

_MAGIC = b"GGUF"
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_STRING, _ARRAY = 8, 9
# Limits checked before a header value drives a loop or an allocation: the file is not trusted.
_MAX_DIMS = 4
_MAX_STRING = 1 << 24
_MAX_NESTING = 4
_MAX_ALIGNMENT = 1 << 20


class TableEntry(NamedTuple):
    """One tensor's bytes in the file: `nbytes` bytes from absolute offset `offset`."""

    name: str
    offset: int
    nbytes: int


class _Reader:
    """Little-endian reads at a cursor; reading past the end is a ValueError."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"the header ends past the end of the file (at byte {self.pos} + {n})")
        self.pos += n

    def unpack(self, fmt: str) -> int:
        start = self.pos
        self.skip(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise ValueError(f"a string of {n} bytes at byte {self.pos}")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype])
        elif vtype == _STRING:
            self.skip(self.unpack("<Q"))
        elif vtype == _ARRAY and depth < _MAX_NESTING:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALAR_BYTES:
                self.skip(count * _SCALAR_BYTES[itype])
                return
            if count > len(self.buf) - self.pos:  # each element takes at least one byte
                raise ValueError(f"an array of {count} elements at byte {self.pos}")
            for _ in range(count):
                self.skip_value(itype, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")


def read_tensor_table(path: str | os.PathLike[str]) -> list[TableEntry]:
    """The tensors of a GGUF v2/v3 file (mainline and ik_llama.cpp types); ValueError if the header is bad.

    Tensors of a type id no table knows are left out: their size cannot be computed (the engine refuses them).
    """
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        return _parse(_Reader(buf))


def _parse(r: _Reader) -> list[TableEntry]:
    r.skip(4)
    version = r.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > len(r.buf) or n_kv > len(r.buf):
        raise ValueError(f"the header claims {n_tensors} tensors and {n_kv} metadata keys")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = r.string(), r.unpack("<I")
        if key == "general.alignment" and vtype in _INT_FORMATS:
            alignment = r.unpack(_INT_FORMATS[vtype])
        else:
            r.skip_value(vtype)
    if not 0 < alignment <= _MAX_ALIGNMENT:
        raise ValueError(f"general.alignment = {alignment}")
    infos = [_tensor_info(r) for _ in range(n_tensors)]
    start = -(-r.pos // alignment) * alignment
    return [e for e in (_entry(info, start, len(r.buf)) for info in infos) if e is not None]


def _tensor_info(r: _Reader) -> tuple[str, list[int], int, int]:
    name = r.string()
    n_dims = r.unpack("<I")
    if n_dims > _MAX_DIMS:
        raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
    ne = [r.unpack("<Q") for _ in range(n_dims)]
    return name, ne, r.unpack("<I"), r.unpack("<Q")


def _entry(info: tuple[str, list[int], int, int], start: int, file_bytes: int) -> TableEntry | None:
    name, ne, type_id, offset = info
    qt = quant_type(type_id)
    if qt is None:
        return None
    cols = ne[0] if ne else 1
    if ne and cols % qt.qk:
        raise ValueError(f"tensor '{name}' has rows of {cols}, not a multiple of its block of {qt.qk}")
    rows = 1
    for n in ne[1:]:
        rows *= n
    if rows % qt.group:  # an interleaved type only holds whole groups of rows (as the engine checks)
        raise ValueError(f"tensor '{name}' has {rows} rows, not whole groups of {qt.group}")
    nbytes = rows * qt.row_bytes(cols)  # row headers (ik *_KS types) count once per row
    at = start + offset
    if at + nbytes > file_bytes:
        raise ValueError(f"tensor '{name}' ends at byte {at + nbytes} but the file has {file_bytes} bytes")
    return TableEntry(name, at, nbytes)

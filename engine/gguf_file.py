"""A memory-mapped GGUF file: metadata as plain Python values and a table of tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelFileError

_MISSING = object()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is the NumPy (row-major) shape, i.e. ggml's `ne` reversed."""

    name: str
    shape: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType value
    n_bytes: int
    offset: int  # absolute file offset of the data

    @property
    def qtype_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.qtype).name


class GGUFFile:
    """Reads a GGUF file with the `gguf` package; tensor data stays memory-mapped (never copied)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = field.contents()
        self._arrays: dict[str, np.ndarray] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(
                t.name, shape, int(t.tensor_type), int(t.n_bytes), int(t.data_offset)
            )
            self._arrays[t.name] = t.data

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value; without a default a missing key is a ModelFileError naming it."""
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise ModelFileError(f"{self.path}: metadata key '{key}' is missing; the file is not a complete "
                                 f"{self.architecture or 'GGUF'} model")
        return default

    def raw(self, name: str) -> np.ndarray:
        """The tensor's memory-mapped data as the gguf reader exposes it (no copy)."""
        try:
            return self._arrays[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: tensor '{name}' is missing from the file") from None


def _open_reader(path: Path):  # -> gguf.GGUFReader
    import gguf

    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (check the -m path)")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except ValueError as e:
        msg = str(e)
        if "GGMLQuantizationType" in msg:
            raise ModelFileError(
                f"{path} uses a tensor type the gguf reader does not know ({msg}); it is probably an "
                "ik_llama.cpp-only quant (IQ*_K, *_R4...) - requantize it with mainline llama.cpp types"
            ) from None
        raise ModelFileError(f"{path} is not a valid GGUF file ({msg}); the file may be truncated or corrupt") from None
    except (OSError, IndexError, EOFError) as e:
        raise ModelFileError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFileError(
                f"{path} is truncated: tensor '{t.name}' ends at byte {end} but the file has {size} bytes; "
                "download it again"
            )
    return reader

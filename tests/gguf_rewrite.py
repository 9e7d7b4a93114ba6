"""Test helper: copy a GGUF file with some metadata values or tensors replaced (to make broken inputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np


def rewrite_gguf(
    src: Path,
    dst: Path,
    meta: dict[str, Any] | None = None,
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """Write dst = src with `meta` keys replaced and `tensors` replaced by (raw data, type)."""
    meta = meta or {}
    tensors = tensors or {}
    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, meta.get("general.architecture", arch))
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = meta.get(key, field.contents())
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(key, value, field.types[0], sub)
    for t in r.tensors:
        if t.name in tensors:
            data, qtype = tensors[t.name]
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_shape=None if t.tensor_type <= 1 else t.data.shape,
                         raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst

"""The geometry of every GGML type a GGUF file may hold (mainline's from the gguf package, ik_llama.cpp's own
from the table here): enough to size a tensor's bytes, imported by both the engine and the worker's table reader.

Legend: C values per row, QK values per block, G rows per interleaved group.

Byte layout (ik_llama.cpp ggml.c type traits, `ggml_row_size`): a row is `meta` header bytes (a float or f16
row scale, *_KS / *_KT / Q8_KV types) followed by C / QK blocks. A row-interleaved type stores G consecutive
rows together, block column by block column: the G rows' bytes (G * row bytes) are one unit that only decodes
as a whole (into G rows of C values). The engine addresses such a tensor by groups: row r lives in group r // G.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf


@dataclass(frozen=True)
class QuantType:
    """A GGML type's geometry: `qk` values per `block_bytes`-byte block, `meta` bytes before each row's blocks,
    `group` rows interleaved together (1: plain rows)."""

    name: str
    qk: int
    block_bytes: int
    meta: int = 0
    group: int = 1

    def row_bytes(self, columns: int) -> int:
        """Bytes of one encoded row of `columns` values (ik_llama.cpp's ggml_row_size)."""
        return self.meta + columns // self.qk * self.block_bytes


# ik_llama.cpp-only ids (ggml/include/ggml.h) -> geometry (ggml/src/ggml.c type_traits, ggml-common.h blocks).
IK_TYPES: dict[int, QuantType] = {
    133: QuantType("Q6_0", 32, 26),
    137: QuantType("IQ2_K", 256, 76),
    138: QuantType("IQ3_K", 256, 110),
    139: QuantType("IQ4_K", 256, 144),
    140: QuantType("IQ5_K", 256, 176),
    141: QuantType("IQ6_K", 256, 212),
    144: QuantType("IQ4_KS", 256, 136, meta=4),
    145: QuantType("IQ2_KS", 256, 70, meta=2),
    146: QuantType("IQ4_KSS", 256, 128, meta=4),
    151: QuantType("Q8_KV", 32, 32, meta=8),
    152: QuantType("IQ5_KS", 256, 168, meta=4),
    153: QuantType("IQ2_KT", 256, 68, meta=4),
    154: QuantType("IQ3_KT", 256, 100, meta=4),
    155: QuantType("IQ4_KT", 256, 128, meta=4),
    156: QuantType("IQ3_KS", 256, 102, meta=2),
    157: QuantType("IQ2_KL", 256, 86, meta=2),
    158: QuantType("IQ1_KT", 256, 56, meta=4),
    202: QuantType("Q4_0_R8", 32, 18, group=8),
    206: QuantType("Q5_0_R4", 32, 22, group=4),
    208: QuantType("Q8_0_R8", 32, 34, group=8),
    210: QuantType("Q2_K_R4", 256, 84, group=4),
    211: QuantType("Q3_K_R4", 256, 110, group=4),
    212: QuantType("Q4_K_R4", 256, 144, group=4),
    213: QuantType("Q5_K_R4", 256, 176, group=4),
    214: QuantType("Q6_K_R4", 256, 210, group=4),
    216: QuantType("IQ2_XXS_R4", 256, 66, group=4),
    217: QuantType("IQ2_XS_R4", 256, 74, group=4),
    218: QuantType("IQ3_XXS_R4", 256, 98, group=4),
    219: QuantType("IQ1_S_R4", 32, 6, meta=2, group=4),
    220: QuantType("IQ4_NL_R4", 32, 18, group=4),
    221: QuantType("IQ3_S_R4", 256, 110, group=4),
    222: QuantType("IQ2_S_R4", 256, 82, group=4),
    223: QuantType("IQ4_XS_R8", 256, 136, group=8),
    229: QuantType("IQ1_M_R4", 32, 7, meta=2, group=4),
    230: QuantType("BF16_R16", 1, 2, group=16),
    233: QuantType("Q6_0_R4", 32, 26, group=4),
    337: QuantType("IQ2_K_R4", 256, 76, group=4),
    338: QuantType("IQ3_K_R4", 256, 110, group=4),
    339: QuantType("IQ4_K_R4", 256, 144, group=4),
    340: QuantType("IQ5_K_R4", 256, 176, group=4),
    344: QuantType("IQ4_KS_R4", 256, 136, meta=4, group=4),
    352: QuantType("IQ5_KS_R4", 256, 168, meta=4, group=4),
    398: QuantType("Q8_KV_R8", 32, 32, meta=4, group=8),
}


def quant_type(type_id: int) -> QuantType | None:
    """The geometry of a GGML type id (mainline via the gguf package, ik_llama.cpp's from IK_TYPES), or None."""
    if type_id in IK_TYPES:
        return IK_TYPES[type_id]
    try:
        t = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None
    qk, nbytes = gguf.GGML_QUANT_SIZES[t]
    return QuantType(t.name, qk, nbytes)

"""Fused dot kernels for ik_llama.cpp's row-interleaved lattice i-quants (IQ1_S_R4 ... IQ3_S_R4), read in their
stored layout (engine.block_dots).

These "grid" types store no value codes: each 8 (IQ1, IQ2) or 4 (IQ3) values are one index into a fixed table of
points (engine.iq_grids: 256 .. 2048 entries of small integers), times a scale, with signs from separate bits
(IQ2, IQ3) or a shift of +-1/8 (IQ1). A group's block column holds 4 rows' indices interleaved; row k's body
reads only its own (engine.iq_grid_decoders gives the layouts, the same expressions in float32).

Codes: each grid becomes an internal constant table in the LLVM module whose entries are the points already
shifted to unsigned bytes (IQ2/IQ3: point + 64; IQ1_S: point + 1; IQ1_M: 8 point + 8, its 1/8 shifts made
integers). One scalar load per index fetches a whole entry (an i64 of 8 bytes or an i32 of 4), and the loads
of 64 values are assembled into one <64 x i8> vector. A sign turns code 64 + p into 64 - p, a masked
subtract from 128 (the sign bits of 64 values form an i64 viewed as <64 x i1>), so every code stays in 0..127
and value = dl * (code - 64): the 64 goes to the bias as 64 * dl * the group's activation sum, as the other
kernels' zero points do. (AVX-512 gathers are no faster than scalar loads for 8 or 16 indices here.)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from engine.block_ir import (
    _F32,
    _I8,
    _I16,
    _I32,
    _I64,
    _accumulate,
    _Ctx,
    _row_loop,
    _values,
)
from engine.ik_decoders import IQ1_S_R4
from engine.iq_grids import IQ1S_GRID
from engine.simd_int8 import _fma4

_V64I8 = ir.VectorType(_I8, 64)
_V4F = ir.VectorType(_F32, 4)


def _table(c: _Ctx, name: str, entries: np.ndarray) -> ir.GlobalVariable:
    """The module's constant table `name`: one integer per row of entries (uint8 [N, 8 or 4], little-endian),
    emitted once per LLVM module (the row bodies of all token counts share it)."""
    module = c.b.module
    gv = module.globals.get(f"ikctl_grid_{name}")
    if gv is None:
        width = entries.shape[1]
        words = np.ascontiguousarray(entries, np.uint8).view(f"<u{width}").ravel()
        aty = ir.ArrayType(ir.IntType(8 * width), len(words))
        gv = ir.GlobalVariable(module, aty, f"ikctl_grid_{name}")
        gv.linkage = "internal"
        gv.global_constant = True
        gv.initializer = ir.Constant(aty, [int(w) for w in words])
        gv.align = 64
    return gv


def _lookup(c: _Ctx, table: ir.GlobalVariable, indices: list[ir.Value], per: int) -> ir.Value:
    """<64 x i8>: the table entries of the i64 indices one after another (per entries make 64 bytes; entries
    not given are zero)."""
    b = c.b
    ety = table.type.pointee.element
    vec = ir.Constant(ir.VectorType(ety, per), None)
    zero = ir.Constant(_I64, 0)
    for i, index in enumerate(indices):
        entry = b.load(b.gep(table, [zero, index], inbounds=True), align=ety.width // 8)
        vec = b.insert_element(vec, entry, ir.Constant(_I32, i))
    return b.bitcast(vec, _V64I8)


def _byte(c: _Ctx, o: ir.Value, at: int) -> ir.Value:
    """The byte at o + at as an i64."""
    return c.b.zext(c.load(c.src, c.off(o, at), _I8), _I64)


def _half_row_scale(c: _Ctx, k: int) -> ir.Value:
    """Row k's f16 scale from the group's header (the IQ1 types: the 4 rows' scales before the blocks)."""
    return c.half(c.off(c.head, 2 * k))


# ---- IQ1_S_R4: 32-value blocks, indices 11 bits, one scale and shift per block and row ------------------------

_IQ1S_CODES = (IQ1S_GRID.astype(np.int16) + 1).astype(np.uint8)  # -1, 0, 1 -> 0, 1, 2


def _iq1_s_r4_blocks(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int, pair: bool) -> None:
    """Row k of one or two IQ1_S_R4 block columns (24 bytes each: qs[16] @0, qh u16[4] @16). Per block, row k's
    qh word holds 3 high index bits per 8 values (bits 3i), a 3-bit scale s @12 and the shift's sign @15:
    value = d_k (2 s + 1) (point + shift), shift = +-1/8 for all 32 values, so code = point + 1 and the block's
    bias is dl (shift - 1) times its activation sums."""
    b = c.b
    table = _table(c, "iq1s", _IQ1S_CODES)
    d = _half_row_scale(c, k)
    indices, dls, offsets = [], [], []
    for blk in range(2 if pair else 1):
        ob = c.off(o, 24 * blk)
        qh = b.zext(c.load(c.src, c.off(ob, 16 + 2 * k), _I16), _I64)
        for i in range(4):
            high = b.shl(b.and_(b.lshr(qh, ir.Constant(_I64, 3 * i)), ir.Constant(_I64, 7)), ir.Constant(_I64, 8))
            indices.append(b.or_(_byte(c, ob, 4 * i + k), high))
        s = b.and_(b.lshr(qh, ir.Constant(_I64, 12)), ir.Constant(_I64, 7))
        dl = b.fmul(d, b.uitofp(b.add(b.shl(s, ir.Constant(_I64, 1)), ir.Constant(_I64, 1)), _F32))
        negative = b.icmp_unsigned("!=", b.and_(qh, ir.Constant(_I64, 0x8000)), ir.Constant(_I64, 0))
        dls.append(dl)
        offsets.append(b.fmul(dl, b.select(negative, ir.Constant(_F32, -1.125), ir.Constant(_F32, -0.875))))
    w = _lookup(c, table, indices, 8)
    zero = ir.Constant(_F32, 0.0)

    def per_group(v: list[ir.Value]) -> ir.Value:  # <4 x f32>: a block's value for each of its 2 groups
        second = v[1] if pair else zero
        return b.insert_element(b.insert_element(b.insert_element(b.insert_element(
            ir.Constant(_V4F, None), v[0], ir.Constant(_I32, 0)), v[0], ir.Constant(_I32, 1)),
            second, ir.Constant(_I32, 2)), second, ir.Constant(_I32, 3))

    dl4, off4 = per_group(dls), per_group(offsets)
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl4, c.load(c.xd, x, _V4F, 4)))
        b.store(_fma4(b, off4, c.load(c.xs, x, _V4F, 4), b.load(accb[t])), accb[t])
    _accumulate(c, w, _values(c, xg, 0), scales, [lane // 4 for lane in range(16)], acc)


def _iq1_row(qtype: int, blocks):
    """A row function of a 32-value-block type: two blocks (64 values) a step, a lone last block alone."""

    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        def pair(c, o, xg, acc, accb):
            blocks(c, o, xg, acc, accb, k, True)

        def lone(c, o, xg, acc, accb):
            blocks(c, o, xg, acc, accb, k, False)

        _row_loop(context, builder, sig, args, n_tok, qtype, pair, 4, per_step=2, tail=lone)

    return row


ROWS = {
    IQ1_S_R4: _iq1_row(IQ1_S_R4, _iq1_s_r4_blocks),
}

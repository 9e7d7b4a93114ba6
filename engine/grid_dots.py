"""Fused dot kernels for ik_llama.cpp's row-interleaved lattice i-quants (IQ1_S_R4 ... IQ3_S_R4), read in their
stored layout (engine.block_dots).

These "grid" types store no value codes: each 8 (IQ1, IQ2) or 4 (IQ3) values are one index into a fixed table of
points (engine.iq_grids: 256 .. 2048 entries of small integers), times a scale, with signs from separate bits
(IQ2, IQ3) or a shift of +-1/8 (IQ1). A group's block column holds 4 rows' indices interleaved; row k's body
reads only its own (engine.iq_grid_decoders gives the layouts, the same expressions in float32).

Codes: each grid becomes an internal constant table in the LLVM module whose entries are the points already
shifted to unsigned bytes (IQ2/IQ3: point + 64; IQ1_S: point + 1; IQ1_M: 8 point + 8, its 1/8 shifts made
integers). A row's indices of 64 values are computed as one vector (constant byte shuffles of the block, per-lane
shifts for the high index bits) and fetched by one gather of 8 i64 or 16 i32 entries: 64 codes in one <64 x i8>
(measured against one scalar load per index and an insert: as fast for IQ1_S_R4, 1.1-1.5x faster for the
others). A sign turns code 64 + p into 64 - p, a masked subtract from 128 (the sign bits of 64 values form an
i64 viewed as <64 x i1>), so every code stays in 0..127 and value = dl * (code - 64): the 64 goes to the bias as
64 * dl * the group's activation sum, as the other kernels' zero points do.
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
    _V8F,
    _V8I,
    _V16F,
    _V16I,
    _V64I8,
    _accumulate,
    _const,
    _Ctx,
    _idx,
    _pairs,
    _row_loop,
    _values,
)
from engine.ik_decoders import IQ1_M_R4, IQ1_S_R4, IQ2_S_R4, IQ2_XS_R4, IQ2_XXS_R4, IQ3_S_R4, IQ3_XXS_R4
from engine.ik_dots import _book_scales, _ik_row, _spread
from engine.iq_grids import IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID
from engine.simd import _splat
from engine.simd_int8 import _fma4

_V4F = ir.VectorType(_F32, 4)
_V4I = ir.VectorType(_I32, 4)
_MASK64 = ir.VectorType(ir.IntType(1), 64)
# Codes are point + 64 (IQ2/IQ3 points are 1 .. 62); a negative sign makes them 128 - code.
_CENTER = 64


def _plus_center(grid: np.ndarray) -> np.ndarray:
    return (grid.astype(np.int16) + _CENTER).astype(np.uint8)


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


def _signed(c: _Ctx, codes: ir.Value, negative: ir.Value) -> ir.Value:
    """<64 x i8>: code 64 + p, or 64 - p where negative (<64 x i1>): one masked subtract from 128."""
    return c.b.select(negative, c.b.sub(_const(_V64I8, [2 * _CENTER] * 64), codes), codes)


def _mask(c: _Ctx, words: ir.Value) -> ir.Value:
    """<64 x i1>: the bits of a 64-bit vector (<2 x i32>, <8 x i8>, ...), lowest bit first: bit i = value i."""
    return c.b.bitcast(words, _MASK64)


def _sub_scales(c: _Ctx, dl: ir.Value, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 8 scales of a block with one scale dl (<8 x f32>) per 32 values; value = dl (code - 64), the
    -64 dl xs going to accb."""
    b = c.b
    bias = b.fmul(dl, _const(_V8F, [-float(_CENTER)] * 8))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl, _pairs(b, c.load(c.xd, x, _V16F, 4), add=False)))
        b.store(b.fadd(b.load(accb[t]), b.fmul(bias, _pairs(b, c.load(c.xs, x, _V16F, 4), add=True))), accb[t])
    return scales


def _nibble_scales(c: _Ctx, o: ir.Value, d: ir.Value, k: int, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 16 group scales of an IQ2_XS_R4 / IQ2_S_R4 block: byte 4 ib + k of the 32 at o holds row k's
    scales of sub-block ib, the low nibble n for its first 16 values, the high one for the next 16;
    dl = d (2 n + 1), value = dl (code - 64)."""
    b = c.b
    sc = _spread(c, o, 32, [4 * (g // 2) + k for g in range(16)])
    n = b.and_(b.lshr(sc, _const(_V16I, [4 * (g % 2) for g in range(16)])), _const(_V16I, [15] * 16))
    ls = b.or_(b.shl(n, _const(_V16I, [1] * 16)), _const(_V16I, [1] * 16))
    return _book_scales(c, d, ls, 0, _const(_V16I, [0] * 16), 0, _CENTER, xg, accb)


def _gather(c: _Ctx, table: ir.GlobalVariable, index: ir.Value, active: int | None = None) -> ir.Value:
    """<64 x i8>: the table's entries at the indices (<n x i32>, n entries make 64 bytes) by one gather (LLVM
    lowers it to vpgather with AVX-512, to scalar loads elsewhere); entries from lane `active` on are zero."""
    b = c.b
    n = index.type.count
    ety = table.type.pointee.element
    vty, vp, v64 = ir.VectorType(ety, n), ir.VectorType(ety.as_pointer(), n), ir.VectorType(_I64, n)
    base = _splat(b, b.ptrtoint(table, _I64), v64)
    offs = b.shl(b.zext(index, v64), _const(v64, [(ety.width // 8).bit_length() - 1] * n))
    mask = ir.VectorType(ir.IntType(1), n)
    fn = b.module.declare_intrinsic(f"llvm.masked.gather.v{n}i{ety.width}.v{n}p0",
                                    fnty=ir.FunctionType(vty, [vp, _I32, mask, vty]))
    got = b.call(fn, [b.inttoptr(b.add(base, offs), vp), ir.Constant(_I32, ety.width // 8),
                      ir.Constant(mask, [int(i < (n if active is None else active)) for i in range(n)]),
                      ir.Constant(vty, None)])
    return b.bitcast(got, _V64I8)


def _pair_bytes(c: _Ctx, o: ir.Value, at: int, stride: int, n: int) -> ir.Value:
    """<2 n x i8>: the n bytes at o + at, then the n at o + at + stride (a row's field of two sub-blocks)."""
    vty = ir.VectorType(_I8, n)
    first, second = (c.load(c.src, c.off(o, at + stride * j), vty) for j in range(2))
    return c.b.shuffle_vector(first, second, _idx(list(range(2 * n))))


def _picks(c: _Ctx, o: ir.Value, at: int, n: int, picks: list[int]) -> ir.Value:
    """<len(picks) x i8>: bytes picks[i] of the n at o + at (one load and one shuffle: bytes repeated from
    separate loads became a byte insert per lane)."""
    raw = c.load(c.src, c.off(o, at), ir.VectorType(_I8, n))
    return c.b.shuffle_vector(raw, raw, _idx(picks))


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
    nb = 2 if pair else 1
    raw = c.load(c.src, o, ir.VectorType(_I8, 24 * nb))
    qh = b.zext(b.bitcast(b.shuffle_vector(raw, raw, _idx([24 * (j % nb) + 16 + 2 * k + i for j in range(2)
                                                           for i in range(2)])), ir.VectorType(_I16, 2)),
                ir.VectorType(_I32, 2))
    low = b.zext(b.shuffle_vector(raw, raw, _idx([24 * (j % nb) + 4 * i + k for j in range(2) for i in range(4)])),
                 _V8I)
    qh8 = b.shuffle_vector(qh, qh, _idx([0] * 4 + [1] * 4))
    high = b.shl(b.and_(b.lshr(qh8, _const(_V8I, [0, 3, 6, 9] * 2)), _const(_V8I, [7] * 8)), _const(_V8I, [8] * 8))
    w = _gather(c, table, b.or_(low, high), None if pair else 4)
    dls, offsets = [], []
    for blk in range(nb):
        word = b.extract_element(qh, ir.Constant(_I32, blk))
        s = b.and_(b.lshr(word, ir.Constant(_I32, 12)), ir.Constant(_I32, 7))
        dls.append(b.fmul(d, b.uitofp(b.add(b.shl(s, ir.Constant(_I32, 1)), ir.Constant(_I32, 1)), _F32)))
        negative = b.icmp_unsigned("!=", b.and_(word, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 0))
        offsets.append(b.fmul(dls[-1], b.select(negative, ir.Constant(_F32, -1.125), ir.Constant(_F32, -0.875))))
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


# ---- IQ1_M_R4: 32-value blocks, a scale per 16 values and a shift per 8 ------------------------------------------

_IQ1M_CODES = (8 * IQ1S_GRID.astype(np.int16) + 8).astype(np.uint8)  # 8 p + 8: 0, 8, 16


def _iq1_m_r4_blocks(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int, pair: bool) -> None:
    """Row k of one or two IQ1_M_R4 block columns (28 bytes each: qs[16] @0, qh[8] @16, scales[4] @24). Half i
    of row k's block (16 values) has dl = d_k * nibble i of scales[k] and qh byte 4 i + k: 3 high index bits and
    the shift's sign (bit 3, bit 7) for each 8 values. value = dl (p +- 1/8) = dl / 8 (code - 9) with code = 8 p +
    10 for +1/8, 8 p + 8 for -1/8: the per-8 shift lives in the codes, the 9 in the bias."""
    b = c.b
    table = _table(c, "iq1m", _IQ1M_CODES)
    d = b.fmul(_half_row_scale(c, k), ir.Constant(_F32, 0.125))
    nb = 2 if pair else 1
    raw = c.load(c.src, o, ir.VectorType(_I8, 28 * nb))
    # entry e = 4 blk + 2 i + half: values 8 e .. 8 e + 7
    entries = [(blk % nb, i, half) for blk in range(2) for i in range(2) for half in range(2)]
    low = b.zext(b.shuffle_vector(raw, raw, _idx([28 * blk + 8 * i + k + 4 * half for blk, i, half in entries])), _V8I)
    qh = b.zext(b.shuffle_vector(raw, raw, _idx([28 * blk + 16 + 4 * i + k for blk, i, half in entries])), _V8I)
    high = b.shl(b.and_(b.lshr(qh, _const(_V8I, [4 * half for _, _, half in entries])), _const(_V8I, [7] * 8)),
                 _const(_V8I, [8] * 8))
    sign = b.and_(b.lshr(qh, _const(_V8I, [3 + 4 * half for _, _, half in entries])), _const(_V8I, [1] * 8))
    v8l = ir.VectorType(_I64, 8)
    plus = b.mul(b.zext(b.xor(sign, _const(_V8I, [1] * 8)), v8l), _const(v8l, [0x0202020202020202] * 8))
    w = b.bitcast(b.or_(b.bitcast(_gather(c, table, b.or_(low, high), None if pair else 4), v8l), plus), _V64I8)
    sc = b.zext(b.shuffle_vector(raw, raw, _idx([28 * (j // 2 % nb) + 24 + k for j in range(4)])), _V4I)
    n = b.and_(b.lshr(sc, _const(_V4I, [0, 4, 0, 4])), _const(_V4I, [15] * 4))
    dl4 = b.fmul(_splat(b, d, _V4F), b.uitofp(n, _V4F))
    if not pair:
        dl4 = b.fmul(dl4, _const(_V4F, [1.0, 1.0, 0.0, 0.0]))  # the missing block's groups
    bias = b.fmul(dl4, _const(_V4F, [-9.0] * 4))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl4, c.load(c.xd, x, _V4F, 4)))
        b.store(_fma4(b, bias, c.load(c.xs, x, _V4F, 4), b.load(accb[t])), accb[t])
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


# ---- the 256-value types: d[4] f16 @0, then row k's scales, indices and signs interleaved --------------------------


def _sas(c: _Ctx, o: ir.Value, k: int) -> tuple[ir.Value, ir.Value]:
    """IQ2_XXS_R4 / IQ3_XXS_R4: row k's 8 `sas` words (one per sub-block, word 4 ib + k of the 32 at o + 8) as
    (4-bit scales, sign words) <8 x i32>: bit 0 of each byte is a scale bit, and masked off, the word xor itself
    shifted right by one has bit i set where value i of the sub-block is negative."""
    b = c.b
    raw = c.load(c.src, c.off(o, 8), ir.VectorType(_I32, 32))
    w = b.shuffle_vector(raw, raw, _idx([4 * ib + k for ib in range(8)]))

    def bit(shift: int, value: int) -> ir.Value:
        return b.and_(b.lshr(w, _const(_V8I, [shift] * 8)), _const(_V8I, [value] * 8))

    scale = b.or_(b.or_(bit(0, 1), bit(7, 2)), b.or_(bit(14, 4), bit(21, 8)))
    w = b.and_(w, _const(_V8I, [-0x01010102] * 8))  # 0xFEFEFEFE
    return scale, b.xor(w, b.lshr(w, _const(_V8I, [1] * 8)))


def _odd_dl(c: _Ctx, d: ir.Value, n: ir.Value) -> ir.Value:
    """<8 x f32>: d (2 n + 1) for 4-bit scales n (<8 x i32>)."""
    b = c.b
    odd = b.or_(b.shl(n, _const(_V8I, [1] * 8)), _const(_V8I, [1] * 8))
    return b.fmul(_splat(b, d, _V8F), b.sitofp(odd, _V8F))


def _sign_pair(c: _Ctx, signs: ir.Value, g: int) -> ir.Value:
    """<64 x i1>: the sign words of sub-blocks 2 g and 2 g + 1 (<8 x i32> signs) as one mask."""
    return _mask(c, c.b.shuffle_vector(signs, signs, _idx([2 * g, 2 * g + 1])))


def _iq2_xxs_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ2_XXS_R4 block (d[4] @0, sas[128] @8, qs[128] @136): sub-block ib's 4 grid indices are
    bytes 136 + 16 ib + 4 k + i, its scale dl = d_k / 8 (2 s + 1) (_sas)."""
    b = c.b
    table = _table(c, "iq2xxs", _plus_center(IQ2XXS_GRID))
    scale, signs = _sas(c, o, k)
    scales = _sub_scales(c, _odd_dl(c, b.fmul(c.half(c.off(o, 2 * k)), ir.Constant(_F32, 0.125)), scale), xg, accb)
    for g in range(4):  # sub-blocks 2g, 2g + 1
        w = _gather(c, table, b.zext(_pair_bytes(c, o, 136 + 16 * 2 * g + 4 * k, 16, 4), _V8I))
        w = _signed(c, w, _sign_pair(c, signs, g))
        _accumulate(c, w, _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq3_xxs_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ3_XXS_R4 block (d[4] @0, sas[128] @8, qs[256] @136): sub-block ib's 8 grid indices (4
    values each) are bytes 136 + 32 ib + 8 k + i, its scale dl = d_k / 4 (2 s + 1) (_sas)."""
    b = c.b
    table = _table(c, "iq3xxs", _plus_center(IQ3XXS_GRID))
    scale, signs = _sas(c, o, k)
    scales = _sub_scales(c, _odd_dl(c, b.fmul(c.half(c.off(o, 2 * k)), ir.Constant(_F32, 0.25)), scale), xg, accb)
    for g in range(4):
        w = _gather(c, table, b.zext(_pair_bytes(c, o, 136 + 32 * 2 * g + 8 * k, 32, 8), _V16I))
        w = _signed(c, w, _sign_pair(c, signs, g))
        _accumulate(c, w, _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


def _iq2_xs_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ2_XS_R4 block (d[4] @0, qs u16[128] @8, scales[32] @264): word 16 ib + 4 k + i holds a
    9-bit grid index and 7 sign bits s, the 8 signs being s ^ (s << 1); scales as _nibble_scales, d = d_k / 8."""
    b = c.b
    table = _table(c, "iq2xs", _plus_center(IQ2XS_GRID))
    d = b.fmul(c.half(c.off(o, 2 * k)), ir.Constant(_F32, 0.125))
    scales = _nibble_scales(c, c.off(o, 264), d, k, xg, accb)
    v4, v8 = ir.VectorType(_I16, 4), ir.VectorType(_I16, 8)
    for g in range(4):
        q0, q1 = (c.load(c.src, c.off(o, 8 + 2 * (16 * ib + 4 * k)), v4) for ib in (2 * g, 2 * g + 1))
        q = b.shuffle_vector(q0, q1, _idx(list(range(8))))
        index = b.zext(b.and_(q, _const(v8, [511] * 8)), _V8I)
        s = b.lshr(q, _const(v8, [9] * 8))
        negative = _mask(c, b.trunc(b.xor(s, b.shl(s, _const(v8, [1] * 8))), ir.VectorType(_I8, 8)))
        w = _signed(c, _gather(c, table, index), negative)
        _accumulate(c, w, _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _iq2_s_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ2_S_R4 block (d[4] @0, qs[128] @8, qh[32] @136, signs[128] @168, scales[32] @296): entry
    16 ib + 4 k + i has the index byte qs[.] with bits 2 i, 2 i + 1 of qh[4 ib + k] above it and its 8 signs in
    signs[.]; scales as _nibble_scales, d = d_k / 8."""
    b = c.b
    table = _table(c, "iq2s", _plus_center(IQ2S_GRID))
    d = b.fmul(c.half(c.off(o, 2 * k)), ir.Constant(_F32, 0.125))
    scales = _nibble_scales(c, c.off(o, 296), d, k, xg, accb)
    for g in range(4):
        low = b.zext(_pair_bytes(c, o, 8 + 16 * 2 * g + 4 * k, 16, 4), _V8I)
        qh = b.zext(_picks(c, o, 136 + 8 * g, 8, [4 * j + k for j in range(2) for _ in range(4)]), _V8I)
        high = b.and_(b.shl(qh, _const(_V8I, [8 - 2 * i for _ in range(2) for i in range(4)])),
                      _const(_V8I, [0x300] * 8))
        s0, s1 = (c.load(c.src, c.off(o, 168 + 16 * ib + 4 * k), ir.VectorType(_I8, 4)) for ib in (2 * g, 2 * g + 1))
        negative = _mask(c, b.shuffle_vector(s0, s1, _idx(list(range(8)))))
        w = _signed(c, _gather(c, table, b.or_(low, high)), negative)
        _accumulate(c, w, _values(c, xg, g), scales, [4 * g + lane // 4 for lane in range(16)], acc)


def _iq3_s_r4_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb, k: int) -> None:
    """Row k of an IQ3_S_R4 block (d[4] @0, qs[256] @8, qh[32] @264, signs[128] @296, scales[16] @424).
    Sub-block ib: values 4 i + j (16 + 4 i + j) come from index byte qs[32 ib + k + 8 i] (+ 4) with bit i
    (i + 4) of qh[4 ib + k] as its 9th bit, their signs are bit i (i + 4) of signs[16 ib + 4 k + j]; its scale
    dl = d_k (2 n + 1), n = nibble l // 16 of scales[l % 16], l = 4 ib + k."""
    b = c.b
    table = _table(c, "iq3s", _plus_center(IQ3S_GRID))
    lsc = [4 * ib + k for ib in range(8)]
    n = b.and_(b.lshr(b.zext(b.shuffle_vector(*(2 * [c.load(c.src, c.off(o, 424), ir.VectorType(_I8, 16))]),
                                              _idx([v % 16 for v in lsc])), _V8I),
                      _const(_V8I, [4 * (v // 16) for v in lsc])), _const(_V8I, [15] * 8))
    scales = _sub_scales(c, _odd_dl(c, c.half(c.off(o, 2 * k)), n), xg, accb)
    # value p of a sub-block: its sign is bit 4 (p // 16) + (p % 16) // 4 of sign byte p % 4
    bits = [1 << (4 * (p // 16) + (p % 16) // 4) for p in range(32)]
    sign_bits = _const(_V64I8, [v - 256 if v > 127 else v for v in bits * 2])
    for g in range(4):
        qs = c.load(c.src, c.off(o, 8 + 64 * g), _V64I8)
        order = [(j, h, i) for j in range(2) for h in range(2) for i in range(4)]  # sub-block, half, entry
        low = b.zext(b.shuffle_vector(qs, qs, _idx([32 * j + k + 8 * i + 4 * h for j, h, i in order])), _V16I)
        qh = b.zext(_picks(c, o, 264 + 8 * g, 8, [4 * j + k for j, h, i in order]), _V16I)
        high = b.and_(b.shl(qh, _const(_V16I, [8 - i - 4 * h for j, h, i in order])), _const(_V16I, [0x100] * 16))
        w = _gather(c, table, b.or_(low, high))
        s0, s1 = (c.load(c.src, c.off(o, 296 + 16 * ib + 4 * k), ir.VectorType(_I8, 4)) for ib in (2 * g, 2 * g + 1))
        spread = b.shuffle_vector(s0, s1, _idx([4 * (p // 32) + p % 4 for p in range(64)]))
        negative = b.icmp_unsigned("!=", b.and_(spread, sign_bits), _const(_V64I8, [0] * 64))
        w = _signed(c, w, negative)
        _accumulate(c, w, _values(c, xg, g), scales, [2 * g] * 8 + [2 * g + 1] * 8, acc)


ROWS = {
    IQ1_S_R4: _iq1_row(IQ1_S_R4, _iq1_s_r4_blocks),
    IQ2_XXS_R4: _ik_row(IQ2_XXS_R4, _iq2_xxs_r4_block, 8),
    IQ3_XXS_R4: _ik_row(IQ3_XXS_R4, _iq3_xxs_r4_block, 8),
    IQ1_M_R4: _iq1_row(IQ1_M_R4, _iq1_m_r4_blocks),
    IQ2_XS_R4: _ik_row(IQ2_XS_R4, _iq2_xs_r4_block, 16),
    IQ3_S_R4: _ik_row(IQ3_S_R4, _iq3_s_r4_block, 8),
    IQ2_S_R4: _ik_row(IQ2_S_R4, _iq2_s_r4_block, 16),
}

"""Fused dot kernels for ik_llama.cpp's trellis types (IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT), read straight from their
GGUF blocks (engine.block_dots).

A trellis type stores no codes: each 4 or 8 consecutive values come from one 13-16 bit index. The index plus an
offset (4096, or 4096 + 32768 by IQ4_KT's sub-block bit) seeds x, and the group's value k (k = 1, 2, ...) is
x * 0xCBAC1FED^k mod 2^32 with its 4 bytes masked to 6 bits each and summed, less 126 (engine.ik_decoders'
_kt_values). The byte sum s is already an unsigned code: value = s - 126, so a sub-block's scale dl puts
-126 * dl on the bias; IQ3_KT takes |s - 126| with a sign bit per value: code = 128 +- |s - 126|.

The kernel makes 64 values' codes at once: one shuffle spreads the step's seeds over 16 i32 lanes, four vector
multiplies by per-lane powers of the constant give 4 x 16 values, `vpdpbusd` against bytes of 1 sums each lane's
masked bytes (elsewhere a multiply by 0x01010101, whose top byte is the sum: partial sums stay below 256, so no
byte carries), two `vpackusdw` and a `vpackuswb` narrow them to bytes and one in-lane byte shuffle puts them in
value order (the lanes are laid out so that each 16-byte lane holds 16 consecutive values).
All four have a float32 row scale (the context's `head`) and one scale per 32-value sub-block.
"""

from __future__ import annotations

from llvmlite import ir

from engine.block_ir import (
    _I8,
    _I16,
    _I32,
    _V8F,
    _V8I,
    _V16F,
    _V16I,
    _V32I8,
    _V64I8,
    _accumulate,
    _const,
    _Ctx,
    _idx,
    _pairs,
    _row_loop,
    _values,
)
from engine.ik_decoders import IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT
from engine.simd import _splat
from engine.simd_int8 import _ISA, IQ4_CODES, lookup_codes

_V16I8 = ir.VectorType(_I8, 16)


def _signed(v: int, bits: int) -> int:
    """v mod 2^bits as a signed constant of that width."""
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


# The generator's powers 0xCBAC1FED^k mod 2^32, k = 1..8 (value k of a group), as i32 constants.
_POWERS = [_signed(pow(0xCBAC1FED, k, 1 << 32), 32) for k in range(1, 9)]


def _byte_sums(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """<16 x i32>: the sum of the 4 bytes of each lane of x & 0x3f3f3f3f (0..252)."""
    s = b.and_(x, _const(_V16I, [0x3F3F3F3F] * 16))
    if _ISA == "avx512vnni":
        fn = b.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(_V16I, [_V16I] * 3))
        return b.call(fn, [_const(_V16I, [0] * 16), s, _const(_V16I, [0x01010101] * 16)])
    return b.lshr(b.mul(s, _const(_V16I, [0x01010101] * 16)), _const(_V16I, [24] * 16))


def _pack_bytes(b: ir.IRBuilder, parts: list[ir.Value]) -> ir.Value:
    """<64 x i8>: four <16 x i32> of values 0..255 narrowed to bytes in the order of x86's saturating packs (two
    `vpackusdw` and a `vpackuswb`, within 128-bit lanes): byte 16 L + 4 v + i = parts[v][4 L + i]. Cheaper than
    truncating each vector (`vpmovdb`, two shuffle uops each); the lanes are filled in that order instead."""
    if _ISA == "avx512vnni":
        v32i16 = ir.VectorType(_I16, 32)
        dw = b.module.declare_intrinsic("llvm.x86.avx512.packusdw.512", fnty=ir.FunctionType(v32i16, [_V16I] * 2))
        wb = b.module.declare_intrinsic("llvm.x86.avx512.packuswb.512", fnty=ir.FunctionType(_V64I8, [v32i16] * 2))
        return b.call(wb, [b.call(dw, parts[:2]), b.call(dw, parts[2:])])
    t = [b.trunc(p, _V16I8) for p in parts]
    lo, hi = b.shuffle_vector(t[0], t[1], _idx(list(range(32)))), b.shuffle_vector(t[2], t[3], _idx(list(range(32))))
    return b.shuffle_vector(lo, hi, _idx([16 * (p % 16 // 4) + 4 * (p // 16) + p % 4 for p in range(64)]))


def _layout(per: int) -> list[list[int]]:
    """Which of a step's 64 values lane e of part v computes (parts as _pack_bytes packs them): each part takes
    its seeds from the same lanes (per 4: lane e has seed e, its 4 values in parts 0-3; per 8: lane 4 L + i has
    seed 2 L + i // 2, its values spread over the parts), so no part needs its own shuffle of the seeds, and
    every 16-byte lane of the packed bytes holds 16 consecutive values (one in-lane byte shuffle sorts them)."""
    if per == 4:
        return [[4 * e + v for e in range(16)] for v in range(4)]
    return [[16 * (e // 4) + 8 * (e % 4 // 2) + 2 * v + e % 2 for e in range(16)] for v in range(4)]


def _trellis_sums(c: _Ctx, seeds: ir.Value, per: int, first: int) -> ir.Value:
    """<64 x i8>: the byte sums (value + 126) of 64 consecutive values whose groups of `per` values have the
    seeds (index + offset, i32 lanes) seeds[first], seeds[first + 1], ..."""
    b = c.b
    layout = _layout(per)
    lanes = [first + k // per for k in layout[0]]  # the same for every part
    mine = b.shuffle_vector(seeds, seeds, _idx(lanes))
    parts = [_byte_sums(b, b.mul(mine, _const(_V16I, [_POWERS[k % per] for k in values]))) for values in layout]
    packed = _pack_bytes(b, parts)
    at = {k: 16 * (e // 4) + 4 * v + e % 4 for v, values in enumerate(layout) for e, k in enumerate(values)}
    return b.shuffle_vector(packed, packed, _idx([at[k] for k in range(64)]))


def _sub_scales(c: _Ctx, dl: ir.Value, zero: int, xg: list[ir.Value], accb) -> list[ir.Value]:
    """Each token's 8 sub-block scales dl (<8 x f32>) times its activation scales; value = dl * (code - zero), the
    -zero * dl part goes to accb."""
    b = c.b
    bias = b.fmul(dl, _const(_V8F, [float(-zero)] * 8))
    scales = []
    for t, x in enumerate(xg):
        scales.append(b.fmul(dl, _pairs(b, c.load(c.xd, x, _V16F, 4), add=False)))
        b.store(b.fadd(b.load(accb[t]), b.fmul(bias, _pairs(b, c.load(c.xs, x, _V16F, 4), add=True))), accb[t])
    return scales


def _book_dl(c: _Ctx, nibbles: ir.Value) -> ir.Value:
    """<8 x f32>: d * IQ4K book[n] for the 8 sub-blocks' 4-bit scale codes (the first 8 lanes of <16 x i8>)."""
    b = c.b
    codes = b.zext(lookup_codes(b, nibbles, IQ4_CODES), _V16I)  # book + 128
    first = b.shuffle_vector(codes, codes, _idx(list(range(8))))
    return b.fmul(_splat(b, c.f32(c.head), _V8F), b.sitofp(b.sub(first, _const(_V8I, [128] * 8)), _V8F))


def _nibbles16(c: _Ctx, at: ir.Value) -> ir.Value:
    """<16 x i8>: the scale nibbles of 8 sub-blocks in the 4 bytes at `at` (sub-block s: nibble s // 4 of byte
    s % 4), lanes 8-15 unused."""
    b = c.b
    raw = c.load(c.src, at, ir.VectorType(_I8, 4))
    spread = b.shuffle_vector(raw, raw, _idx([0, 1, 2, 3] * 4))
    return b.and_(b.lshr(spread, _const(_V16I8, [0] * 4 + [4] * 4 + [0] * 8)), _const(_V16I8, [15] * 16))


def _step_lanes(g: int) -> list[int]:
    return [2 * g] * 8 + [2 * g + 1] * 8  # the 64 values of step g: sub-blocks 2g and 2g + 1


def _iq4_kt_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ4_KT block (u32 words[8] @0, ql[64] @32, qh[32] @96): sub-block s has dl = d * (((w & 255) >> 1) - 64)
    and offset 4096 (+ 32768 by bit 0) of w = words[s]; its group i (4 values, j = 8 s + i) has the index
    ql[j] | nibble j // 32 of qh[j % 32] << 8 | bits 8 + 3 i.. of w (3) << 12."""
    b = c.b
    w = c.load(c.src, o, _V8I)
    dl = b.fmul(_splat(b, c.f32(c.head), _V8F),
                b.sitofp(b.sub(b.lshr(b.and_(w, _const(_V8I, [255] * 8)), _const(_V8I, [1] * 8)),
                               _const(_V8I, [64] * 8)), _V8F))
    scales = _sub_scales(c, dl, 126, xg, accb)
    offsets = b.add(b.shl(b.and_(w, _const(_V8I, [1] * 8)), _const(_V8I, [15] * 8)), _const(_V8I, [4096] * 8))
    rot = _const(_V16I, [(4 - 3 * i) % 32 for i in range(8)] * 2)  # rotates bits 8 + 3 i.. of w to bit 12
    fshl = b.module.declare_intrinsic("llvm.fshl.v16i32", fnty=ir.FunctionType(_V16I, [_V16I] * 3))
    for g in range(4):  # groups j = 16 g .. 16 g + 15
        ql = b.zext(c.load(c.src, c.off(o, 32 + 16 * g), _V16I8), _V16I)
        qh = b.zext(c.load(c.src, c.off(o, 96 + 16 * (g % 2)), _V16I8), _V16I)
        high = b.and_(b.shl(qh, _const(_V16I, [8 - 4 * (g // 2)] * 16)), _const(_V16I, [0xF00] * 16))
        ws = b.shuffle_vector(w, w, _idx(_step_lanes(g)))
        top = b.and_(b.call(fshl, [ws, ws, rot]), _const(_V16I, [0x7000] * 16))
        seeds = b.add(b.or_(b.or_(ql, high), top), b.shuffle_vector(offsets, offsets, _idx(_step_lanes(g))))
        _accumulate(c, _trellis_sums(c, seeds, 4, 0), _values(c, xg, g), scales, _step_lanes(g), acc)


def _kt_seeds16(c: _Ctx, at: ir.Value) -> ir.Value:
    """<32 x i32>: the 32 uint16 indices at `at` plus 4096 (IQ2_KT, IQ3_KT: index j seeds values 8 j..)."""
    v32 = ir.VectorType(_I32, 32)
    idx = c.b.zext(c.load(c.src, at, ir.VectorType(_I16, 32)), v32)
    return c.b.add(idx, _const(v32, [4096] * 32))


def _iq2_kt_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ2_KT block (scales[4] @0, uint16 indices[32] @4): sub-block s has dl = d * IQ4K book[nibble s // 4
    of scales[s % 4]]; index j gives values 8 j .. 8 j + 7."""
    scales = _sub_scales(c, _book_dl(c, _nibbles16(c, o)), 126, xg, accb)
    seeds = _kt_seeds16(c, c.off(o, 4))
    for g in range(4):
        _accumulate(c, _trellis_sums(c, seeds, 8, 8 * g), _values(c, xg, g), scales, _step_lanes(g), acc)


def _iq3_kt_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ3_KT block (scales[4] @0, uint16 indices[32] @4, qh[32] @68): sub-block s has dl = d * (nibble
    s // 4 of scales[s % 4]); values |s - 126| as IQ2_KT's, value v negated by bit v // 32 of qh[v % 32]."""
    b = c.b
    nib = _nibbles16(c, o)
    nib = b.shuffle_vector(nib, nib, _idx(list(range(8))))
    dl = b.fmul(_splat(b, c.f32(c.head), _V8F), b.sitofp(b.zext(nib, _V8I), _V8F))
    scales = _sub_scales(c, dl, 128, xg, accb)
    seeds = _kt_seeds16(c, c.off(o, 4))
    qh = c.load(c.src, c.off(o, 68), _V32I8)
    both = b.shuffle_vector(qh, qh, _idx(list(range(32)) * 2))
    usub = b.module.declare_intrinsic("llvm.usub.sat.v64i8", fnty=ir.FunctionType(_V64I8, [_V64I8] * 2))
    mid, zero, base = (_const(_V64I8, [v] * 64) for v in (126, 0, _signed(128, 8)))
    for g in range(4):
        sums = _trellis_sums(c, seeds, 8, 8 * g)
        mag = b.or_(b.call(usub, [sums, mid]), b.call(usub, [mid, sums]))  # |s - 126|: one of them is 0
        bit = _const(_V64I8, [_signed(1 << 2 * g, 8)] * 32 + [_signed(2 << 2 * g, 8)] * 32)
        negative = b.icmp_unsigned("!=", b.and_(both, bit), zero)
        _accumulate(c, b.select(negative, b.sub(base, mag), b.add(base, mag)), _values(c, xg, g), scales,
                    _step_lanes(g), acc)


def _iq1_kt_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ1_KT block (sh[8] @0, ql[32] @8, qh[16] @40): sub-block s has dl = d * IQ4K book[sh[s] & 15]; index
    j (values 8 j ..) is ql[j] | nibble j // 16 of qh[j % 16] << 8 | bit 4 + j % 4 of sh[j // 4] << 12."""
    b = c.b
    v32 = ir.VectorType(_I16, 32)  # the indices fit 16 bits: half the vectors of 32-bit lanes
    sh = c.load(c.src, o, ir.VectorType(_I8, 8))
    nib = b.and_(b.shuffle_vector(sh, sh, _idx(list(range(8)) * 2)), _const(_V16I8, [15] * 16))
    scales = _sub_scales(c, _book_dl(c, nib), 126, xg, accb)
    ql = b.zext(c.load(c.src, c.off(o, 8), _V32I8), v32)
    qh = c.load(c.src, c.off(o, 40), _V16I8)
    high = b.and_(b.shl(b.zext(b.shuffle_vector(qh, qh, _idx(list(range(16)) * 2)), v32),
                        _const(v32, [8] * 16 + [4] * 16)), _const(v32, [0xF00] * 32))
    top = b.and_(b.shl(b.zext(b.shuffle_vector(sh, sh, _idx([j // 4 for j in range(32)])), v32),
                       _const(v32, [8 - j % 4 for j in range(32)])), _const(v32, [0x1000] * 32))
    seeds = b.zext(b.add(b.or_(b.or_(ql, high), top), _const(v32, [4096] * 32)), ir.VectorType(_I32, 32))
    for g in range(4):
        _accumulate(c, _trellis_sums(c, seeds, 8, 8 * g), _values(c, xg, g), scales, _step_lanes(g), acc)


def _kt_row(qtype: int, block):
    def row(context, builder, sig, args, n_tok: int, k: int) -> None:
        _row_loop(context, builder, sig, args, n_tok, qtype, block, 8)

    return row


ROWS = {
    IQ4_KT: _kt_row(IQ4_KT, _iq4_kt_block),
    IQ2_KT: _kt_row(IQ2_KT, _iq2_kt_block),
    IQ3_KT: _kt_row(IQ3_KT, _iq3_kt_block),
    IQ1_KT: _kt_row(IQ1_KT, _iq1_kt_block),
}

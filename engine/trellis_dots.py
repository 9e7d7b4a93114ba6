"""Fused dot kernels for ik_llama.cpp's trellis types (IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT), read straight from their
GGUF blocks (engine.block_dots).

A trellis type stores no codes: each 4 or 8 consecutive values come from one 13-16 bit index. The index plus an
offset (4096, or 4096 + 32768 by IQ4_KT's sub-block bit) seeds x, and the group's value k (k = 1, 2, ...) is
x * 0xCBAC1FED^k mod 2^32 with its 4 bytes masked to 6 bits each and summed, less 126 (engine.ik_decoders'
_kt_values). The byte sum s is already an unsigned code: value = s - 126, so a sub-block's scale dl puts
-126 * dl on the bias. The kernel seeds 16 lanes (each value's index, repeated per value of its group), multiplies
them by the powers of the constant (one vector multiply for 16 values), and sums the masked bytes of each lane
(VNNI `vpdpbusd` against bytes of 1, else a multiply by 0x01010101 whose top byte is the sum: the partial sums stay
below 256, so no byte carries). IQ3_KT takes |s - 126| with a sign bit per value: code = 128 +- |s - 126|.
All four have a float32 row scale (the context's `head`) and one scale per 32-value sub-block.
"""

from __future__ import annotations

from llvmlite import ir

from engine.block_ir import (
    _I8,
    _I16,
    _I32,
    _V8F,
    _V16F,
    _V16I,
    _V32I8,
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

_V8I, _V16I8, _V64I8 = ir.VectorType(_I32, 8), ir.VectorType(_I8, 16), ir.VectorType(_I8, 64)


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# The generator's powers 0xCBAC1FED^k mod 2^32, k = 1..8 (value k of a group), as i32 constants.
_POWERS = [_signed32(pow(0xCBAC1FED, k, 1 << 32)) for k in range(1, 9)]


def _byte_sums(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """<16 x i32>: the sum of the 4 bytes of each lane of x & 0x3f3f3f3f (0..252)."""
    s = b.and_(x, _const(_V16I, [0x3F3F3F3F] * 16))
    if _ISA == "avx512vnni":
        fn = b.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(_V16I, [_V16I] * 3))
        return b.call(fn, [_const(_V16I, [0] * 16), s, _const(_V16I, [0x01010101] * 16)])
    return b.lshr(b.mul(s, _const(_V16I, [0x01010101] * 16)), _const(_V16I, [24] * 16))


def _trellis_sums(c: _Ctx, seeds: ir.Value, per: int, first: int) -> ir.Value:
    """<64 x i8>: the byte sums (value + 126) of 64 consecutive values whose groups of `per` values have the
    seeds (index + offset, i32 lanes) seeds[first], seeds[first + 1], ..."""
    b = c.b
    parts = []
    for q in range(4):
        lanes = [first + (16 * q + k) // per for k in range(16)]
        x = b.mul(b.shuffle_vector(seeds, seeds, _idx(lanes)), _const(_V16I, [_POWERS[k % per] for k in range(16)]))
        parts.append(b.trunc(_byte_sums(b, x), _V16I8))
    pairs = [b.shuffle_vector(parts[k], parts[k + 1], _idx(list(range(32)))) for k in (0, 2)]
    return b.shuffle_vector(pairs[0], pairs[1], _idx(list(range(64))))


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
    """An IQ4_KT block (u32 words[8] @0, ql[64] @32, qh[32] @96): sub-block s has dl = d * ((w & 255) >> 1) - 64)
    and offset 4096 (+ 32768 by bit 0) of w = words[s]; its group i (4 values, j = 8 s + i) has the index
    ql[j] | nibble j // 32 of qh[j % 32] << 8 | bits 8 + 3 i.. of w (3) << 12."""
    b = c.b
    w = c.load(c.src, o, _V8I)
    dl = b.fmul(_splat(b, c.f32(c.head), _V8F),
                b.sitofp(b.sub(b.lshr(b.and_(w, _const(_V8I, [255] * 8)), _const(_V8I, [1] * 8)),
                               _const(_V8I, [64] * 8)), _V8F))
    scales = _sub_scales(c, dl, 126, xg, accb)
    offsets = b.add(b.shl(b.and_(w, _const(_V8I, [1] * 8)), _const(_V8I, [15] * 8)), _const(_V8I, [4096] * 8))
    for g in range(4):  # groups j = 16 g .. 16 g + 15
        ql = b.zext(c.load(c.src, c.off(o, 32 + 16 * g), _V16I8), _V16I)
        qh = b.zext(c.load(c.src, c.off(o, 96 + 16 * (g % 2)), _V16I8), _V16I)
        high = b.and_(b.shl(qh, _const(_V16I, [8 - 4 * (g // 2)] * 16)), _const(_V16I, [0xF00] * 16))
        ws = b.shuffle_vector(w, w, _idx(_step_lanes(g)))
        top = b.shl(b.and_(b.lshr(ws, _const(_V16I, [8 + 3 * i for i in range(8)] * 2)), _const(_V16I, [7] * 16)),
                    _const(_V16I, [12] * 16))
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
    nib = b.shuffle_vector(_nibbles16(c, o), _nibbles16(c, o), _idx(list(range(8))))
    dl = b.fmul(_splat(b, c.f32(c.head), _V8F), b.sitofp(b.zext(nib, _V8I), _V8F))
    scales = _sub_scales(c, dl, 128, xg, accb)
    seeds = _kt_seeds16(c, c.off(o, 4))
    qh = c.load(c.src, c.off(o, 68), _V32I8)
    both = b.shuffle_vector(qh, qh, _idx(list(range(32)) * 2))
    zero = _const(_V64I8, [0] * 64)
    for g in range(4):
        v = b.sub(_trellis_sums(c, seeds, 8, 8 * g), _const(_V64I8, [126] * 64))  # -126..126 as i8
        mag = b.select(b.icmp_signed("<", v, zero), b.sub(zero, v), v)
        neg = b.sub(zero, b.and_(b.lshr(both, _const(_V64I8, [2 * g] * 32 + [2 * g + 1] * 32)),
                                 _const(_V64I8, [1] * 64)))  # 0 or -1
        signed = b.sub(b.xor(mag, neg), neg)
        _accumulate(c, b.xor(signed, _const(_V64I8, [-128] * 64)), _values(c, xg, g), scales, _step_lanes(g),
                    acc)


def _iq1_kt_block(c: _Ctx, o: ir.Value, xg: list[ir.Value], acc, accb) -> None:
    """An IQ1_KT block (sh[8] @0, ql[32] @8, qh[16] @40): sub-block s has dl = d * IQ4K book[sh[s] & 15]; index
    j (values 8 j ..) is ql[j] | nibble j // 16 of qh[j % 16] << 8 | bit 4 + j % 4 of sh[j // 4] << 12."""
    b = c.b
    v32, v32i8 = ir.VectorType(_I32, 32), _V32I8
    sh = c.load(c.src, o, ir.VectorType(_I8, 8))
    nib = b.and_(b.shuffle_vector(sh, sh, _idx(list(range(8)) * 2)), _const(_V16I8, [15] * 16))
    scales = _sub_scales(c, _book_dl(c, nib), 126, xg, accb)
    ql = b.zext(c.load(c.src, c.off(o, 8), v32i8), v32)
    qh = c.load(c.src, c.off(o, 40), _V16I8)
    high = b.and_(b.shl(b.zext(b.shuffle_vector(qh, qh, _idx(list(range(16)) * 2)), v32),
                        _const(v32, [8] * 16 + [4] * 16)), _const(v32, [0xF00] * 32))
    top = b.and_(b.shl(b.zext(b.shuffle_vector(sh, sh, _idx([j // 4 for j in range(32)])), v32),
                       _const(v32, [8 - j % 4 for j in range(32)])), _const(v32, [0x1000] * 32))
    seeds = b.add(b.or_(b.or_(ql, high), top), _const(v32, [4096] * 32))
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

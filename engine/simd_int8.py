"""Vector building blocks of the integer dot products: weights unpacked to uint8, dotted with int8 activations.

Legend: a group is 16 consecutive values, a lane 4 of them. The unsigned weight codes q (u8) of a lane meet the
signed 16-bit activation codes of the same lane in two multiply-adds of two products each (VNNI `vpdpwssd`), and
the group's float scales turn those integers into a float: value = a_g * q + b_g for weights, x = xd_g * xq for
activations, so

    w . x = sum over groups of  a * xd * (q . xq)  +  b * xs      (xs = xd * sum of the group's xq)

The weight codes are unpacked as bytes (u8) and split into even and odd codes as 16-bit words by one mask and
one shift; the activation codes are stored split the same way (engine.q8_activations).

Every weight type with integer codes under per-block affine scales fits this form (Q8_0 shifts its codes by 128
into b). The instruction set is chosen where the kernels are compiled (AVX-512 VNNI, else portable IR that LLVM
lowers to what the target has), like engine.simd's permute.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.simd import _arg_i32, _arg_i64, _field, _load_bytes, _splat, target_features

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16I32 = ir.VectorType(_I32, 16)
_V64I8, _V16F = ir.VectorType(_I8, 64), ir.VectorType(_F32, 16)


def instruction_set() -> str:
    """What the integer dot compiles to here: "avx512vnni" or "portable"."""
    return "avx512vnni" if {"+avx512vnni", "+avx512bw"} <= target_features() else "portable"


_ISA = instruction_set()
_VBMI = _ISA == "avx512vnni" and "+avx512vbmi" in target_features()  # vpermb: a 64-byte table in one lookup


def _load_lanes(context, builder, sig, args, k_array, k_offset, lanes: int) -> ir.Value:
    """<lanes x i16>: the bytes at array[k_array] + offset, zero-extended (16-bit lanes shift natively on x86)."""
    data = context.make_array(sig.args[k_array])(context, builder, args[k_array]).data
    ptr = builder.gep(data, [_arg_i64(context, builder, sig, args, k_offset)], source_etype=_I8)
    vty = ir.VectorType(_I8, lanes)
    return builder.zext(builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1, typ=vty),
                        ir.VectorType(_I16, lanes))


def _store_u8(context, builder, sig, args, q: ir.Value, lanes: int) -> None:
    """dst[do : do + lanes] = q (uint8), with args 0, 1 = dst, do."""
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    ptr = builder.gep(data, [_arg_i64(context, builder, sig, args, 1)], source_etype=_I8)
    vty = ir.VectorType(_I8, lanes)
    builder.store(builder.trunc(q, vty), builder.bitcast(ptr, vty.as_pointer()), align=1)


def _make_unpack_u8(lanes: int):
    @intrinsic
    def unpack(typingctx, dst, do, src, lo, lshift, lmask, hi, hshift, hmask, hpos, flip):
        sig = types.none(dst, do, src, lo, lshift, lmask, hi, hshift, hmask, hpos, flip)

        def codegen(context, builder, signature, args):
            vty = ir.VectorType(_I16, lanes)
            a = {k: _splat(builder, builder.trunc(_arg_i32(context, builder, signature, args, k), _I16), vty)
                 for k in (4, 5, 7, 8, 9, 10)}

            def field(k_offset, k_shift, k_mask):
                v = _load_lanes(context, builder, signature, args, 2, k_offset, lanes)
                return builder.and_(builder.lshr(v, a[k_shift]), a[k_mask])

            q = builder.or_(field(3, 4, 5), builder.shl(field(6, 7, 8), a[9]))
            _store_u8(context, builder, signature, args, builder.xor(q, a[10]), lanes)
            return context.get_dummy_value()

        return sig, codegen

    unpack.__doc__ = f"""dst[do + i] = q_i ^ flip for i < {lanes}, q_i = ((src[lo + i] >> lshift) & lmask) |
    (((src[hi + i] >> hshift) & hmask) << hpos): engine.simd._unpack16's codes left as integers (flip 128 turns
    int8 codes unsigned)."""
    return unpack


_unpack32_u8 = _make_unpack_u8(32)


def k4_scale_codes(builder: ir.IRBuilder, packed: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Q4_K/Q5_K's 8 sub-block scales and mins (<8 x i32> each) from their 12 packed bytes (the first 12 lanes of
    <16 x i8> packed): the 6-bit pairs of block_decoders._scale_min_k4, all 8 at once."""
    v8i = ir.VectorType(_I32, 8)
    raw = builder.zext(packed, _V16I32)

    def pick(idx):
        return builder.shuffle_vector(raw, raw, ir.Constant(v8i, idx))

    def const(v):
        return ir.Constant(v8i, [v] * 8)

    first = builder.icmp_unsigned("<", ir.Constant(v8i, list(range(8))), const(4))  # j < 4
    p, q = pick([0, 1, 2, 3, 8, 9, 10, 11]), pick([0, 1, 2, 3, 0, 1, 2, 3])
    m_src, n = pick([4, 5, 6, 7, 8, 9, 10, 11]), pick([4, 5, 6, 7, 4, 5, 6, 7])
    high = builder.shl(builder.lshr(q, const(6)), const(4))
    sc = builder.select(first, builder.and_(p, const(63)), builder.or_(builder.and_(p, const(15)), high))
    mhigh = builder.shl(builder.lshr(n, const(6)), const(4))
    m = builder.select(first, builder.and_(m_src, const(63)), builder.or_(builder.lshr(m_src, const(4)), mhigh))
    return sc, m


# IQ4_NL/IQ4_XS grid values + 128: the non-linear codes as unsigned bytes (value = d * (code - 128)); also the
# first half of ik_llama.cpp's IQ4_K* books (the second half is the first + 4).
IQ4_CODES = [1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241]


_PSHUFB = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}


def lookup_codes(builder: ir.IRBuilder, idx: ir.Value, table: list[int]) -> ir.Value:
    """<n x i8>: table[idx[i]] for byte indices idx (<n x i8>, each < len(table) <= 64): the non-linear code books
    of the IQ types as unsigned codes. With AVX-512 one `vpshufb` per 16 entries (the table in every 16-byte
    lane) or, for 64 indices and over 16 entries, one `vpermb` (VBMI); else a select tree on the index bits,
    exact on any target."""
    n = idx.type.count
    vty = ir.VectorType(_I8, n)
    if _VBMI and n == 64 and len(table) > 16:  # one vpermb: the table padded to 64 bytes
        signed = [v - 256 if v > 127 else v for v in table] + [0] * (64 - len(table))
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.qi.512", fnty=ir.FunctionType(vty, [vty, vty]))
        return builder.call(fn, [ir.Constant(vty, signed), idx])
    if _ISA == "avx512vnni" and len(table) > 32:  # 64 entries: each half's lookup, chosen by index bit 5
        low = builder.and_(idx, ir.Constant(vty, [31] * n))
        high = builder.icmp_unsigned("!=", builder.and_(idx, ir.Constant(vty, [32] * n)), ir.Constant(vty, [0] * n))
        return builder.select(high, lookup_codes(builder, low, table[32:]), lookup_codes(builder, low, table[:32]))
    if _ISA == "avx512vnni" and len(table) > 16:  # 32 entries: each half's lookup, chosen by index bit 4
        low = builder.and_(idx, ir.Constant(vty, [15] * n))
        high = builder.icmp_unsigned("!=", builder.and_(idx, ir.Constant(vty, [16] * n)), ir.Constant(vty, [0] * n))
        return builder.select(high, lookup_codes(builder, low, table[16:]), lookup_codes(builder, low, table[:16]))
    padded = [v - 256 if v > 127 else v for v in table]  # as signed bytes
    padded += [0] * ((16 if len(table) <= 16 else 32) - len(table))
    if _ISA == "avx512vnni":
        fn = builder.module.declare_intrinsic(_PSHUFB[n], fnty=ir.FunctionType(vty, [vty, vty]))
        return builder.call(fn, [ir.Constant(vty, padded * (n // 16)), idx])
    bits = max(1, (len(table) - 1).bit_length())
    level = [ir.Constant(vty, [v] * n) for v in padded[: 1 << bits]]
    zero = ir.Constant(vty, [0] * n)
    for bit in range(bits):
        on = builder.icmp_unsigned("!=", builder.and_(idx, ir.Constant(vty, [1 << bit] * n)), zero)
        level = [builder.select(on, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
    return level[0]


@intrinsic
def _unpack16_u8_iq4(typingctx, dst, do, src, lo, lshift):
    """IQ4_NL/IQ4_XS codes: dst[do + i] = IQ4_CODES[(src[lo + i] >> lshift) & 15] (lookup_codes)."""
    sig = types.none(dst, do, src, lo, lshift)

    def codegen(context, builder, signature, args):
        low = builder.zext(_load_bytes(context, builder, signature, args, 2, 3), _V16I32)
        idx = _field(builder, low, _arg_i32(context, builder, signature, args, 4), ir.Constant(_I32, 15))
        codes = lookup_codes(builder, builder.trunc(idx, ir.VectorType(_I8, 16)), IQ4_CODES)
        _store_u8(context, builder, signature, args, builder.zext(codes, ir.VectorType(_I16, 16)), 16)
        return context.get_dummy_value()

    return sig, codegen


def _code_sums(builder: ir.IRBuilder, w: ir.Value, x_even: ir.Value, x_odd: ir.Value) -> ir.Value:
    """<16 x i32>: lane l = sum_{j<4} u8(w[4l + j]) * x[4l + j] for 64 u8 weight codes w (<64 x i8>) and 64 16-bit
    activation codes split by parity (engine.q8_activations' order): x_even[i] = x[2i], x_odd[i] = x[2i + 1].

    The 16-bit view of w holds code 2i in its low byte and 2i + 1 in its high byte, so a mask and a shift give
    both halves, and two i16 pair multiply-adds (VNNI `vpdpwssd`) sum each lane's four products."""
    v32i16 = ir.VectorType(_I16, 32)
    words = builder.bitcast(w, v32i16)
    w_even = builder.and_(words, ir.Constant(v32i16, [255] * 32))
    w_odd = builder.lshr(words, ir.Constant(v32i16, [8] * 32))
    zero = ir.Constant(_V16I32, [0] * 16)
    if _ISA == "avx512vnni":
        fnty = ir.FunctionType(_V16I32, [_V16I32, _V16I32, _V16I32])
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpwssd.512", fnty=fnty)

        def pairs(acc, a, b):
            return builder.call(fn, [acc, builder.bitcast(a, _V16I32), builder.bitcast(b, _V16I32)])

        return pairs(pairs(zero, w_even, x_even), w_odd, x_odd)
    # portable: 32-bit products, adjacent pairs summed (what x86's pmaddwd does)
    v32i32 = ir.VectorType(_I32, 32)

    def pair_sums(a, b):
        prod = builder.mul(builder.zext(a, v32i32), builder.sext(b, v32i32))
        even = builder.shuffle_vector(prod, prod, ir.Constant(_V16I32, list(range(0, 32, 2))))
        odd = builder.shuffle_vector(prod, prod, ir.Constant(_V16I32, list(range(1, 32, 2))))
        return builder.add(even, odd)

    return builder.add(pair_sums(w_even, x_even), pair_sums(w_odd, x_odd))


def codes_dot(builder: ir.IRBuilder, w: ir.Value, x16: ir.Value, value: ir.Value) -> ir.Value:
    """<16 x f32>: the lane sums of _code_sums for the 64 activation codes from flat index `value` of x16 (an
    i16 pointer), as floats in units of the group scale xd."""
    v32i16 = ir.VectorType(_I16, 32)

    def half(k: int) -> ir.Value:
        p = builder.gep(x16, [builder.add(value, ir.Constant(_I64, k))])
        return builder.load(builder.bitcast(p, v32i16.as_pointer()), align=2, typ=v32i16)

    return builder.sitofp(_code_sums(builder, w, half(0), half(32)), _V16F)


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    fn = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F] * 3))
    return builder.call(fn, [a, b, c])


def _fma4(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    v4f = ir.VectorType(_F32, 4)
    fn = builder.module.declare_intrinsic("llvm.fma.v4f32", fnty=ir.FunctionType(v4f, [v4f] * 3))
    return builder.call(fn, [a, b, c])


def _hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of float lanes as a fixed tree (the same order on every target)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _data(context, builder, sig, args, k: int) -> ir.Value:
    return context.make_array(sig.args[k])(context, builder, args[k]).data


@intrinsic
def _dot_u8s8(typingctx, q, a, b, wgroup, x16, xd, xs, xgroup, n64):
    """float32 sum over n64 steps of 64 values (4 groups of 16) of  a*xd*(q.x) + b*xs, group by group, with the
    16-bit activation codes x16 in engine.q8_activations' order.

    q (u8), a, b (f32 per group) are decoded weights read from group `wgroup`; x16 (i16), xd, xs (f32 per group)
    are quantized token vectors read from group `xgroup` (flat indices). Groups past the data carry a = b = 0."""
    sig = types.float32(q, a, b, wgroup, x16, xd, xs, xgroup, n64)

    def codegen(context, builder, signature, args):
        qd, ad, bd = (_data(context, builder, signature, args, k) for k in range(3))
        xcd, xdd, xsd = (_data(context, builder, signature, args, k) for k in range(4, 7))
        wg = _arg_i64(context, builder, signature, args, 3)
        xg = _arg_i64(context, builder, signature, args, 7)
        n = _arg_i64(context, builder, signature, args, 8)
        v4f = ir.VectorType(_F32, 4)
        acc_a = cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
        acc_b = cgutils.alloca_once_value(builder, ir.Constant(v4f, [0.0] * 4))
        spread = ir.Constant(ir.VectorType(_I32, 16), [lane // 4 for lane in range(16)])  # lane -> its group

        def vload(ptr, index, vty, align):
            p = builder.gep(ptr, [index])
            return builder.load(builder.bitcast(p, vty.as_pointer()), align=align, typ=vty)

        with cgutils.for_range(builder, n, intp=_I64) as loop:
            step = builder.mul(loop.index, ir.Constant(_I64, 4))
            gw = builder.add(step, wg)
            gx = builder.add(step, xg)
            sixteen = ir.Constant(_I64, 16)
            w = vload(qd, builder.mul(gw, sixteen), _V64I8, 1)
            f = codes_dot(builder, w, xcd, builder.mul(gx, sixteen))
            scale = builder.fmul(vload(ad, gw, v4f, 4), vload(xdd, gx, v4f, 4))
            scale = builder.shuffle_vector(scale, scale, spread)
            builder.store(_fma(builder, f, scale, builder.load(acc_a)), acc_a)
            bias = _fma4(builder, vload(bd, gw, v4f, 4), vload(xsd, gx, v4f, 4), builder.load(acc_b))
            builder.store(bias, acc_b)
        return builder.fadd(_hsum(builder, builder.load(acc_a)), _hsum(builder, builder.load(acc_b)))

    return sig, codegen

"""Vector building blocks for the block decoders: numba intrinsics emitting explicit <16 x ...> LLVM IR.

Each `_unpack16*` turns 16 quantized values of a GGUF block into float32 with one load, integer shifts and masks,
one conversion and one multiply-add (no fp contraction, so results equal gguf's decoders bit for bit).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Bias for types without one: x + -0.0 == x for every x, so LLVM drops the add (+0.0 would flip -0.0).
_NO_BIAS = np.float32(-0.0)

_IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@intrinsic
def _half_to_f32(typingctx, bits):
    """IEEE half bits (any integer type, low 16 bits used) -> float32; LLVM emits vcvtph2ps where it can."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i16 = ir.IntType(16)
        v = builder.trunc(v, i16) if v.type.width > 16 else builder.zext(v, i16) if v.type.width < 16 else v
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (for BF16: bits << 16)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = ir.IntType(32)
        v = builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


# ---------------------------------------------------------------------------------------------------------
# 16-lane unpack intrinsics. LLVM fully unrolls 16/32-trip loops and then fails to vectorise their stores
# (it cannot prove the weight bytes and the float scratch do not alias), so the per-block inner loops are
# written as explicit <16 x ...> vector IR: one unaligned 16-byte load, shifts/masks in i32 lanes, a
# conversion and a multiply-add, one 64-byte store. No fp contraction: values match gguf's decoders exactly.
# ---------------------------------------------------------------------------------------------------------

_LANES = 16
_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()


def _splat(builder: ir.IRBuilder, value: ir.Value, vty: ir.VectorType) -> ir.Value:
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vty.count), None))


def _arg_i32(context, builder, sig, args, k):
    return context.cast(builder, args[k], sig.args[k], types.int32)


def _arg_i64(context, builder, sig, args, k):
    return context.cast(builder, args[k], sig.args[k], types.int64)


def _arg_f32(context, builder, sig, args, k):
    return context.cast(builder, args[k], sig.args[k], types.float32)


def _load_bytes(context, builder, sig, args, k_array, k_offset):
    """<16 x i8> at array[k_array] + offset (unaligned: blocks are 18, 34, 210 ... bytes)."""
    data = context.make_array(sig.args[k_array])(context, builder, args[k_array]).data
    ptr = builder.gep(data, [_arg_i64(context, builder, sig, args, k_offset)], source_etype=_I8)
    vty = ir.VectorType(_I8, _LANES)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1, typ=vty)


def _field(builder: ir.IRBuilder, bytes_i32: ir.Value, shift: ir.Value, mask: ir.Value) -> ir.Value:
    vty = bytes_i32.type
    return builder.and_(builder.lshr(bytes_i32, _splat(builder, shift, vty)), _splat(builder, mask, vty))


def _store_scaled(context, builder, sig, args, q_i32, k_scale, k_bias):
    """dst[do : do + 16] = scale * float(q) + bias, with args 0, 1 = dst, do."""
    vf = ir.VectorType(_F32, _LANES)
    v = builder.fmul(builder.sitofp(q_i32, vf), _splat(builder, _arg_f32(context, builder, sig, args, k_scale), vf))
    if k_bias is not None:
        v = builder.fadd(v, _splat(builder, _arg_f32(context, builder, sig, args, k_bias), vf))
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    ptr = builder.gep(data, [_arg_i64(context, builder, sig, args, 1)], source_etype=_F32)
    builder.store(v, builder.bitcast(ptr, vf.as_pointer()), align=4)


@intrinsic
def _unpack16(typingctx, dst, do, src, lo, lshift, lmask, hi, hshift, hmask, hpos, qoff, scale, bias):
    """dst[do + i] = scale * (q_i - qoff) + bias for i < 16, with
    q_i = ((src[lo + i] >> lshift) & lmask) | (((src[hi + i] >> hshift) & hmask) << hpos)."""
    sig = types.none(dst, do, src, lo, lshift, lmask, hi, hshift, hmask, hpos, qoff, scale, bias)

    def codegen(context, builder, signature, args):
        vi = ir.VectorType(_I32, _LANES)
        i32 = {k: _arg_i32(context, builder, signature, args, k) for k in (4, 5, 7, 8, 9, 10)}
        low = builder.zext(_load_bytes(context, builder, signature, args, 2, 3), vi)
        high = builder.zext(_load_bytes(context, builder, signature, args, 2, 6), vi)
        q = builder.or_(
            _field(builder, low, i32[4], i32[5]),
            builder.shl(_field(builder, high, i32[7], i32[8]), _splat(builder, i32[9], vi)),
        )
        q = builder.sub(q, _splat(builder, i32[10], vi))
        _store_scaled(context, builder, signature, args, q, 11, 12)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _unpack16_i8(typingctx, dst, do, src, so, scale):
    """dst[do + i] = scale * int8(src[so + i]) for i < 16 (Q8_0)."""
    sig = types.none(dst, do, src, so, scale)

    def codegen(context, builder, signature, args):
        q = builder.sext(_load_bytes(context, builder, signature, args, 2, 3), ir.VectorType(_I32, _LANES))
        _store_scaled(context, builder, signature, args, q, 4, None)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _unpack16_qh(typingctx, dst, do, src, lo, lshift, qh, qhshift, qoff, scale, bias):
    """Q5_0/Q5_1, otherwise as _unpack16: q_i = ((src[lo + i] >> lshift) & 15) | (bit qhshift + i of qh) << 4."""
    sig = types.none(dst, do, src, lo, lshift, qh, qhshift, qoff, scale, bias)

    def codegen(context, builder, signature, args):
        vi = ir.VectorType(_I32, _LANES)
        i32 = {k: _arg_i32(context, builder, signature, args, k) for k in (4, 5, 6, 7)}
        low = builder.zext(_load_bytes(context, builder, signature, args, 2, 3), vi)
        iota = ir.Constant(vi, list(range(_LANES)))
        bits = builder.lshr(_splat(builder, i32[5], vi), builder.add(iota, _splat(builder, i32[6], vi)))
        bits = builder.and_(bits, ir.Constant(vi, [1] * _LANES))
        q = builder.or_(
            _field(builder, low, i32[4], ir.Constant(_I32, 15)),
            builder.shl(bits, ir.Constant(vi, [4] * _LANES)),
        )
        q = builder.sub(q, _splat(builder, i32[7], vi))
        _store_scaled(context, builder, signature, args, q, 8, 9)
        return context.get_dummy_value()

    return sig, codegen


def target_features() -> set[str]:
    """The x86 features ("+avx512f", "+avx512vnni", ...) of the CPU numba compiles for; empty elsewhere.

    numba compiles for the host CPU unless NUMBA_CPU_NAME/NUMBA_CPU_FEATURES say otherwise, and keys its
    on-disk cache by CPU, so a cached kernel always matches the branch chosen from these. A named CPU without
    a feature list (NUMBA_CPU_NAME=haswell) gets the portable IR, which LLVM lowers for that CPU.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    features = numba.config.CPU_FEATURES
    if features is None:
        if numba.config.CPU_NAME not in (None, "host"):
            return set()
        features = llvm_binding.get_host_cpu_features().flatten()
    return set(features.split(","))


def _x86_permute() -> str | None:
    """The widest x86 float permute the compile target has ("avx512f", "avx2"), else None."""
    flags = target_features()
    return "avx512f" if "+avx512f" in flags else "avx2" if "+avx2" in flags else None


_PERMUTE = _x86_permute()


def _lookup16(builder: ir.IRBuilder, idx: ir.Value, table: list[float]) -> ir.Value:
    """<16 x float> table[idx] for idx in 0..15: one vpermps (AVX-512), two plus a blend (AVX2), or a
    4-level tree of selects on the index bits (any target). All exact."""
    vi, vf = idx.type, ir.VectorType(_F32, _LANES)
    if _PERMUTE == "avx512f":
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.sf.512", fnty=ir.FunctionType(vf, [vf, vi]))
        return builder.call(fn, [ir.Constant(vf, table), idx])
    if _PERMUTE == "avx2":
        v8f, v8i = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
        fn = builder.module.declare_intrinsic("llvm.x86.avx2.permps", fnty=ir.FunctionType(v8f, [v8f, v8i]))
        lo_t, hi_t = ir.Constant(v8f, table[:8]), ir.Constant(v8f, table[8:])
        halves = []
        for h in range(2):
            part = builder.shuffle_vector(idx, idx, ir.Constant(v8i, list(range(8 * h, 8 * h + 8))))
            upper = builder.icmp_unsigned(">", part, ir.Constant(v8i, [7] * 8))
            halves.append(builder.select(upper, builder.call(fn, [hi_t, part]), builder.call(fn, [lo_t, part])))
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
    level = [ir.Constant(vf, [v] * _LANES) for v in table]
    for bit in range(4):
        on = builder.icmp_unsigned(
            "!=", builder.and_(idx, ir.Constant(vi, [1 << bit] * _LANES)), ir.Constant(vi, [0] * _LANES)
        )
        level = [builder.select(on, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
    return level[0]


@intrinsic
def _unpack16_iq4(typingctx, dst, do, src, lo, lshift, scale):
    """IQ4_NL/IQ4_XS: dst[do + i] = scale * T[(src[lo + i] >> lshift) & 15], T the 16-entry non-linear grid."""
    sig = types.none(dst, do, src, lo, lshift, scale)

    def codegen(context, builder, signature, args):
        vi = ir.VectorType(_I32, _LANES)
        vf = ir.VectorType(_F32, _LANES)
        low = builder.zext(_load_bytes(context, builder, signature, args, 2, 3), vi)
        idx = _field(builder, low, _arg_i32(context, builder, signature, args, 4), ir.Constant(_I32, 15))
        v = _lookup16(builder, idx, [float(t) for t in _IQ4_VALUES])
        v = builder.fmul(v, _splat(builder, _arg_f32(context, builder, signature, args, 5), vf))
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [_arg_i64(context, builder, signature, args, 1)], source_etype=_F32)
        builder.store(v, builder.bitcast(ptr, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _f16_at(src: np.ndarray, o: int) -> np.float32:
    """The f16 stored little-endian at byte offset o (block scales sit at unaligned offsets)."""
    return _half_to_f32(np.uint16(src[o]) | (np.uint16(src[o + 1]) << np.uint16(8)))


@njit(cache=True)
def _i8(v: np.uint8) -> np.float32:
    """A byte reinterpreted as a signed int8 value, as float32."""
    return np.float32(np.int32(v) - ((np.int32(v) & 128) << 1))


@intrinsic
def _prefetch(typingctx, arr, offset):
    """Hint the CPU to fetch arr's byte at `offset` into cache (llvm.prefetch, read, high locality)."""
    if not isinstance(arr, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [_arg_i64(context, builder, sig, args, 1)], source_etype=_I8)
        i8p = _I8.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        builder.call(fn, [builder.bitcast(ptr, i8p), _I32(0), _I32(3), _I32(1)])
        return context.get_dummy_value()

    return types.none(arr, offset), codegen

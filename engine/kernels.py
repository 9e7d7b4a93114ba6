"""Fused dequantize-and-multiply CPU kernels (numba) that read GGUF quant blocks where they lie.

Legend: R rows (output features), C columns (input features), T tokens, B blocks per row, QK values per block.

Decode (T <= MATVEC_MAX_T): each row is decoded 4096 values at a time into an L1 scratch and dotted with all T
token vectors, so the weight bytes are read once per call and never widened to a float32 copy in memory.
Prefill (larger T): a tile of rows is decoded into a float32 scratch (<= 16 MiB) and BLAS does `x @ tile.T`.
Block layouts follow docs/deepseek2.md §6 and gguf 0.19's `gguf.quants` decoders bit for bit (every decoded
value is the float32 `gguf.quants.dequantize` gives; only the dot's summation order differs).
Parallel loops run on numba's threading layer (OpenMP or TBB where installed: safe to call from several Python
threads; numba's fallback "workqueue" layer is not).
"""

from __future__ import annotations

import os
import platform

# OpenMP workers spin ~300k iterations after each parallel region by default, stealing the cores OpenBLAS needs
# right after (prefill alternates decode tiles and BLAS calls): 2 threads ran 7x slower than 1. A short spin keeps
# decode's back-to-back kernel launches fast. Must be set before libgomp loads.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# GGML type ids (gguf.GGMLQuantizationType), repeated here because jitted code needs plain ints.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, BF16 = 10, 11, 12, 13, 14, 20, 23, 30

# qtype -> (values per block, bytes per block).
BLOCK: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    IQ4_NL: (32, 18),
    Q2_K: (256, 84),
    Q3_K: (256, 110),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
    IQ4_XS: (256, 136),
}

# Up to this many tokens the matvec kernel wins: it reads the weights once and each extra token costs one
# L1-resident dot, while the tiled path pays a full decode plus BLAS calls that are slow for small T
# (measured on 2048x2048 Q4_K/Q8_0, one thread: equal at T = 16, matvec 2x faster at T = 8).
MATVEC_MAX_T = 16
# Float32 scratch per prefill tile (as engine.quant's generic path). Tile size barely matters on one thread,
# but every tile is one hand-over between numba's and BLAS's thread pools, which is slow on a busy machine.
_TILE_BYTES = 16 << 20
# Rows per parallel task of the matvec: amortises the scratch allocation, keeps tasks balanced.
_ROWS_PER_TASK = 16
# Values decoded per matvec step: a 16 KiB scratch that stays in L1 next to the token vectors' slices.
_CHUNK_VALUES = 4096
# reassoc lets LLVM vectorise the dot reductions, contract allows FMA; NaN/inf semantics stay IEEE.
_FASTMATH = {"reassoc", "contract"}

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
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, _LANES), None))


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


def _x86_permute() -> str | None:
    """The widest x86 float permute the compile target has ("avx512f", "avx2"), else None.

    numba compiles for the host CPU unless NUMBA_CPU_NAME/NUMBA_CPU_FEATURES say otherwise, and keys its
    on-disk cache by CPU, so a cached kernel always matches the branch chosen here.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    features = numba.config.CPU_FEATURES
    if features is None:
        if numba.config.CPU_NAME not in (None, "host"):
            return None
        features = llvm_binding.get_host_cpu_features().flatten()
    flags = set(features.split(","))
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


# ---------------------------------------------------------------------------------------------------------
# Row decoders: src = one row's bytes (uint8 [B * block bytes]), dst = float32 [C]; each 16-value group of a
# block is one _unpack16* call with the block's scales computed once.
# ---------------------------------------------------------------------------------------------------------


@njit(cache=True)
def _dec_f16(src: np.ndarray, dst: np.ndarray) -> None:
    for i in range(dst.size):
        dst[i] = _half_to_f32(np.uint16(src[2 * i]) | (np.uint16(src[2 * i + 1]) << np.uint16(8)))


@njit(cache=True)
def _dec_bf16(src: np.ndarray, dst: np.ndarray) -> None:
    for i in range(dst.size):
        dst[i] = _bits_to_f32((np.uint32(src[2 * i]) << np.uint32(16)) | (np.uint32(src[2 * i + 1]) << np.uint32(24)))


@njit(cache=True)
def _dec_f32(src: np.ndarray, dst: np.ndarray) -> None:
    for i in range(dst.size):
        o = 4 * i
        bits = (
            np.uint32(src[o])
            | (np.uint32(src[o + 1]) << np.uint32(8))
            | (np.uint32(src[o + 2]) << np.uint32(16))
            | (np.uint32(src[o + 3]) << np.uint32(24))
        )
        dst[i] = _bits_to_f32(bits)


@njit(cache=True)
def _dec_q8_0(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 34 * b
        d = _f16_at(src, o)
        _unpack16_i8(dst, 32 * b, src, o + 2, d)
        _unpack16_i8(dst, 32 * b + 16, src, o + 18, d)


@njit(cache=True)
def _dec_q4_0(src: np.ndarray, dst: np.ndarray) -> None:
    # qs[16] @2: value j < 16 is the low nibble of qs[j], value 16 + j the high nibble.
    for b in range(dst.size // 32):
        o = 18 * b
        d = _f16_at(src, o)
        _unpack16(dst, 32 * b, src, o + 2, 0, 15, o, 0, 0, 0, 8, d, _NO_BIAS)
        _unpack16(dst, 32 * b + 16, src, o + 2, 4, 15, o, 0, 0, 0, 8, d, _NO_BIAS)


@njit(cache=True)
def _dec_q4_1(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 20 * b
        d = _f16_at(src, o)
        m = _f16_at(src, o + 2)
        _unpack16(dst, 32 * b, src, o + 4, 0, 15, o, 0, 0, 0, 0, d, m)
        _unpack16(dst, 32 * b + 16, src, o + 4, 4, 15, o, 0, 0, 0, 0, d, m)


@njit(cache=True)
def _qh32(src: np.ndarray, o: int) -> int:
    """The little-endian uint32 of 5th bits in Q5_0/Q5_1 blocks."""
    return np.int64(src[o]) | (np.int64(src[o + 1]) << 8) | (np.int64(src[o + 2]) << 16) | (np.int64(src[o + 3]) << 24)


@njit(cache=True)
def _dec_q5_0(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, qh @2, qs @6: value e (nibble order as Q4_0) takes its 5th bit from bit e of qh.
    for b in range(dst.size // 32):
        o = 22 * b
        d = _f16_at(src, o)
        qh = _qh32(src, o + 2)
        _unpack16_qh(dst, 32 * b, src, o + 6, 0, qh, 0, 16, d, _NO_BIAS)
        _unpack16_qh(dst, 32 * b + 16, src, o + 6, 4, qh, 16, 16, d, _NO_BIAS)


@njit(cache=True)
def _dec_q5_1(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 24 * b
        d = _f16_at(src, o)
        m = _f16_at(src, o + 2)
        qh = _qh32(src, o + 4)
        _unpack16_qh(dst, 32 * b, src, o + 8, 0, qh, 0, 0, d, m)
        _unpack16_qh(dst, 32 * b + 16, src, o + 8, 4, qh, 16, 0, d, m)


@njit(cache=True)
def _dec_iq4_nl(src: np.ndarray, dst: np.ndarray) -> None:
    for b in range(dst.size // 32):
        o = 18 * b
        d = _f16_at(src, o)
        _unpack16_iq4(dst, 32 * b, src, o + 2, 0, d)
        _unpack16_iq4(dst, 32 * b + 16, src, o + 2, 4, d)


@njit(cache=True)
def _dec_q2_k(src: np.ndarray, dst: np.ndarray) -> None:
    # scales[16] @0 (low 4 bits scale, high 4 bits min), qs[64] @16, d @80, dmin @82; value e = 128h + 32s + l
    # takes 2 bits (2s) of qs[32h + l] and the scale of its 16-value sub-block e // 16.
    for b in range(dst.size // 256):
        o = 84 * b
        d = _f16_at(src, o + 80)
        dmin = _f16_at(src, o + 82)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    sc = np.int32(src[o + 8 * h + 2 * s + half])
                    a = d * np.float32(sc & 15)
                    m = dmin * np.float32(sc >> 4)
                    base = 256 * b + 128 * h + 32 * s + 16 * half
                    _unpack16(dst, base, src, o + 16 + 32 * h + 16 * half, 2 * s, 3, o, 0, 0, 0, 0, a, -m)


@njit(cache=True)
def _dec_q3_k(src: np.ndarray, dst: np.ndarray) -> None:
    # hmask[32] @0, qs[64] @32, scales[12] @96 (16 6-bit scales, -32), d @108; value e = 128h + 32s + l has
    # low bits 2s of qs[32h + l] and loses 4 unless bit 4h + s of hmask[l] is set: q = (low | hbit << 2) - 4.
    for b in range(dst.size // 256):
        o = 110 * b
        d = _f16_at(src, o + 108)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    j = 8 * h + 2 * s + half
                    lo = (np.int32(src[o + 96 + (j & 7)]) >> (4 * (j >> 3))) & 15
                    hi = (np.int32(src[o + 104 + (j & 3)]) >> (2 * (j >> 2))) & 3
                    a = d * np.float32((lo | (hi << 4)) - 32)
                    base = 256 * b + 128 * h + 32 * s + 16 * half
                    q0 = o + 32 + 32 * h + 16 * half
                    _unpack16(dst, base, src, q0, 2 * s, 3, o + 16 * half, 4 * h + s, 1, 2, 4, a, _NO_BIAS)


@njit(cache=True)
def _scale_min_k4(src: np.ndarray, o: int, j: int) -> tuple[int, int]:
    """Sub-block j's 6-bit (scale, min) of a Q4_K/Q5_K block whose 12 packed scale bytes start at o."""
    if j < 4:
        return np.int32(src[o + j]) & 63, np.int32(src[o + j + 4]) & 63
    sc = (np.int32(src[o + j + 4]) & 15) | ((np.int32(src[o + j - 4]) >> 6) << 4)
    m = (np.int32(src[o + j + 4]) >> 4) | ((np.int32(src[o + j]) >> 6) << 4)
    return sc, m


@njit(cache=True)
def _dec_q4_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, dmin @2, scales @4, qs[128] @16: chunk g's 32 bytes hold sub-block 2g (low) and 2g + 1 (high).
    for b in range(dst.size // 256):
        o = 144 * b
        d = _f16_at(src, o)
        dmin = _f16_at(src, o + 2)
        for g in range(4):
            for k in range(2):
                sc, m = _scale_min_k4(src, o + 4, 2 * g + k)
                a, c = d * np.float32(sc), dmin * np.float32(m)
                for half in range(2):
                    base = 256 * b + 64 * g + 32 * k + 16 * half
                    _unpack16(dst, base, src, o + 16 + 32 * g + 16 * half, 4 * k, 15, o, 0, 0, 0, 0, a, -c)


@njit(cache=True)
def _dec_q5_k(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, dmin @2, scales @4, qh[32] @16, qs[128] @48: sub-block j = 2g + k has its 5th bits in bit j of qh.
    for b in range(dst.size // 256):
        o = 176 * b
        d = _f16_at(src, o)
        dmin = _f16_at(src, o + 2)
        for g in range(4):
            for k in range(2):
                sc, m = _scale_min_k4(src, o + 4, 2 * g + k)
                a, c = d * np.float32(sc), dmin * np.float32(m)
                for half in range(2):
                    base = 256 * b + 64 * g + 32 * k + 16 * half
                    q0 = o + 48 + 32 * g + 16 * half
                    _unpack16(dst, base, src, q0, 4 * k, 15, o + 16 + 16 * half, 2 * g + k, 1, 4, 0, a, -c)


@njit(cache=True)
def _dec_q6_k(src: np.ndarray, dst: np.ndarray) -> None:
    # ql[128] @0, qh[64] @128, int8 scales[16] @192, d @208; value e = 128h + 32s + l:
    # low 4 bits from ql[64h + 32(s % 2) + l] (nibble s // 2), high 2 bits (2s) from qh[32h + l].
    for b in range(dst.size // 256):
        o = 210 * b
        d = _f16_at(src, o + 208)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    a = d * _i8(src[o + 192 + 8 * h + 2 * s + half])
                    base = 256 * b + 128 * h + 32 * s + 16 * half
                    l0 = o + 64 * h + 32 * (s & 1) + 16 * half
                    h0 = o + 128 + 32 * h + 16 * half
                    _unpack16(dst, base, src, l0, 4 * (s >> 1), 15, h0, 2 * s, 3, 4, 32, a, _NO_BIAS)


@njit(cache=True)
def _dec_iq4_xs(src: np.ndarray, dst: np.ndarray) -> None:
    # d @0, scales_h u16 @2, scales_l[4] @4, qs[128] @8; sub-block ib: low nibbles of its 16 bytes, then high.
    for b in range(dst.size // 256):
        o = 136 * b
        d = _f16_at(src, o)
        sh = np.int32(src[o + 2]) | (np.int32(src[o + 3]) << 8)
        for ib in range(8):
            ls = ((np.int32(src[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            a = d * np.float32(ls - 32)
            _unpack16_iq4(dst, 256 * b + 32 * ib, src, o + 8 + 16 * ib, 0, a)
            _unpack16_iq4(dst, 256 * b + 32 * ib + 16, src, o + 8 + 16 * ib, 4, a)


@njit(cache=True)
def _decode_row(qtype: int, src: np.ndarray, dst: np.ndarray) -> None:
    """Decode one row of any supported type; the branch is taken once per row, not per value."""
    if qtype == Q8_0:
        _dec_q8_0(src, dst)
    elif qtype == Q4_K:
        _dec_q4_k(src, dst)
    elif qtype == Q6_K:
        _dec_q6_k(src, dst)
    elif qtype == Q5_K:
        _dec_q5_k(src, dst)
    elif qtype == Q4_0:
        _dec_q4_0(src, dst)
    elif qtype == Q4_1:
        _dec_q4_1(src, dst)
    elif qtype == Q5_0:
        _dec_q5_0(src, dst)
    elif qtype == Q5_1:
        _dec_q5_1(src, dst)
    elif qtype == IQ4_NL:
        _dec_iq4_nl(src, dst)
    elif qtype == IQ4_XS:
        _dec_iq4_xs(src, dst)
    elif qtype == Q2_K:
        _dec_q2_k(src, dst)
    elif qtype == Q3_K:
        _dec_q3_k(src, dst)
    elif qtype == F16:
        _dec_f16(src, dst)
    elif qtype == BF16:
        _dec_bf16(src, dst)
    elif qtype == F32:
        _dec_f32(src, dst)


@njit(cache=True, fastmath=_FASTMATH)
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i] * b[i]
    return s


@njit(cache=True, fastmath=_FASTMATH)
def _dot4(w: np.ndarray, x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, x3: np.ndarray) -> tuple:
    """Four dots sharing one pass over w (the decoded weights are loaded once per four tokens)."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(w.size):
        v = w[i]
        s0 += v * x0[i]
        s1 += v * x1[i]
        s2 += v * x2[i]
        s3 += v * x3[i]
    return s0, s1, s2, s3


@njit(cache=True, fastmath=_FASTMATH)
def _dot_tokens(w: np.ndarray, x: np.ndarray, c0: int, acc: np.ndarray) -> None:
    """acc[t] += w . x[t, c0 : c0 + len(w)] for every token t."""
    n = w.size
    T = x.shape[0]
    t = 0
    while t + 4 <= T:
        s0, s1, s2, s3 = _dot4(
            w, x[t, c0 : c0 + n], x[t + 1, c0 : c0 + n], x[t + 2, c0 : c0 + n], x[t + 3, c0 : c0 + n]
        )
        acc[t] += s0
        acc[t + 1] += s1
        acc[t + 2] += s2
        acc[t + 3] += s3
        t += 4
    while t < T:
        acc[t] += _dot(w, x[t, c0 : c0 + n])
        t += 1


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matvec_kernel(raw: np.ndarray, qtype: int, qk: int, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, r] = x[t] . row r: each chunk of a row is decoded once into an L1 scratch and dotted with all T
    tokens, so the weight bytes are read once per call whatever T is."""
    R, row_bytes = raw.shape
    T, C = x.shape
    blocks = C // qk
    block_bytes = row_bytes // blocks
    chunk = max(1, _CHUNK_VALUES // qk)  # blocks per chunk
    tasks = (R + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for k in prange(tasks):
        buf = np.empty(min(blocks, chunk) * qk, np.float32)
        acc = np.empty(T, np.float32)
        for r in range(k * _ROWS_PER_TASK, min(R, (k + 1) * _ROWS_PER_TASK)):
            row = raw[r]
            acc[:] = 0.0
            for b0 in range(0, blocks, chunk):
                b1 = min(blocks, b0 + chunk)
                w = buf[: (b1 - b0) * qk]
                _decode_row(qtype, row[b0 * block_bytes : b1 * block_bytes], w)
                _dot_tokens(w, x, b0 * qk, acc)
            for t in range(T):
                out[t, r] = acc[t]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _gather_matvec_kernel(
    raw: np.ndarray, qtype: int, qk: int, experts: np.ndarray, x: np.ndarray, out: np.ndarray
) -> None:
    """out[n, r] = x[n] . row r of matrix experts[n] of a stacked [E, R, bytes] tensor: all selected experts of
    an MoE layer in one parallel launch (decode calls many small matrices; launches, not bytes, dominated)."""
    R, row_bytes = raw.shape[1], raw.shape[2]
    N, C = x.shape
    blocks = C // qk
    block_bytes = row_bytes // blocks
    chunk = max(1, _CHUNK_VALUES // qk)
    per = (R + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for k in prange(N * per):
        n = k // per
        e = experts[n]
        buf = np.empty(min(blocks, chunk) * qk, np.float32)
        for r in range((k % per) * _ROWS_PER_TASK, min(R, (k % per + 1) * _ROWS_PER_TASK)):
            row = raw[e, r]
            acc = np.float32(0.0)
            for b0 in range(0, blocks, chunk):
                b1 = min(blocks, b0 + chunk)
                w = buf[: (b1 - b0) * qk]
                _decode_row(qtype, row[b0 * block_bytes : b1 * block_bytes], w)
                acc += _dot(w, x[n, b0 * qk : b1 * qk])
            out[n, r] = acc


@njit(parallel=True, cache=True)
def _dequantize_kernel(raw: np.ndarray, qtype: int, out: np.ndarray) -> None:
    for r in prange(raw.shape[0]):
        _decode_row(qtype, raw[r], out[r])


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def supports(qtype: int) -> bool:
    """Whether these kernels decode this GGML type."""
    return int(qtype) in BLOCK


def set_threads(n: int) -> int:
    """Use n threads in the kernels (clipped to 1..NUMBA_NUM_THREADS); returns the count set.

    numba keeps this per calling thread, so call it from the thread that runs the model.
    """
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def get_threads() -> int:
    return numba.get_num_threads()


def row_bytes(qtype: int, columns: int) -> int:
    """Bytes of one encoded row of `columns` values."""
    qk, nbytes = BLOCK[int(qtype)]
    if columns % qk:
        raise ValueError(f"{columns} columns is not a multiple of the {qk}-value block of type {qtype}")
    return columns // qk * nbytes


def _as_rows(raw: np.ndarray, qtype: int, shape: tuple[int, int]) -> np.ndarray:
    """The encoded weight as a read-only C-contiguous uint8 [R, row bytes] view (one jit specialisation)."""
    if not supports(qtype):
        raise ValueError(f"no kernel for GGML type {qtype}")
    R, C = (int(s) for s in shape)
    a = np.ascontiguousarray(raw)  # a no-op for the reader's memory-mapped tensors
    rows = a.view(np.uint8).reshape(R, row_bytes(qtype, C))
    rows = rows.view()
    rows.flags.writeable = False
    return rows


def dequantize_rows(raw: np.ndarray, qtype: int, shape: tuple[int, int]) -> np.ndarray:
    """Encoded rows -> float32 [R, C] (embedding lookups, small tensors); pass raw[index] for a row subset."""
    rows = _as_rows(raw, qtype, shape)
    out = np.empty((rows.shape[0], int(shape[1])), np.float32)
    if rows.shape[0]:
        _dequantize_kernel(rows, int(qtype), out)
    return out


def _tokens(x: np.ndarray, columns: int) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, columns)


def matvec(raw: np.ndarray, qtype: int, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W.T for few tokens, x [T, C] -> [T, R]: one pass over the weight bytes for all T tokens."""
    rows = _as_rows(raw, qtype, shape)
    x = _tokens(x, int(shape[1]))
    out = np.empty((x.shape[0], rows.shape[0]), np.float32)
    if out.size:
        _matvec_kernel(rows, int(qtype), BLOCK[int(qtype)][0], x, out)
    return out


def matmul_tiled(raw: np.ndarray, qtype: int, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W.T for many tokens, x [T, C] -> [T, R]: decode 16 MiB tiles of rows, multiply each with BLAS."""
    rows = _as_rows(raw, qtype, shape)
    R, C = rows.shape[0], int(shape[1])
    x = _tokens(x, C)
    out = np.empty((x.shape[0], R), np.float32)
    step = max(1, _TILE_BYTES // (4 * C))
    tile = np.empty((min(step, R), C), np.float32)
    for r0 in range(0, R, step):
        w = tile[: min(step, R - r0)]
        _dequantize_kernel(rows[r0 : r0 + w.shape[0]], int(qtype), w)
        np.matmul(x, w.T, out=out[:, r0 : r0 + w.shape[0]])
    return out


def matmul_t(raw: np.ndarray, qtype: int, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W.T for W [R, C] in its GGUF encoding: x [..., C] -> [..., R] float32 (matvec or tiled by T)."""
    R, C = (int(s) for s in shape)
    lead = np.shape(x)[:-1]
    if int(qtype) == F32:
        return np.asarray(x, dtype=np.float32) @ np.ascontiguousarray(raw).view(np.float32).reshape(R, C).T
    T = int(np.prod(lead, dtype=np.int64))
    y = matvec(raw, qtype, shape, x) if T <= MATVEC_MAX_T else matmul_tiled(raw, qtype, shape, x)
    return y.reshape(*lead, R)


def gather_matvec(raw: np.ndarray, qtype: int, shape: tuple[int, int, int], experts: np.ndarray,
                  x: np.ndarray) -> np.ndarray:
    """For a stacked weight [E, R, C]: out[n] = x[n] @ W[experts[n]].T, x [N, C] -> [N, R] (one launch)."""
    E, R, C = (int(s) for s in shape)
    if not supports(qtype):
        raise ValueError(f"no kernel for GGML type {qtype}")
    a = np.ascontiguousarray(raw).view(np.uint8).reshape(E, R, row_bytes(qtype, C))
    a = a.view()
    a.flags.writeable = False
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, C)
    ids = np.ascontiguousarray(experts, dtype=np.int64)
    if ids.shape[0] != x.shape[0] or (ids.size and (ids.min() < 0 or ids.max() >= E)):
        raise ValueError(f"expert ids {ids.tolist()} do not fit {E} experts and {x.shape[0]} inputs")
    out = np.empty((x.shape[0], R), np.float32)
    if out.size:
        _gather_matvec_kernel(a, int(qtype), BLOCK[int(qtype)][0], ids, x, out)
    return out

"""CUDA C source of the weight kernels, generated per GGML type from small templates, and its loading (CuPy).

Legend: R rows (output features), C columns (input features), T tokens, N matrices (pairs) of a launch,
QK values per block, P lane parts per block (a part is the 8 values one lane decodes in one step).

Every type has one decoder `dec8_<type>(block, part, w, c0, c1)`: the 8 values of a part and the columns they
sit at inside the block (two runs of 4: c0..c0+3 and c1..c1+3). Three kernels per type use it, so decode and
prefill read the same layout (docs/deepseek2.md §6, gguf 0.19's decoders):
- `mv_<type>_t<TMAX>`: y = x @ W.T for up to TMAX tokens, one warp per NR rows; with an `ids` array, launch
  row n uses matrix ids[n] of a stacked [E, R, C] tensor (MoE: only the selected experts are read).
- `dq_<type>`: rows (all, or those listed in `ids`) decoded to f16 (prefill tiles for cuBLAS) or f32.
The decoders and the per-lane loop are plain C as well: the tests compile them for the host with a C compiler
and compare with gguf's decoders, since a CI machine has no GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

from engine.block_decoders import F16, F32, Q4_K, Q5_K, Q6_K, Q8_0

WARPS = 4  # warps per thread block of the matvec kernel
NR = 2  # rows per warp: the lane's slice of x is loaded once for NR rows
TMAX_VARIANTS = (1, 8)  # matvec kernels are built for 1 token and for up to 8
MATVEC_MAX_T = TMAX_VARIANTS[-1]  # more tokens go through f16 tiles and cuBLAS
DQ_THREADS = 256


@dataclass(frozen=True)
class KernelType:
    """A GGML type as the kernels see it: F16/F32 rows are cut into pseudo-blocks of 8 values."""

    name: str  # suffix of the kernel names
    qk: int  # values per block
    block_bytes: int
    parts: int  # lanes' parts per block = qk / 8
    decoder: str  # the dec8 body


_Q8_0 = r"""
    const float d = h2f(ld16(b));
    const u8* q = b + 2 + 8 * p;
    UNROLL for (int k = 0; k < 4; ++k) {
        const u32 v = ld16(q + 2 * k);
        w[2 * k] = d * i8f(v & 0xFFu);
        w[2 * k + 1] = d * i8f(v >> 8);
    }
    *c0 = 8 * p;
    *c1 = 8 * p + 4;
"""

# Q4_K / Q5_K: part p covers bytes 4m..4m+3 of chunk g (p = 8g + m); the low nibbles are sub-block 2g, the
# high nibbles sub-block 2g + 1, 32 columns further on.
_K4_HEAD = r"""
    const int g = p >> 3, m4 = (p & 7) * 4;
    const u32 dd = ld32(b);
    const float d = h2f(dd & 0xFFFFu), dmin = h2f(dd >> 16);
    int sc0, mn0, sc1, mn1;
    scale_min_k4(b + 4, 2 * g, &sc0, &mn0);
    scale_min_k4(b + 4, 2 * g + 1, &sc1, &mn1);
    const float a0 = d * (float)sc0, o0 = dmin * (float)mn0;
    const float a1 = d * (float)sc1, o1 = dmin * (float)mn1;
"""
_Q4_K = _K4_HEAD + r"""
    const u32 q = ld32(b + 16 + 32 * g + m4);
    UNROLL for (int k = 0; k < 4; ++k) {
        const u32 v = (q >> (8 * k)) & 0xFFu;
        w[k] = a0 * u2f(v & 15u) - o0;
        w[4 + k] = a1 * u2f(v >> 4) - o1;
    }
    *c0 = 64 * g + m4;
    *c1 = 64 * g + 32 + m4;
"""
_Q5_K = _K4_HEAD + r"""
    const u32 q = ld32(b + 48 + 32 * g + m4);
    const u32 qh = ld32(b + 16 + m4);  /* bit j of qh[l] is the 5th bit of value l of sub-block j */
    UNROLL for (int k = 0; k < 4; ++k) {
        const u32 v = (q >> (8 * k)) & 0xFFu, h = (qh >> (8 * k)) & 0xFFu;
        w[k] = a0 * u2f((v & 15u) | (((h >> (2 * g)) & 1u) << 4)) - o0;
        w[4 + k] = a1 * u2f((v >> 4) | (((h >> (2 * g + 1)) & 1u) << 4)) - o1;
    }
    *c0 = 64 * g + m4;
    *c1 = 64 * g + 32 + m4;
"""
# Q6_K: value 128h + 32s + l has its low 4 bits in ql[64h + 32(s % 2) + l] (nibble s / 2) and its high 2 bits
# at bit 2s of qh[32h + l]; part p = 16h + 8sg + j takes l = 4j..4j+3 for s = sg (low nibbles) and s = sg + 2
# (high nibbles of the same bytes).
_Q6_K = r"""
    const int h = p >> 4, sg = (p >> 3) & 1, j = p & 7;
    const float d = h2f(ld16(b + 208));
    const u8* ql = b + 64 * h + 32 * sg + 4 * j;
    const u8* qh = b + 128 + 32 * h + 4 * j;
    const u32 lo = ld16(ql) | (ld16(ql + 2) << 16);
    const u32 hi = ld16(qh) | (ld16(qh + 2) << 16);
    const signed char* sc = (const signed char*)(b + 192);
    const float a0 = d * (float)sc[8 * h + 2 * sg + (j >> 2)];
    const float a1 = d * (float)sc[8 * h + 2 * (sg + 2) + (j >> 2)];
    UNROLL for (int k = 0; k < 4; ++k) {
        const u32 v = (lo >> (8 * k)) & 0xFFu, e = (hi >> (8 * k)) & 0xFFu;
        w[k] = a0 * q6f((v & 15u) | (((e >> (2 * sg)) & 3u) << 4));
        w[4 + k] = a1 * q6f((v >> 4) | (((e >> (2 * sg + 4)) & 3u) << 4));
    }
    *c0 = 128 * h + 32 * sg + 4 * j;
    *c1 = *c0 + 64;
"""
_F16 = r"""
    (void)p;
    UNROLL for (int k = 0; k < 4; ++k) {
        const u32 v = ld32(b + 4 * k);
        w[2 * k] = h2f(v & 0xFFFFu);
        w[2 * k + 1] = h2f(v >> 16);
    }
    *c0 = 0;
    *c1 = 4;
"""
_F32 = r"""
    (void)p;
    UNROLL for (int k = 0; k < 8; ++k) w[k] = as_float(ld32(b + 4 * k));
    *c0 = 0;
    *c1 = 4;
"""

TYPES: dict[int, KernelType] = {
    Q8_0: KernelType("q8_0", 32, 34, 4, _Q8_0),
    Q4_K: KernelType("q4_k", 256, 144, 32, _Q4_K),
    Q5_K: KernelType("q5_k", 256, 176, 32, _Q5_K),
    Q6_K: KernelType("q6_k", 256, 210, 32, _Q6_K),
    F16: KernelType("f16", 8, 16, 1, _F16),
    F32: KernelType("f32", 8, 32, 1, _F32),
}

# Helpers the decoders use. Integers become floats through the exponent trick (2^23 + q, minus 2^23): exact for
# these small q and cheaper than an int-to-float conversion per weight.
SHARED_HELPERS = r"""
DEV float u2f(u32 q) { return as_float(0x4B000000u | q) - 8388608.0f; }
DEV float i8f(u32 byte) { return as_float(0x4B000000u | (byte ^ 0x80u)) - 8388736.0f; }
DEV float q6f(u32 q) { return as_float(0x4B000000u | q) - 8388640.0f; }
DEV void scale_min_k4(const u8* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}
"""

# The device prelude: no headers (NVRTC finds none without a CUDA toolkit); f16 conversions are PTX.
DEVICE_PRELUDE = r"""
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
#define DEV __device__ __forceinline__
#define UNROLL _Pragma("unroll")
typedef float4 vec4;
DEV float as_float(u32 u) { return __int_as_float((int)u); }
DEV u32 ld16(const u8* p) { return *(const u16*)p; }
DEV u32 ld32(const u8* p) { return *(const u32*)p; }
DEV vec4 ld4f(const float* p) { return *(const vec4*)p; }
DEV float h2f(u32 h) {
    float f;
    const u16 s = (u16)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
    return f;
}
DEV u32 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
DEV float warp_sum(float v) {
    UNROLL for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}
"""


def _type_functions(t: KernelType) -> str:
    """dec8 and the per-lane matvec loops (one per TMAX): the part shared by the device and the host tests."""
    out = [f"DEV void dec8_{t.name}(const u8* b, int p, float* w, int* c0, int* c1) {{{t.decoder}}}\n"]
    out += [_fill(_LANE, t, tmax) for tmax in TMAX_VARIANTS]
    return "".join(out)


# One lane's share of NR rows times T tokens: units (block, part) lane, lane + 32, ...; acc[r * TMAX + t].
_LANE = r"""
DEV void lane_@T_t@TMAX(const u8* rows, long long row_bytes, int nr, const float* x, int C, int T, int lane,
                        float* acc) {
    const int units = (C / @QK) * @P;
    for (int u = lane; u < units; u += 32) {
        const int blk = u / @P, p = u - blk * @P;
        float w[@NR][8];
        int c0 = 0, c1 = 0;
        UNROLL for (int r = 0; r < @NR; ++r) {
            if (r < nr) {
                dec8_@T(rows + r * row_bytes + (long long)blk * @BB, p, w[r], &c0, &c1);
            } else {
                UNROLL for (int k = 0; k < 8; ++k) w[r][k] = 0.0f;
            }
        }
        c0 += blk * @QK;
        c1 += blk * @QK;
        UNROLL for (int t = 0; t < @TMAX; ++t) {
            if (t < T) {
                const vec4 a = ld4f(x + (long long)t * C + c0), e = ld4f(x + (long long)t * C + c1);
                UNROLL for (int r = 0; r < @NR; ++r) {
                    acc[r * @TMAX + t] += w[r][0] * a.x + w[r][1] * a.y + w[r][2] * a.z + w[r][3] * a.w
                                        + w[r][4] * e.x + w[r][5] * e.y + w[r][6] * e.z + w[r][7] * e.w;
                }
            }
        }
    }
}
"""

# grid (ceil(R / (WARPS * NR)), N); x [N, T, C], y [N, T, R]; ids (int64 [N]) picks each launch row's matrix.
_MATVEC = r"""
extern "C" __global__ void __launch_bounds__(@WARPS * 32)
mv_@T_t@TMAX(const u8* __restrict__ W, long long mat_bytes, const long long* __restrict__ ids,
            const float* __restrict__ x, float* __restrict__ y, int R, int C, int T) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n = blockIdx.y;
    const int row0 = (blockIdx.x * @WARPS + warp) * @NR;
    if (row0 >= R) return;  /* the whole warp leaves together */
    const long long row_bytes = (long long)(C / @QK) * @BB;
    const long long mat = ids ? ids[n] : 0;
    const int nr = min(@NR, R - row0);
    float acc[@NR * @TMAX];
    UNROLL for (int i = 0; i < @NR * @TMAX; ++i) acc[i] = 0.0f;
    lane_@T_t@TMAX(W + mat * mat_bytes + (long long)row0 * row_bytes, row_bytes, nr, x + (long long)n * T * C, C, T,
                  lane, acc);
    UNROLL for (int r = 0; r < @NR; ++r) {
        UNROLL for (int t = 0; t < @TMAX; ++t) {
            const float v = warp_sum(acc[r * @TMAX + t]);
            if (lane == 0 && r < nr && t < T) y[((long long)n * T + t) * R + row0 + r] = v;
        }
    }
}
"""

# One thread per (row, part): R * C / 8 threads; out is f16 (half_out) or f32 [R, C]; row r reads ids[r] if given.
_DEQUANT = r"""
extern "C" __global__ void dq_@T(const u8* __restrict__ W, const long long* __restrict__ ids, void* out, int R,
                                 int C, int half_out) {
    const int units = (C / @QK) * @P;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)R * units) return;
    const long long r = i / units;
    const int u = (int)(i - r * units), blk = u / @P, p = u - blk * @P;
    const long long src = ids ? ids[r] : r;
    float w[8];
    int c0, c1;
    dec8_@T(W + src * ((long long)(C / @QK) * @BB) + (long long)blk * @BB, p, w, &c0, &c1);
    c0 += blk * @QK;
    c1 += blk * @QK;
    if (half_out) {
        u16* o = (u16*)out + r * C;
        *(uint2*)(o + c0) = make_uint2(f2h(w[0]) | (f2h(w[1]) << 16), f2h(w[2]) | (f2h(w[3]) << 16));
        *(uint2*)(o + c1) = make_uint2(f2h(w[4]) | (f2h(w[5]) << 16), f2h(w[6]) | (f2h(w[7]) << 16));
    } else {
        float* o = (float*)out + r * C;
        *(vec4*)(o + c0) = make_float4(w[0], w[1], w[2], w[3]);
        *(vec4*)(o + c1) = make_float4(w[4], w[5], w[6], w[7]);
    }
}
"""


def shared_source(qtype: int) -> str:
    """The helpers, decoder and lane loops of one type: C that compiles for the device and (tests) the host."""
    return SHARED_HELPERS + _type_functions(TYPES[qtype])


def source() -> str:
    """The whole module: every kernel of every supported type."""
    parts = [DEVICE_PRELUDE, SHARED_HELPERS]
    for t in TYPES.values():
        parts.append(_type_functions(t))
        for tmax in TMAX_VARIANTS:
            parts.append(_fill(_MATVEC, t, tmax))
        parts.append(_fill(_DEQUANT, t, 1))
    return "\n".join(parts)


def _fill(template: str, t: KernelType, tmax: int) -> str:
    """Substitute the template's @ fields (@TMAX before @T, which is its prefix)."""
    for key, value in (("@TMAX", tmax), ("@WARPS", WARPS), ("@QK", t.qk), ("@BB", t.block_bytes), ("@NR", NR),
                       ("@P", t.parts), ("@T", t.name)):
        template = template.replace(key, str(value))
    return template


def kernel_names() -> list[str]:
    """The `extern "C"` kernels `source()` defines."""
    return [n for t in TYPES.values() for n in (*(f"mv_{t.name}_t{k}" for k in TMAX_VARIANTS), f"dq_{t.name}")]


def supports(qtype: int) -> bool:
    return int(qtype) in TYPES


def matvec_variant(n_tokens: int) -> int:
    """The TMAX of the matvec kernel that serves n_tokens (<= MATVEC_MAX_T)."""
    return next(k for k in TMAX_VARIANTS if n_tokens <= k)


# NVRTC options: C++17, no headers needed; fast-math stays off so NaN/inf behave as on the CPU path.
COMPILE_OPTIONS = ("--std=c++17",)

_modules: dict[int, Any] = {}
_functions: dict[tuple[str, int], Any] = {}  # a lookup per launch costs more than small decode kernels run
_lock = threading.Lock()


@cache
def _source() -> str:
    return source()


def function(name: str, device: int) -> Any:
    """A compiled kernel for `device` (the module is built once per device; CuPy keeps a disk cache)."""
    fn = _functions.get((name, device))
    if fn is not None:
        return fn
    # cupy: optional, loaded only where a GPU is used
    import cupy

    with _lock, cupy.cuda.Device(device):
        mod = _modules.get(device)
        if mod is None:
            mod = _modules[device] = cupy.RawModule(code=_source(), options=COMPILE_OPTIONS)
        fn = _functions[(name, device)] = mod.get_function(name)
    return fn

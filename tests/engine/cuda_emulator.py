"""The CUDA kernels' own source run on the host, for CPU tests of engine.cuda.tensors without a GPU.

The kernels of `engine.cuda.kernels.source()` (all but its device prelude) are compiled by a C++ compiler with a
host prelude: each CUDA thread of a block is an OS thread, `warp_sum` meets its 32 lanes at a barrier, and f16
conversions round as the GPU's cvt.rn does. `EmulatedModule` stands in for `cupy.RawModule` (it checks every
argument the way CuPy converts it: arrays to pointers, NumPy scalars by their size), and `gemmEx` stands in for
cuBLAS's, column-major as cuBLAS is. Memory model and alignment faults are not emulated; results are.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from engine.cuda import kernels as K

HOST_PRELUDE = r"""
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
#define DEV static inline
#define UNROLL
#define __global__
#define __launch_bounds__(n)
#define __restrict__
struct dim3_ { int x, y, z; };
static thread_local dim3_ threadIdx, blockIdx;
static dim3_ blockDim, gridDim;
struct vec4 { float x, y, z, w; };
struct uint2 { u32 x, y; };
static inline uint2 make_uint2(u32 a, u32 b) { return {a, b}; }
static inline vec4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline float as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
static inline u32 ld16(const u8* p) { u16 v; memcpy(&v, p, 2); return v; }
static inline u32 ld32(const u8* p) { u32 v; memcpy(&v, p, 4); return v; }
static inline vec4 ld4f(const float* p) { vec4 v; memcpy(&v, p, 16); return v; }
static inline float h2f(u32 h) { u16 b = (u16)h; _Float16 f; memcpy(&f, &b, 2); return (float)f; }
static inline u32 f2h(float f) { _Float16 h = (_Float16)f; u16 b; memcpy(&b, &h, 2); return b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static thread_local std::barrier<>* warp_barrier;
static thread_local float* warp_slots;
static inline float warp_sum(float v) {  /* all 32 lanes meet twice: publish, then read before any rewrites */
    warp_slots[threadIdx.x & 31] = v;
    warp_barrier->arrive_and_wait();
    float s = 0.0f;
    for (int i = 0; i < 32; ++i) s += warp_slots[i];
    warp_barrier->arrive_and_wait();
    return s;
}
template <class F> static void launch(int gx, int gy, int bx, bool threads, F kernel) {
    blockDim = {bx, 1, 1};
    gridDim = {gx, gy, 1};
    for (int by = 0; by < gy; ++by) {
        for (int bi = 0; bi < gx; ++bi) {
            if (!threads) {  /* no warp operations: one OS thread runs the block's threads in turn */
                for (int t = 0; t < bx; ++t) { threadIdx = {t, 0, 0}; blockIdx = {bi, by, 0}; kernel(); }
                continue;
            }
            std::vector<std::unique_ptr<std::barrier<>>> bars;
            for (int w = 0; w < bx / 32; ++w) bars.emplace_back(new std::barrier<>(32));
            std::vector<float> slots(bx);
            std::vector<std::thread> pool;
            for (int t = 0; t < bx; ++t) {
                pool.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bi, by, 0};
                    warp_barrier = bars[t / 32].get();
                    warp_slots = &slots[(t / 32) * 32];
                    kernel();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}
"""

_MV_PARAMS = [("W", "ptr"), ("mat_bytes", "i64"), ("ids", "ptr"), ("x", "ptr"), ("y", "ptr"), ("R", "i32"),
              ("C", "i32"), ("T", "i32")]
_DQ_PARAMS = [("W", "ptr"), ("ids", "ptr"), ("out", "ptr"), ("R", "i32"), ("C", "i32"), ("half_out", "i32")]
_C_TYPES = {"ptr": ("void*", ctypes.c_void_p), "i64": ("long long", ctypes.c_longlong), "i32": ("int", ctypes.c_int)}


def _params(name: str) -> list[tuple[str, str]]:
    return _MV_PARAMS if name.startswith("mv_") else _DQ_PARAMS


def _launcher(name: str) -> str:
    params = _params(name)
    decl = ", ".join(f"{_C_TYPES[k][0]} {n}" for n, k in params)
    # the kernels' pointer parameters are typed; void* converts to them implicitly only in C, so cast
    args = ", ".join(f"({_param_type(name, n)}){n}" if k == "ptr" else n for n, k in params)
    warp_ops = "true" if name.startswith("mv_") else "false"
    return (f'extern "C" void launch_{name}(int gx, int gy, int bx, {decl}) {{\n'
            f"    launch(gx, gy, bx, {warp_ops}, [&] {{ {name}({args}); }});\n}}\n")


def _param_type(name: str, param: str) -> str:
    if name.startswith("mv_"):
        return {"W": "const u8*", "ids": "const long long*", "x": "const float*", "y": "float*"}[param]
    return {"W": "const u8*", "ids": "const long long*", "out": "void*"}[param]


def build(directory: Path) -> ctypes.CDLL:
    """The kernels' source with the host prelude and one launcher per kernel, as a shared library."""
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "the CUDA emulation needs a C++20 compiler (g++ >= 12)"
    src = K.source()
    device_only = src.index(K.SHARED_HELPERS)  # the device prelude comes first; the rest is shared text
    code = HOST_PRELUDE + src[device_only:] + "".join(_launcher(n) for n in K.kernel_names())
    (directory / "emulated.cpp").write_text(code)
    lib = directory / "emulated.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing", "-pthread", "-shared",
                        "-fPIC", "-o", str(lib), str(directory / "emulated.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return ctypes.CDLL(str(lib))


class EmulatedFunction:
    """One kernel, called as a CuPy kernel is: (grid, block, args)."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name, self.fn, self.params = name, getattr(lib, f"launch_{name}"), _params(name)
        self.calls = 0

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int = 0,
                 stream: Any = None) -> None:
        from tests.engine import strict_cupy

        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)} parameters"
        assert len(grid) == 3 and len(block) == 3 and block[1:] == (1, 1) and grid[2] == 1
        conv = []
        for (pname, kind), a in zip(self.params, args, strict=True):
            if kind == "ptr":  # an array, or a NULL passed as an 8-byte NumPy scalar
                if isinstance(a, strict_cupy.ndarray):
                    conv.append(ctypes.c_void_p(a.data.ptr))
                else:
                    assert isinstance(a, np.uint64 | np.int64) and int(a) == 0, f"{self.name}.{pname}: {a!r}"
                    conv.append(ctypes.c_void_p(0))
            else:  # CuPy passes NumPy scalars by their size: the kernel's parameter must have that size
                want = np.int64 if kind == "i64" else np.int32
                assert type(a) is want, f"{self.name}.{pname}: {type(a).__name__} for a {kind} parameter"
                conv.append(_C_TYPES[kind][1](int(a)))
        self.calls += 1
        self.fn(ctypes.c_int(grid[0]), ctypes.c_int(grid[1]), ctypes.c_int(block[0]), *conv)


class EmulatedModule:
    """Stands in for cupy.RawModule(code=engine.cuda.kernels.source(), ...)."""

    lib: ctypes.CDLL | None = None

    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        assert code == K.source() and tuple(options) == K.COMPILE_OPTIONS
        assert EmulatedModule.lib is not None, "build() the emulator first"
        self.functions: dict[str, EmulatedFunction] = {}

    def get_function(self, name: str) -> EmulatedFunction:
        assert re.fullmatch(r"\w+", name) and name in K.kernel_names(), name
        assert EmulatedModule.lib is not None
        return self.functions.setdefault(name, EmulatedFunction(EmulatedModule.lib, name))


# ---- cuBLAS ------------------------------------------------------------------------------------------------------

_DTYPES = {2: np.float16, 0: np.float32}


def _column_major(ptr: int, dtype: Any, ld: int, rows: int, cols: int) -> np.ndarray:
    """A rows x cols column-major matrix with leading dimension ld at a raw address (a writable view)."""
    item = np.dtype(dtype).itemsize
    n = ld * (cols - 1) + rows
    buf = np.ctypeslib.as_array((ctypes.c_char * (n * item)).from_address(ptr)).view(dtype)
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), (item, ld * item))


def gemmEx(handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int, A: int, Atype: int,
           lda: int, B: int, Btype: int, ldb: int, beta: int, C: int, Ctype: int, ldc: int, computeType: int,
           algo: int) -> None:
    """cublasGemmEx: C (m x n) = alpha op(A) (m x k) @ op(B) (k x n) + beta C, all column-major."""
    assert computeType == 68 and algo == -1  # CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT
    assert lda >= (k if transa else m) and ldb >= (n if transb else k) and ldc >= m
    a = _column_major(A, _DTYPES[Atype], lda, k if transa else m, m if transa else k)
    b = _column_major(B, _DTYPES[Btype], ldb, n if transb else k, k if transb else n)
    c = _column_major(C, _DTYPES[Ctype], ldc, m, n)
    al = float(np.ctypeslib.as_array((ctypes.c_float * 1).from_address(alpha))[0])
    be = float(np.ctypeslib.as_array((ctypes.c_float * 1).from_address(beta))[0])
    prod = (a.T if transa else a).astype(np.float32) @ (b.T if transb else b).astype(np.float32)
    c[...] = al * prod + (be * c if be else 0)

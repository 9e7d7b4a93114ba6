"""The CUDA kernels without a GPU: their decoders and per-lane loops compiled for the host by a C compiler against
gguf's decoders, and the whole module compiled by NVRTC (the nvidia-cuda-nvrtc wheel) to SASS for real GPUs.

Legend: R rows, C columns, T tokens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine import synth
from engine.cuda import kernels as K
from engine.quant import QTensor

P = ctypes.c_void_p

# What the device prelude provides, for a C compiler: the same names over memcpy (unaligned loads are fine on the
# host) and a bit-exact IEEE half -> float.
HOST_PRELUDE = r"""
#include <string.h>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
#define DEV static inline
#define UNROLL
typedef struct { float x, y, z, w; } vec4;
static inline float as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
static inline u32 ld16(const u8* p) { u16 v; memcpy(&v, p, 2); return v; }
static inline u32 ld32(const u8* p) { u32 v; memcpy(&v, p, 4); return v; }
static inline vec4 ld4f(const float* p) { vec4 v; memcpy(&v, p, 16); return v; }
static inline float h2f(u32 h) {
    u32 s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) { float f = (float)m * (1.0f / 16777216.0f); return s ? -f : f; }
    if (e == 31) return as_float(s | 0x7F800000u | (m << 13));
    return as_float(s | ((e + 112u) << 23) | (m << 13));
}
static inline int min(int a, int b) { return a < b ? a : b; }
"""

# Drivers standing in for the kernels' grid: every (row, part) through dec8, and the 32 lanes of each warp's rows
# through the lane loop, summed as the warp reduction would.
HOST_DEQUANT = r"""
void host_dq_@T(const u8* W, int R, int C, float* out) {
    const long long row_bytes = (long long)(C / @QK) * @BB;
    for (int r = 0; r < R; ++r) {
        for (int u = 0; u < (C / @QK) * @P; ++u) {
            const int blk = u / @P, p = u % @P;
            float w[8];
            int c0, c1;
            dec8_@T(W + r * row_bytes + (long long)blk * @BB, p, w, &c0, &c1);
            for (int k = 0; k < 4; ++k) {
                out[(long long)r * C + blk * @QK + c0 + k] = w[k];
                out[(long long)r * C + blk * @QK + c1 + k] = w[4 + k];
            }
        }
    }
}
"""
HOST_MATVEC = r"""
void host_mv_@T_t@TMAX(const u8* W, int R, int C, const float* x, int T, float* y) {
    const long long row_bytes = (long long)(C / @QK) * @BB;
    for (int row0 = 0; row0 < R; row0 += @NR) {
        const int nr = min(@NR, R - row0);
        float acc[@NR * @TMAX] = {0};
        for (int lane = 0; lane < 32; ++lane) {
            float part[@NR * @TMAX] = {0};
            lane_@T_t@TMAX(W + row0 * row_bytes, row_bytes, nr, x, C, T, lane, part);
            for (int i = 0; i < @NR * @TMAX; ++i) acc[i] += part[i];
        }
        for (int r = 0; r < nr; ++r)
            for (int t = 0; t < T; ++t) y[(long long)t * R + row0 + r] = acc[r * @TMAX + t];
    }
}
"""
NAMES = {q: gguf.GGMLQuantizationType(q).name for q in K.TYPES}


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The decoders and lane loops of every type, as the CUDA source has them, built into a host library."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "these tests need a C compiler (cc or gcc) to run the kernels' C on the host"
    parts = [HOST_PRELUDE, K.SHARED_HELPERS]
    for t in K.TYPES.values():
        parts.append(K._type_functions(t))
        parts.append(K._fill(HOST_DEQUANT, t, 1))
        parts += [K._fill(HOST_MATVEC, t, tmax) for tmax in K.TMAX_VARIANTS]
    d = tmp_path_factory.mktemp("cuda_host")
    (d / "kernels.c").write_text("\n".join(parts))
    # -ffp-contract=off: no fused multiply-add, so the decoders round as numpy does
    r = subprocess.run([cc, "-O1", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-shared",
                        "-fPIC", "-o", str(d / "kernels.so"), str(d / "kernels.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(d / "kernels.so"))


def _encoded(values: np.ndarray, name: str) -> np.ndarray:
    return np.ascontiguousarray(synth.encode(values, name))


@pytest.mark.parametrize("qtype", list(K.TYPES), ids=list(NAMES.values()))
def test_decoders_match_gguf_bit_for_bit(host_lib: ctypes.CDLL, qtype: int) -> None:
    R, C = 7, 1024
    values = np.random.default_rng(qtype).standard_normal((R, C)).astype(np.float32) * 3
    raw = _encoded(values, NAMES[qtype])
    ref = QTensor("w", raw, qtype, (R, C)).dequantize()  # engine.kernels: bit-identical to gguf.quants
    if qtype not in (0, 1):
        assert np.array_equal(ref, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)).reshape(R, C))
    out = np.full((R, C), np.nan, np.float32)
    getattr(host_lib, f"host_dq_{K.TYPES[qtype].name}")(P(raw.ctypes.data), R, C, P(out.ctypes.data))
    assert np.array_equal(out, ref)  # every column written, every value exact


@pytest.mark.parametrize("qtype", list(K.TYPES), ids=list(NAMES.values()))
@pytest.mark.parametrize(("tmax", "T"), [(1, 1), (8, 1), (8, 5), (8, 8)])
def test_lane_loops_sum_to_the_matrix_product(host_lib: ctypes.CDLL, qtype: int, tmax: int, T: int) -> None:
    R, C = 9, 512  # an odd R: the last warp has one row
    rng = np.random.default_rng(100 + qtype)
    raw = _encoded(rng.standard_normal((R, C)).astype(np.float32), NAMES[qtype])
    w = QTensor("w", raw, qtype, (R, C)).dequantize().astype(np.float64)
    x = rng.standard_normal((T, C)).astype(np.float32)
    y = np.full((T, R), np.nan, np.float32)
    getattr(host_lib, f"host_mv_{K.TYPES[qtype].name}_t{tmax}")(P(raw.ctypes.data), R, C, P(x.ctypes.data), T,
                                                              P(y.ctypes.data))
    ref = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_source_is_fully_generated() -> None:
    src = K.source()
    assert "@" not in src  # every template field substituted
    defined = re.findall(r'extern "C" __global__ void(?: __launch_bounds__\([^)]*\))?\s+(\w+)\(', src)
    assert sorted(defined) == sorted(K.kernel_names())
    assert len(K.kernel_names()) == len(K.TYPES) * (len(K.TMAX_VARIANTS) + 1)
    assert [K.matvec_variant(t) for t in (1, 2, 5, 8)] == [1, 8, 8, 8]
    assert K.supports(gguf.GGMLQuantizationType.Q4_K) and not K.supports(gguf.GGMLQuantizationType.IQ4_XS)


# ---- NVRTC ---------------------------------------------------------------------------------------------------


def _nvrtc() -> ctypes.CDLL:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (the test extra), else a system CUDA toolkit's."""
    libs: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        libs += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*")))
        for builtins in glob.glob(os.path.join(root, "*", "lib", "libnvrtc-builtins.so*")):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # libnvrtc dlopens it by name
    system = ctypes.util.find_library("nvrtc")
    libs += [system] if system else []
    assert libs, "NVRTC not found: pip install 'ikctl[test]' (it brings the nvidia-cuda-nvrtc wheel)"
    return ctypes.CDLL(libs[0])


def _compile(lib: ctypes.CDLL, src: str, options: list[str]) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"ikctl.cu", 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])  # H100/H200, A100 (sm_86/89 consumer cards build alike)
def test_nvrtc_compiles_every_kernel_without_spills(arch: str) -> None:
    lib = _nvrtc()
    rc, log = _compile(lib, K.source(), [f"--gpu-architecture={arch}", *K.COMPILE_OPTIONS, "--ptxas-options=-v"])
    assert rc == 0, log
    compiled = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert compiled == set(K.kernel_names())
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(s == "0" for s in spills), log


def test_nvrtc_reports_errors_in_the_source() -> None:
    """The compile check can fail: a typo in a decoder is a compile error with its line."""
    rc, log = _compile(_nvrtc(), K.source().replace("ld32(b + 16 + 32 * g + m4)", "ld32(b + 16 + 32 * gg + m4)"),
                       ["--gpu-architecture=compute_90", *K.COMPILE_OPTIONS])
    assert rc != 0 and "gg" in log


def test_host_prelude_names_match_the_device_prelude() -> None:
    """The host build stands in for the device one only if both define the same helpers."""
    names = {"u8", "u16", "u32", "DEV", "UNROLL", "vec4", "as_float", "ld16", "ld32", "ld4f", "h2f"}
    for name in names:
        assert re.search(rf"\b{name}\b", K.DEVICE_PRELUDE) and re.search(rf"\b{name}\b", HOST_PRELUDE), name
    assert Path(K.__file__).read_text().count("DEV ") >= len(K.TYPES)

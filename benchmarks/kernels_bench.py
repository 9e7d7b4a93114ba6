"""Speed of engine.kernels against the generic dequantize-per-tile path (engine.quant.QTensor.matmul_t).

Legend: R rows (output features), C columns (input features), T tokens.

    python benchmarks/kernels_bench.py [--threads N] [--types Q4_K,Q8_0] [--seconds S] [--bandwidth-gib G]

For each type and each weight shape (2048x2048, 1408x2048) it prints the decode time (T = 1) per call and the
GB/s of weight bytes read, for the generic path and for the kernel, then the prefill time (T = 128) of both.
The same run measures the read bandwidth the machine gives a numba prange loop: over a large array (DRAM) and
over a 4 MiB array read repeatedly (what a weight of this benchmark's size sees once it sits in L2/L3).
Timings are the best of several repeats: on a shared machine the minimum is the least noisy estimate.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import kernels as K
from engine.quant import QTensor

GT = gguf.GGMLQuantizationType
SHAPES = ((2048, 2048), (1408, 2048))
TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K")
TYPES += ("F16", "BF16")
PREFILL_T = 128
# Byte offsets of the f16 scale fields of types gguf cannot quantize (random blocks get sane scales there).
F16_FIELDS = {GT.Q2_K: (80, 82), GT.Q3_K: (108,), GT.Q4_K: (0, 2), GT.Q5_K: (0, 2), GT.Q6_K: (208,)}
F16_FIELDS |= {GT.IQ4_NL: (0,), GT.IQ4_XS: (0,)}


def make_weight(qtype: GT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """The weight as the reader returns it: gguf's quantizer where it has one, else random valid blocks."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    if qtype == GT.F16:
        return w.astype(np.float16)
    if qtype not in F16_FIELDS:
        return gguf.quants.quantize(w, qtype).view(np.uint8).reshape(rows, -1)
    qk, nbytes = K.BLOCK[int(qtype)]
    raw = rng.integers(0, 256, (rows, cols // qk, nbytes), dtype=np.uint8)
    for o in F16_FIELDS[qtype]:
        raw[:, :, o : o + 2] = rng.uniform(1e-4, 1e-3, (rows, cols // qk, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def best_time(fn: Callable[[], object], seconds: float) -> float:
    """Best seconds per call over repeats lasting about `seconds` in all (at least 3 calls)."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 3 or spent < seconds:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    return best


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _read_sum(a: np.ndarray, passes: int, shares: int) -> float:
    """Sum of `a`, each of `shares` tasks reading its contiguous part `passes` times in one parallel region.

    The inner loop indexes a slice from 0: with `for j in range(lo, hi): a[j]` numba cannot prove j >= 0, keeps
    its negative-index wraparound and the loop stays scalar (~4 GB/s a core, a fifth of what DRAM gives)."""
    total = 0.0
    for i in prange(shares):
        part = a[i * a.size // shares : (i + 1) * a.size // shares]
        s = np.float32(0.0)
        for _ in range(passes):
            for j in range(part.size):
                s += part[j]
        total += s
    return total


def bandwidth(nbytes: int, passes: int, seconds: float) -> float:
    """GB/s that a numba prange loop reads from an array of nbytes (DRAM when large, caches when small)."""
    a = np.ones(nbytes // 4, np.float32)
    return nbytes * passes / best_time(lambda: _read_sum(a, passes, numba.get_num_threads()), seconds) / 1e9


def first_calls() -> str:
    """Time of the first call of each kernel: a compile, or a load from numba's on-disk cache."""
    raw = make_weight(GT.Q4_K, 16, 256, np.random.default_rng(0))
    x = np.ones((1, 256), np.float32)
    parts = []
    for label, call, dispatcher in (
        ("matvec", lambda: K.matvec(raw, GT.Q4_K, (16, 256), x), K._matvec_kernel),
        ("dequantize", lambda: K.dequantize_rows(raw, GT.Q4_K, (16, 256)), K._dequantize_kernel),
    ):
        t = time.perf_counter()
        call()
        how = "loaded from cache" if sum(dispatcher.stats.cache_hits.values()) else "compiled"
        parts.append(f"{label} {time.perf_counter() - t:.2f} s ({how})")
    return "first calls: " + ", ".join(parts)


def bench_shape(qtype: GT, R: int, C: int, seconds: float, rng: np.random.Generator) -> str:
    raw = make_weight(qtype, R, C, rng)
    generic = QTensor("w", raw, qtype, (R, C))
    x1 = rng.standard_normal((1, C)).astype(np.float32)
    xp = rng.standard_normal((PREFILL_T, C)).astype(np.float32)
    gb = raw.nbytes / 1e9
    t_gen = best_time(lambda: generic.matmul_t(x1), seconds / 4)
    t_ker = best_time(lambda: K.matmul_t(raw, qtype, (R, C), x1), seconds)
    p_gen = best_time(lambda: generic.matmul_t(xp), seconds / 4)
    p_ker = best_time(lambda: K.matmul_t(raw, qtype, (R, C), xp), seconds / 2)
    return (
        f"{qtype.name:7s} {R:5d}x{C:<5d} {raw.nbytes / 2**20:6.2f} MiB | "
        f"T=1 generic {t_gen * 1e3:8.3f} ms {gb / t_gen:6.2f} GB/s  kernel {t_ker * 1e3:7.3f} ms "
        f"{gb / t_ker:6.2f} GB/s  x{t_gen / t_ker:5.1f} | "
        f"T={PREFILL_T} generic {p_gen * 1e3:8.2f} ms  kernel {p_ker * 1e3:7.2f} ms  x{p_gen / p_ker:4.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated GGML type names")
    ap.add_argument("--seconds", type=float, default=0.5, help="time spent repeating each kernel measurement")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="array size of the DRAM read baseline")
    args = ap.parse_args()

    threads = K.set_threads(args.threads)
    with threadpool_limits(threads):
        print(f"numba {numba.__version__}, numpy {np.__version__}, {threads} threads (numba and BLAS)")
        print(first_calls())
        print(f"numba threading layer: {numba.threading_layer()}")
        dram = bandwidth(int(args.bandwidth_gib * 2**30), 1, 2.0)
        cached = bandwidth(4 << 20, 64, 1.0)
        print(
            f"read bandwidth ({threads} threads): {args.bandwidth_gib:g} GiB array {dram:.1f} GB/s, "
            f"4 MiB array re-read {cached:.1f} GB/s"
        )
        rng = np.random.default_rng(0)
        for name in args.types.split(","):
            for R, C in SHAPES:
                print(bench_shape(GT[name.strip().upper()], R, C, args.seconds, rng), flush=True)
        again = bandwidth(int(args.bandwidth_gib * 2**30), 1, 2.0)
        print(f"read bandwidth again (drift check): {again:.1f} GB/s")


if __name__ == "__main__":
    main()

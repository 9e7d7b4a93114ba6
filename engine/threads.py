"""How a forward pass shares its threads between the weight kernels (numba) and BLAS, by batch size."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

from llvmlite import binding as llvm
from threadpoolctl import ThreadpoolController

from engine import kernels

# OpenBLAS's cores with AVX-512 kernels (its DYNAMIC_ARCH names, as threadpoolctl reports them).
_AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids"}


@cache
def _blas_pools() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, found once (the search costs ~1 ms per call)."""
    return ThreadpoolController()


@dataclass(frozen=True)
class Blas:
    """The BLAS that NumPy's products (prefill, attention) run on."""

    library: str  # "openblas", "mkl", ... ("" where threadpoolctl finds none)
    core: str  # the kernels' CPU target where the library names one (OpenBLAS: "Haswell", "SkylakeX", ...)

    def note(self, cpu_has_avx512: bool) -> str | None:
        """One line when the BLAS leaves half the CPU's float speed unused: OpenBLAS on a pre-AVX-512 core (as
        OPENBLAS_CORETYPE=Haswell forces, or an OpenBLAS that takes Zen 4/5 for Zen) on an AVX-512 CPU."""
        if self.library != "openblas" or not cpu_has_avx512 or not self.core:
            return None
        if self.core.lower() in _AVX512_CORES:
            return None
        forced = os.environ.get("OPENBLAS_CORETYPE")
        why = f"OPENBLAS_CORETYPE={forced}" if forced else "OpenBLAS's CPU detection"
        return (f"ikctl: OpenBLAS runs its {self.core} kernels ({why}) on a CPU with AVX-512: prompt processing "
                f"runs at about half speed; set OPENBLAS_CORETYPE=SkylakeX")


def blas() -> Blas:
    for pool in _blas_pools().info():
        if pool.get("user_api") == "blas":
            return Blas(str(pool.get("internal_api", "")), str(pool.get("architecture") or ""))
    return Blas("", "")


def cpu_has_avx512() -> bool:
    """Whether this machine's CPU has the AVX-512 subsets OpenBLAS's SkylakeX kernels use (whatever numba is told
    to compile for)."""
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))


def blas_note() -> str | None:
    return blas().note(cpu_has_avx512())


@contextmanager
def compute_threads(threads: int | None, n_tokens: int) -> Iterator[None]:
    """Run a forward pass of n_tokens with `threads` threads (None: numba's current count, BLAS unlimited).

    Decode-sized batches put every thread in the weight kernels and give BLAS one: their small attention GEMMs
    otherwise wake OpenBLAS's pool, whose spinning workers steal the cores from the kernels (decode ran 2x slower
    at N_KV 384). Prefill gives BLAS the threads and decodes weight tiles on the calling thread, so the two pools
    never spin against each other (2 threads each ran 7x slower than 1). numba keeps its count per calling thread.
    """
    before = kernels.get_threads()
    decode = n_tokens <= kernels.MATVEC_MAX_T
    kernels.set_threads((threads or before) if decode else 1)
    try:
        with _blas_pools().limit(limits=1 if decode else threads, user_api="blas"):
            yield
    finally:
        kernels.set_threads(before)

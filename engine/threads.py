"""How a forward pass shares its threads between the weight kernels (numba) and BLAS, by batch size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any


@cache
def _blas_pools() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, found once (the search costs ~1 ms per call)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def compute_threads(threads: int | None, n_tokens: int) -> Iterator[None]:
    """Run a forward pass of n_tokens with `threads` threads (None: numba's current count, BLAS unlimited).

    Decode-sized batches put every thread in the weight kernels and give BLAS one: their small attention GEMMs
    otherwise wake OpenBLAS's pool, whose spinning workers steal the cores from the kernels (decode ran 2x slower
    at N_KV 384). Prefill gives BLAS the threads and decodes weight tiles on the calling thread, so the two pools
    never spin against each other (2 threads each ran 7x slower than 1). numba keeps its count per calling thread.
    """
    from engine import kernels

    before = kernels.get_threads()
    decode = n_tokens <= kernels.MATVEC_MAX_T
    kernels.set_threads((threads or before) if decode else 1)
    try:
        with _blas_pools().limit(limits=1 if decode else threads, user_api="blas"):
            yield
    finally:
        kernels.set_threads(before)

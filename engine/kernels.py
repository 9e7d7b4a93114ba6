"""Fused dequantize-and-multiply CPU kernels (numba) that read GGUF quant blocks where they lie.

Legend: R rows (output features), C columns (input features), T tokens, B blocks per row, QK values per block.

Decode (T <= MATVEC_MAX_T): each row is decoded 4096 values at a time into an L1 scratch and dotted with all T
token vectors, so the weight bytes are read once per call and never widened to a float32 copy in memory. By
default (`activations`) quantized types decode to integer codes and meet integer activation codes
(engine.simd_int8, int8_decoders, q8_activations); with float32 activations they decode to float32.
Prefill (larger T): a tile of rows is decoded into a float32 scratch (<= 16 MiB) and BLAS does `x @ tile.T`.
Block layouts follow docs/deepseek2.md §6 and gguf 0.19's `gguf.quants` decoders bit for bit (every decoded
value is the float32 `gguf.quants.dequantize` gives; only the dot's summation order differs).
Parallel loops run on numba's threading layer (OpenMP or TBB where installed: safe to call from several Python
threads; numba's fallback "workqueue" layer is not). The kernels release the GIL, so a worker answers its
liveness probes and telemetry while it computes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange

from engine.block_decoders import BLOCK, F32, _decode_row
from engine.block_dots import BLOCK_DOT_TYPES, TOKENS, block_dots, has_block_dot
from engine.ik_decoders import IK_DECODED
from engine.ik_types import quant_type
from engine.int8_decoders import INT8_TYPES, idecode_row
from engine.q8_activations import padded, quantized
from engine.simd import _prefetch
from engine.simd_int8 import _dot_u8s8

# Up to this many tokens the matvec kernel wins: it reads the weights once and each extra token costs one
# L1-resident dot, while the tiled path pays a full decode plus BLAS calls that are slow for small T
# (measured on 2048x2048 Q4_K/Q8_0, one thread: equal at T = 16, matvec 2x faster at T = 8).
MATVEC_MAX_T = 16
# Types with a kernel in engine.block_dots keep to it up to this many tokens: it unpacks each block once per 8
# tokens, where a tile first decodes whole rows to float32 (2 threads, 2048x7168 Q4_K / IQ4_KS / Q8_0, fused time
# over tiled: 0.2-0.4 at 16-24 tokens, 0.5-0.7 at 32-48, about 0.8-1 at 64-96, 1-1.5 at 128). An MoE prompt batch
# gives most experts fewer than 48 tokens (DeepSeek-V3, 512 tokens: 16 on average).
FUSED_MAX_T = 48
# Float32 scratch per prefill tile (as engine.quant's generic path). Tile size barely matters on one thread,
# but every tile is one hand-over between numba's and BLAS's thread pools, which is slow on a busy machine.
TILE_BYTES = 16 << 20
# Rows per parallel task of the matvec: amortises the scratch allocation, keeps tasks balanced.
_ROWS_PER_TASK = 64
# Rows of engine.block_dots' kernels that meet one tile of tokens before the next tile (their bytes stay in L2).
_ROW_TILE = 16
# Rows longer than this many values meet the tokens _COL_SPAN values at a time (V3's 16384- and 18432-value rows:
# 1.4-1.6x, measured on one thread of a DRAM-resident weight).
_LONG_ROW = 8192
_COL_SPAN = 4096
# Values decoded per matvec step: a 16 KiB scratch that stays in L1 next to the token vectors' slices.
_CHUNK_VALUES = 4096
# Rows ahead whose bytes are prefetched while a row is decoded (hardware prefetch alone left the loads exposed).
_PREFETCH_ROWS = 4
# Bytes ahead of the integer kernels' reads that they prefetch (covers DRAM latency at full bandwidth).
_PREFETCH_BYTES = 16384
# The expert ids of a one-matrix product run through the gather kernel: matrix 0 for every token.
_ONE_RUN = np.zeros(1, np.int64)
# reassoc lets LLVM vectorise the dot reductions, contract allows FMA; NaN/inf semantics stay IEEE.
_FASTMATH = {"reassoc", "contract"}




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


@njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
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
            if r + _PREFETCH_ROWS < R:  # overlap DRAM reads of later rows with this row's decode
                nxt = raw[r + _PREFETCH_ROWS]
                for o in range(0, row_bytes, 64):
                    _prefetch(nxt, o)
            acc[:] = 0.0
            for b0 in range(0, blocks, chunk):
                b1 = min(blocks, b0 + chunk)
                w = buf[: (b1 - b0) * qk]
                _decode_row(qtype, row[b0 * block_bytes : b1 * block_bytes], w)
                _dot_tokens(w, x, b0 * qk, acc)
            for t in range(T):
                out[t, r] = acc[t]


@njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
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
            if r + _PREFETCH_ROWS < R:
                nxt = raw[e, r + _PREFETCH_ROWS]
                for o in range(0, row_bytes, 64):
                    _prefetch(nxt, o)
            acc = np.float32(0.0)
            for b0 in range(0, blocks, chunk):
                b1 = min(blocks, b0 + chunk)
                w = buf[: (b1 - b0) * qk]
                _decode_row(qtype, row[b0 * block_bytes : b1 * block_bytes], w)
                acc += _dot(w, x[n, b0 * qk : b1 * qk])
            out[n, r] = acc


@njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _unit_matvec_kernel(units: np.ndarray, qtype: int, g: int, x: np.ndarray, out: np.ndarray) -> None:
    """out[t, g u + k] = x[t] . row k of unit u of units [U, unit bytes]: for ik_llama.cpp's types, whose rows
    decode only whole (a row header) or G at a time (interleaved groups). Each unit is decoded once."""
    U = units.shape[0]
    T, C = x.shape
    per_task = max(1, _ROWS_PER_TASK // g)
    tasks = (U + per_task - 1) // per_task
    for k in prange(tasks):
        buf = np.empty(g * C, np.float32)
        acc = np.empty(T, np.float32)
        for u in range(k * per_task, min(U, (k + 1) * per_task)):
            _decode_row(qtype, units[u], buf)
            for j in range(g):
                acc[:] = 0.0
                _dot_tokens(buf[j * C : (j + 1) * C], x, 0, acc)
                for t in range(T):
                    out[t, g * u + j] = acc[t]


@njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _unit_gather_kernel(units: np.ndarray, qtype: int, g: int, experts: np.ndarray, x: np.ndarray,
                        out: np.ndarray) -> None:
    """out[n, g u + k] = x[n] . row k of unit u of matrix experts[n] of units [E, U, unit bytes] (as
    _unit_matvec_kernel, for stacked expert weights)."""
    U = units.shape[1]
    N, C = x.shape
    per_task = max(1, _ROWS_PER_TASK // g)
    per = (U + per_task - 1) // per_task
    for k in prange(N * per):
        n = k // per
        e = experts[n]
        buf = np.empty(g * C, np.float32)
        for u in range((k % per) * per_task, min(U, (k % per + 1) * per_task)):
            _decode_row(qtype, units[e, u], buf)
            for j in range(g):
                out[n, g * u + j] = _dot(buf[j * C : (j + 1) * C], x[n])


@njit(cache=True)
def _int8_scratch(qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A task's buffers for one decoded chunk (_CHUNK_VALUES values): codes and group scales; none for the types
    engine.block_dots reads in place."""
    n = 0 if has_block_dot(qtype) else padded(_CHUNK_VALUES)
    return np.zeros(n, np.uint8), np.zeros(n // 16, np.float32), np.zeros(n // 16, np.float32)


@njit(cache=True, inline="always")
def _int8_task_rows(qtype: int) -> int:
    """Rows per parallel task of the integer kernels: one row tile where no scratch is decoded (numba splits the
    tasks evenly over the threads; 64-row tasks left a 192-row matrix's 3 tasks to 2 threads as 2 + 1)."""
    return _ROW_TILE if has_block_dot(qtype) else _ROWS_PER_TASK


@njit(cache=True, inline="always")
def _prefetch_bytes(flat: np.ndarray, start: int, n: int) -> None:
    for o in range(start, start + n, 64):
        _prefetch(flat, o)


@njit(cache=True, inline="always")
def _prefetch_ahead(flat: np.ndarray, start: int, n: int, end: int) -> None:
    """Prefetch the n bytes that lie _PREFETCH_BYTES past [start, start + n), up to end (the task's last byte)."""
    lo = start + _PREFETCH_BYTES
    _prefetch_bytes(flat, lo, max(0, min(n, end - lo)))


@njit(cache=True, inline="always")
def _prefetch_next_span(flat: np.ndarray, nxt: int, n: int, end: int) -> None:
    """Prefetch the n bytes a row's next column span reads (its next chunk, or the next tile's row), up to end: a
    tile is read span by span, chunks a row apart, which the hardware prefetcher does not follow (one thread read
    V3's attn_output at 9.9 GB/s without this, 18.0 with it, a span-major copy 15.1: benchmarks of one run)."""
    _prefetch_bytes(flat, nxt, max(0, min(n, end - nxt)))


@njit(cache=True, inline="always")
def _int8_rows(qtype: int, raw: np.ndarray, flat: np.ndarray, e: int, r0: int, r1: int, block_bytes: int, qk: int,
               meta: int, group: int, q: np.ndarray, a: np.ndarray, b: np.ndarray, x16: np.ndarray, xd: np.ndarray,
               xs: np.ndarray, t0: int, t1: int, out: np.ndarray, o0: int) -> None:
    """out[o0 + t - t0, r] = row r of matrix e . x[t] for rows r0..r1-1 of raw [E, R, row bytes] (flat: the same
    bytes, 1-D) and tokens t0..t1-1, with integer activations (engine.simd_int8). Rows have `meta` header bytes
    and are interleaved `group` at a time (ik_llama.cpp's types; engine.block_dots reads those in place).

    Short rows (a whole number of 64-value steps that fit a chunk) are decoded several at a time, consecutive
    rows being consecutive bytes; longer ones a chunk at a time. Every decoded chunk meets every token. Offsets,
    not views, wherever they can be: a view costs two atomic reference-count updates, as much as decoding 256
    values (and a call with arrays costs the same per array: everything here is inlined)."""
    R, row_bytes = raw.shape[1], raw.shape[2]
    blocks = (row_bytes - meta) // block_bytes
    C = blocks * qk
    groups = xd.shape[1]
    if has_block_dot(qtype):
        # no decoded copy; a tile of rows meets each tile of tokens while both are cached, a column span at a time
        # where rows are long (the tokens' activations of a whole long row would crowd the weights out of L1).
        # The rows of an interleaved group follow one another, so its bytes are read from L1 after the first.
        ostride = out.shape[1]
        span = blocks if C <= _LONG_ROW else _COL_SPAN // qk
        span_bytes = group * block_bytes  # an interleaved block column: the group's rows
        for rs in range(r0, r1, _ROW_TILE):
            for b0 in range(0, blocks, span):
                nb = min(span, blocks - b0)
                for t in range(t0, t1, TOKENS):
                    for r in range(rs, min(r1, rs + _ROW_TILE)):
                        head = (e * R + r - r % group) * row_bytes
                        start = head + group * meta + b0 * span_bytes  # a group's header: its rows' meta
                        if nb < blocks and t == t0 and r % group == 0:
                            _prefetch_next_span(flat, start + nb * span_bytes if b0 + nb < blocks else
                                                head + _ROW_TILE * row_bytes + group * meta, nb * span_bytes,
                                                (e * R + r1) * row_bytes)
                        u = t
                        while u < min(t1, t + TOKENS):
                            u += block_dots(qtype, min(t1, t + TOKENS) - u, flat, start, nb, x16, xd, xs,
                                            u * groups + b0 * qk // 16, groups, out, (o0 + u - t0) * ostride + r,
                                            ostride, b0 > 0, head, r % group)
        return
    if C % 64 == 0 and C <= _CHUNK_VALUES:
        span = _CHUNK_VALUES // C
        for rs in range(r0, r1, span):
            re = min(r1, rs + span)
            start = (e * R + rs) * row_bytes
            _prefetch_ahead(flat, start, (re - rs) * row_bytes, (e * R + r1) * row_bytes)
            idecode_row(qtype, flat[start : start + (re - rs) * row_bytes], q, a, b)
            for j in range(re - rs):
                for t in range(t0, t1):
                    out[o0 + t - t0, rs + j] = _dot_u8s8(q, a, b, j * C // 16, x16, xd, xs, t * groups, C // 64)
        return
    chunk = max(1, _CHUNK_VALUES // qk)
    for r in range(r0, r1):
        _prefetch_ahead(flat, (e * R + r) * row_bytes, row_bytes, (e * R + r1) * row_bytes)
        for t in range(t0, t1):
            out[o0 + t - t0, r] = 0.0
        for c0 in range(0, blocks, chunk):
            c1 = min(blocks, c0 + chunk)
            n = (c1 - c0) * qk
            idecode_row(qtype, raw[e, r, c0 * block_bytes : c1 * block_bytes], q, a, b)
            steps = (n + 63) // 64
            for g in range(n // 16, 4 * steps):  # the last chunk's tail: no weight there
                a[g] = 0.0
                b[g] = 0.0
            for t in range(t0, t1):
                out[o0 + t - t0, r] += _dot_u8s8(q, a, b, 0, x16, xd, xs, t * groups + c0 * qk // 16, steps)


@njit(parallel=True, cache=True, nogil=True)
def _int8_gather_kernel(raw: np.ndarray, flat: np.ndarray, qtype: int, qk: int, block_bytes: int, meta: int,
                        group: int, experts: np.ndarray, bounds: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[n, r] = x[n] . row r of matrix experts[s] of raw [E, R, row bytes] (flat: the same bytes, 1-D) for the
    rows bounds[s] <= n < bounds[s + 1] of each run s: all selected experts of an MoE layer in one launch, each
    run's matrix read once for all its rows."""
    x16, xd, xs = quantized(x)
    R = raw.shape[1]
    rows = _int8_task_rows(qtype)
    per = (R + rows - 1) // rows
    for k in prange(experts.size * per):
        s = k // per
        q, a, b = _int8_scratch(qtype)
        r0 = (k % per) * rows
        _int8_rows(qtype, raw, flat, experts[s], r0, min(R, r0 + rows), block_bytes, qk, meta, group, q, a, b,
                   x16, xd, xs, bounds[s], bounds[s + 1], out, bounds[s])


@njit(cache=True, nogil=True)
def _dequantize_serial(raw: np.ndarray, qtype: int, out: np.ndarray) -> None:
    for r in range(raw.shape[0]):
        _decode_row(qtype, raw[r], out[r])


@njit(parallel=True, cache=True, nogil=True)
def _dequantize_kernel(raw: np.ndarray, qtype: int, out: np.ndarray) -> None:
    R, row_bytes = raw.shape
    for r in prange(R):
        if r + _PREFETCH_ROWS < R:
            nxt = raw[r + _PREFETCH_ROWS]
            for o in range(0, row_bytes, 64):
                _prefetch(nxt, o)
        _decode_row(qtype, raw[r], out[r])


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


SERIAL_MAX_ROWS = 16  # dequantize_rows decodes up to this many rows on the calling thread


def supports(qtype: int) -> bool:
    """Whether these kernels decode this GGML type."""
    return int(qtype) in BLOCK or int(qtype) in IK_DECODED


def _by_unit(qtype: int) -> bool:
    """Whether rows decode only as whole units (ik_llama.cpp's row headers and interleaved groups): the
    chunked kernels above, which decode a row block range by block range, cannot read these."""
    return int(qtype) in IK_DECODED


def group_rows(qtype: int) -> int:
    """Rows stored interleaved as one unit (1 for all but ik_llama.cpp's *_R4 / *_R8 types)."""
    qt = quant_type(int(qtype))
    return qt.group if qt is not None else 1


def _units(rows: np.ndarray, g: int) -> np.ndarray:
    """[..., R, row bytes] -> [..., R / g, g * row bytes]: an interleaved group's rows are consecutive bytes."""
    if rows.shape[-2] % g:
        raise ValueError(f"{rows.shape[-2]} rows do not fill whole groups of {g} interleaved rows")
    return rows.reshape(*rows.shape[:-2], rows.shape[-2] // g, g * rows.shape[-1])


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
    """Bytes of one encoded row of `columns` values (with its header, for types that have one)."""
    qt = quant_type(int(qtype))
    if qt is None or columns % qt.qk:
        raise ValueError(f"{columns} columns is not a multiple of the block of type {qtype}")
    return qt.row_bytes(columns)


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
    g = group_rows(qtype)
    if g > 1:  # one decoder call per interleaved group, writing its g rows: out viewed as [R / g, g * C]
        rows, out_units = _units(rows, g), out.reshape(-1, g * out.shape[1])
        if rows.shape[0]:
            _dequantize_kernel(rows, int(qtype), out_units)
    elif rows.shape[0] > SERIAL_MAX_ROWS:
        _dequantize_kernel(rows, int(qtype), out)
    elif rows.shape[0]:
        # a decode step's embedding rows: waking OpenMP's threads costs more than decoding, and they would then
        # spin on a core a worker on this machine is computing on while this process waits for it
        _dequantize_serial(rows, int(qtype), out)
    return out


def _tokens(x: np.ndarray, columns: int) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, columns)


_numerics = threading.local()


@contextmanager
def activations(int8: bool) -> Iterator[None]:
    """Within this block, on this thread: decode-sized products of quantized weights run on integer activation
    codes (True, the default: 16-bit codes in two int8 planes, engine.q8_activations) or on the float32
    activations themselves (False: exact up to the summation order). Local passes and workers set it per
    forward pass, so both sides compute alike."""
    before = getattr(_numerics, "int8", True)
    _numerics.int8 = bool(int8)
    try:
        yield
    finally:
        _numerics.int8 = before


def use_int8(enabled: bool) -> None:
    """Set this thread's choice outside any `activations` block (benchmarks, tests)."""
    _numerics.int8 = bool(enabled)


def int8_enabled() -> bool:
    return getattr(_numerics, "int8", True)


# The types whose decode-sized products can run on integer activations: engine.int8_decoders' and the ik_llama.cpp
# types engine.block_dots reads in place.
INT8_KERNEL_TYPES = INT8_TYPES | frozenset(BLOCK_DOT_TYPES)


def takes_int8(qtype: int) -> bool:
    """Whether decode-sized products with this weight type run on integer activations now."""
    return int8_enabled() and int(qtype) in INT8_KERNEL_TYPES


def fused(qtype: int) -> bool:
    """Whether decode-sized products with this type have a fused kernel: one that reads the encoded blocks (or
    a chunk of them decoded into an L1 scratch) for every token of a call. Not so: ik_llama.cpp's types without
    a kernel in engine.block_dots, whose rows decode whole to float32 first (BLOCK holds mainline types only)."""
    return int(qtype) in BLOCK_DOT_TYPES or int(qtype) in BLOCK


def matvec(raw: np.ndarray, qtype: int, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W.T for few tokens, x [T, C] -> [T, R]: one pass over the weight bytes for all T tokens."""
    rows = _as_rows(raw, qtype, shape)
    x = _tokens(x, int(shape[1]))
    out = np.empty((x.shape[0], rows.shape[0]), np.float32)
    if not out.size:
        return out
    qt = quant_type(int(qtype))
    if takes_int8(qtype):
        # one matrix as a gather of one run: the fused kernels compile once, for both (a per-type cost)
        _int8_gather_kernel(rows[None], rows.reshape(-1), int(qtype), qt.qk, qt.block_bytes, qt.meta, qt.group,
                            _ONE_RUN, np.array([0, x.shape[0]], np.int64), x, out)
    elif _by_unit(qtype):
        _unit_matvec_kernel(_units(rows, qt.group), int(qtype), qt.group, x, out)
    else:
        _matvec_kernel(rows, int(qtype), qt.qk, x, out)
    return out


_scratch = threading.local()


def _tile_scratch(n_values: int) -> np.ndarray:
    """A float32 buffer reused across calls (per thread): a fresh multi-MiB np.empty per tile cost a page fault
    per 4 KiB on first touch, hundreds of thousands per prefill batch."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n_values:
        buf = _scratch.buf = np.empty(n_values, np.float32)
    return buf[:n_values]


def drop_tile_scratch() -> None:
    """Free this thread's tile buffer (a worker does after each run, so idle connections keep none)."""
    _scratch.buf = None


def matmul_tiled(raw: np.ndarray, qtype: int, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W.T for many tokens, x [T, C] -> [T, R]: decode 16 MiB tiles of rows, multiply each with BLAS."""
    rows = _as_rows(raw, qtype, shape)
    R, C = rows.shape[0], int(shape[1])
    x = _tokens(x, C)
    out = np.empty((x.shape[0], R), np.float32)
    g = group_rows(qtype)
    step = max(g, TILE_BYTES // (4 * C) // g * g)  # whole interleaved groups per tile
    tile = _tile_scratch(min(step, R) * C).reshape(-1, C)
    for r0 in range(0, R, step):
        w = tile[: min(step, R - r0)]
        _dequantize_kernel(_units(rows[r0 : r0 + w.shape[0]], g), int(qtype), w.reshape(-1, g * C))
        np.matmul(x, w.T, out=out[:, r0 : r0 + w.shape[0]])
    return out


def matvec_max_tokens(qtype: int) -> int:
    """The most tokens matmul_t multiplies with the matvec kernels (more go through tiles and BLAS)."""
    return FUSED_MAX_T if takes_int8(qtype) and int(qtype) in BLOCK_DOT_TYPES else MATVEC_MAX_T


def matmul_t(raw: np.ndarray, qtype: int, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x @ W.T for W [R, C] in its GGUF encoding: x [..., C] -> [..., R] float32 (matvec or tiled by T)."""
    R, C = (int(s) for s in shape)
    lead = np.shape(x)[:-1]
    if int(qtype) == F32:
        return np.asarray(x, dtype=np.float32) @ np.ascontiguousarray(raw).view(np.float32).reshape(R, C).T
    T = int(np.prod(lead, dtype=np.int64))
    y = matvec(raw, qtype, shape, x) if matvec_max_tokens(qtype) >= T else matmul_tiled(raw, qtype, shape, x)
    return y.reshape(*lead, R)


def gather_matvec(raw: np.ndarray, qtype: int, shape: tuple[int, int, int], experts: np.ndarray,
                  x: np.ndarray) -> np.ndarray:
    """For a stacked weight [E, R, C]: out[n] = x[n] @ W[experts[n]].T, x [N, C] -> [N, R] (one launch). With
    integer activations a run of equal consecutive ids reads its matrix once (sort the rows by expert)."""
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
    if not out.size:
        return out
    qt = quant_type(int(qtype))
    if takes_int8(qtype):
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        bounds = np.append(starts, len(ids))
        _int8_gather_kernel(a, a.reshape(-1), int(qtype), qt.qk, qt.block_bytes, qt.meta, qt.group, ids[starts],
                            bounds, x, out)
    elif _by_unit(qtype):
        _unit_gather_kernel(_units(a, qt.group), int(qtype), qt.group, ids, x, out)
    else:
        _gather_matvec_kernel(a, int(qtype), qt.qk, ids, x, out)
    return out

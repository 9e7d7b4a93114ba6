"""Weights on a GPU in their GGUF encoding, with QTensor's interface (matmul_t, gather_matmul_t, rows, dequantize).

Legend: R rows (output features), C columns (input features), T tokens, N (token, expert) pairs, E experts.

Decode (T <= 8) runs the fused matvec kernels of engine.cuda.kernels on the quantized bytes; prefill decodes
row tiles to f16 and multiplies them with cuBLAS (f16 inputs, f32 accumulation and output, so activations
never overflow f16). Types without a kernel are decoded once on the host at upload (f32, or f16 when large).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from engine.block_decoders import F16, F32
from engine.cuda import kernels
from engine.quant import QTensor, qtype_name

log = logging.getLogger("ikctl.cuda")

# f16 scratch per prefill tile: a whole V3 output head would be 1.85 GB, tiles keep it to this.
TILE_BYTES = 64 << 20
# Fallback tensors (types without a kernel) above this many f32 bytes are kept as f16 instead.
FALLBACK_F32_MAX_BYTES = 64 << 20
# cuBLAS enums (cublas_api.h, library_types.h): fixed by the CUDA ABI.
_OP_N, _OP_T = 0, 1
_R_16F, _R_32F = 2, 0
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1


def _cupy() -> Any:
    # cupy: optional, loaded only where a GPU is used
    import cupy

    return cupy


def _cublas() -> Any:
    """CuPy's cuBLAS binding (loads libcublas on first use)."""
    # cupy: optional, loaded only where a GPU is used
    from cupy_backends.cuda.libs import cublas

    return cublas


def as_device(x: Any, dtype: Any = np.float32) -> Any:
    """x as a C-contiguous device array of dtype whose data is 16-byte aligned (the kernels load float4)."""
    cp = _cupy()
    a = cp.ascontiguousarray(cp.asarray(x, dtype=dtype))
    return a if a.data.ptr % 16 == 0 else a.copy()


class CudaTensor:
    """A weight tensor held on GPU `device`. `shape` is the logical NumPy shape; `data` is a device uint8 array
    with the last axis in bytes (as QTensor.data for quantized types), or the f32/f16 values for float types."""

    __slots__ = ("data", "device", "name", "qtype", "shape")

    def __init__(self, name: str, data: Any, qtype: int, shape: tuple[int, ...], device: int) -> None:
        self.name, self.data, self.qtype, self.device = name, data, int(qtype), device
        self.shape = tuple(int(s) for s in shape)

    @classmethod
    def upload(cls, t: QTensor, device: int) -> CudaTensor:
        """Copy a QTensor's bytes to the GPU as they are (or its values, for a type without a kernel)."""
        cp = _cupy()
        qtype, shape = t.qtype, t.shape
        with cp.cuda.Device(device):
            if kernels.supports(qtype) and (qtype not in (F16, F32) or len(shape) == 1 or shape[-1] % 8 == 0):
                host = np.ascontiguousarray(t.data)
                if qtype in (F16, F32):
                    data = cp.asarray(host.reshape(shape))
                else:
                    data = cp.asarray(host.view(np.uint8).reshape(*shape[:-1], -1))
            else:
                values = t.dequantize()
                qtype = F32 if values.nbytes <= FALLBACK_F32_MAX_BYTES else F16
                if qtype == F16:
                    log.warning("%s: no CUDA kernel for %s; kept as f16 (%.1f MiB)", t.name, t.qtype_name,
                                values.nbytes / 2 ** 21)
                data = cp.asarray(values.astype(np.float16 if qtype == F16 else np.float32))
        return cls(t.name, data, qtype, shape, device)

    # ---- QTensor's interface -------------------------------------------------------------------------------
    @property
    def qtype_name(self) -> str:
        return qtype_name(self.qtype)

    @property
    def is_float32(self) -> bool:
        return self.qtype == F32

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __getitem__(self, index: int) -> CudaTensor:
        """Slice the leading axis (an expert of a stacked tensor): a view, nothing is copied."""
        return CudaTensor(f"{self.name}[{index}]", self.data[index], self.qtype, self.shape[1:], self.device)

    def _float_values(self) -> Any:
        return self.data if self.qtype == F32 else self.data.astype(np.float32)

    def _kernel_ok(self) -> bool:
        """Whether the kernels can read this tensor (float types need rows of a multiple of 8 values)."""
        return kernels.supports(self.qtype) and (self.qtype not in (F16, F32) or self.shape[-1] % 8 == 0)

    def dequantize(self) -> Any:
        """The whole tensor as device float32."""
        if self.qtype in (F16, F32):
            return self._float_values().reshape(self.shape)
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return self._decode(None, rows, half=False).reshape(self.shape)

    def rows(self, index: Any) -> Any:
        """Selected rows of a 2-D tensor as device float32 [len(index), C] (embedding lookup)."""
        idx = np.asarray(index, dtype=np.int64) if isinstance(index, np.ndarray | list | tuple) else index
        if self.qtype in (F16, F32) or not self._kernel_ok():
            return self.data[_cupy().asarray(idx)].astype(np.float32)
        return self._decode(as_device(idx, np.int64), len(idx), half=False)

    def matmul_t(self, x: Any) -> Any:
        """x @ W.T for a 2-D W [R, C] and x [..., C] -> [..., R] device float32."""
        R, C = self.shape
        x = as_device(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, C)
        T = x2.shape[0]
        if not self._kernel_ok():
            return (x2 @ self._float_values().T).reshape(*lead, R)
        if T <= kernels.MATVEC_MAX_T:
            y = self._matvec(x2, None, 1, T)
        elif self.qtype == F32:
            y = x2 @ self.data.T  # cuBLAS sgemm on the weight as it is
        else:
            y = self._prefill(x2)
        return y.reshape(*lead, R)

    def gather_matmul_t(self, experts: Any, x: Any) -> Any:
        """For a stacked 3-D W [E, R, C]: row n of the result is x[n] @ W[experts[n]].T; x [N, C] -> [N, R]."""
        E, _, C = self.shape
        if isinstance(experts, np.ndarray | list | tuple):
            ids = np.asarray(experts, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise ValueError(f"expert ids {ids.tolist()} do not fit {E} experts")
        else:
            ids = experts
        x = as_device(x).reshape(-1, C)
        if not self._kernel_ok():
            cp = _cupy()
            w = self._float_values()[cp.asarray(ids)]  # [N, R, C]
            return cp.matmul(w, x[:, :, None])[:, :, 0]
        return self._matvec(x, as_device(ids, np.int64), x.shape[0], 1)

    # ---- launches --------------------------------------------------------------------------------------------
    def _matvec(self, x: Any, ids: Any, n: int, T: int) -> Any:
        """y [n, T, R] = x [n, T, C] @ W[ids[n]].T (matrix 0 when ids is None)."""
        cp = _cupy()
        R, C = self.shape[-2:]
        t = kernels.TYPES[self.qtype]
        y = cp.empty((n * T, R), np.float32)
        if y.size == 0:
            return y
        mat_bytes = R * (C // t.qk) * t.block_bytes
        fn = kernels.function(f"mv_{t.name}_t{kernels.matvec_variant(T)}", self.device)
        rows_per_block = kernels.WARPS * kernels.NR
        grid = ((R + rows_per_block - 1) // rows_per_block, n, 1)
        fn(grid, (kernels.WARPS * 32, 1, 1),
           (self.data, np.int64(mat_bytes), ids if ids is not None else np.uint64(0), x, y, np.int32(R),
            np.int32(C), np.int32(T)))
        return y

    def _decode(self, ids: Any, n_rows: int, half: bool, row0: int = 0) -> Any:
        """Rows row0.. (or ids) decoded to a new device array [n_rows, C] of f16 or f32."""
        cp = _cupy()
        C = self.shape[-1]
        t = kernels.TYPES[self.qtype]
        out = cp.empty((n_rows, C), np.float16 if half else np.float32)
        threads = n_rows * C // 8
        if threads == 0:
            return out
        raw = self.data.reshape(-1, self.data.shape[-1])[row0:] if ids is None else self.data.reshape(
            -1, self.data.shape[-1])
        fn = kernels.function(f"dq_{t.name}", self.device)
        fn(((threads + kernels.DQ_THREADS - 1) // kernels.DQ_THREADS, 1, 1), (kernels.DQ_THREADS, 1, 1),
           (raw, ids if ids is not None else np.uint64(0), out, np.int32(n_rows), np.int32(C), np.int32(half)))
        return out

    def _prefill(self, x: Any) -> Any:
        """x [T, C] @ W.T through f16 row tiles and cuBLAS GEMM (f32 accumulate, f32 out)."""
        cp = _cupy()
        R, C = self.shape
        T = x.shape[0]
        out = cp.empty((T, R), np.float32)
        x16 = x.astype(np.float16)
        if self.qtype == F16:  # the weight is its own tile
            gemm_f16(x16, self.data.data.ptr, R, out, 0)
            return out
        step = max(1, TILE_BYTES // (2 * C))
        for r0 in range(0, R, step):
            rows = min(step, R - r0)
            tile = self._decode(None, rows, half=True, row0=r0)
            gemm_f16(x16, tile.data.ptr, rows, out, r0)
        return out


def gemm_f16(x16: Any, w16_ptr: int, rows: int, out: Any, r0: int) -> None:
    """out[:, r0 : r0 + rows] = x16 [T, C] @ W16 [rows, C].T with f32 accumulation into f32 `out` [T, R].

    Row-major arrays are column-major transposes, so cuBLAS computes out'(rows x T) = op_T(W') (rows x C) @ X'
    (C x T) with W' = W16 as C x rows (lda C), X' = x16 as C x T (ldb C) and out' at column r0 of ldc R."""
    # cupy: optional, loaded only where a GPU is used
    import cupy

    T, C = x16.shape
    R = out.shape[1]
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    _cublas().gemmEx(handle, _OP_T, _OP_N, rows, T, C, one.ctypes.data, w16_ptr, _R_16F, C, x16.data.ptr, _R_16F, C,
                  zero.ctypes.data, out.data.ptr + 4 * r0, _R_32F, R, _COMPUTE_32F, _GEMM_DEFAULT)


def upload_getter(get: Any, device: int) -> Any:
    """Wrap a `name -> QTensor | None` getter so that every tensor it gives lives on GPU `device`; each tensor is
    uploaded once however often it is asked for (DeepSeek2.from_parts looks output.weight up twice)."""
    uploaded: dict[str, CudaTensor | None] = {}

    def cuda_get(name: str) -> CudaTensor | None:
        if name not in uploaded:
            t = get(name)
            uploaded[name] = None if t is None else CudaTensor.upload(t, device)
        return uploaded[name]

    return cuda_get

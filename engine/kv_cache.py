"""Per-layer key/value caches in f32, f16 or q8_0 (like llama.cpp's -ctk), grown on demand up to n_ctx.

A cache holds one or more named row streams per layer (e.g. MLA's latent rows, or naive K and V rows), in host
memory (NumPy) or on a GPU (CuPy: `xp`), next to the attention weights that use it.
Legend: S cached positions, W row width.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import IkctlError
from engine.ops import array_module

CACHE_TYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32


def q8_0_quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [S, W] -> (int8 [S, Wp], f16 scales [S, Wp/32]); W is zero-padded to a multiple of 32."""
    xp = array_module(rows)
    S, W = rows.shape
    Wp = -(-W // _Q8_BLOCK) * _Q8_BLOCK
    x = xp.zeros((S, Wp), np.float32)
    x[:, :W] = rows
    blocks = x.reshape(S, -1, _Q8_BLOCK)
    d = xp.max(xp.abs(blocks), axis=-1) / np.float32(127.0)
    inv = xp.where(d > 0, np.float32(1.0) / xp.where(d > 0, d, np.float32(1.0)), np.float32(0.0))
    q = xp.clip(xp.round(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(S, Wp), d.astype(np.float16)


def q8_0_dequantize(q: np.ndarray, d: np.ndarray, width: int) -> np.ndarray:
    S = q.shape[0]
    x = q.reshape(S, -1, _Q8_BLOCK).astype(np.float32) * d.astype(np.float32)[..., None]
    return x.reshape(S, -1)[:, :width]


def row_bytes(widths: dict[str, int], cache_type: str) -> int:
    """Bytes one cached position takes in one layer (llama.cpp counts -c positions of these per layer up front)."""
    if cache_type == "q8_0":
        return sum((wp := -(-w // _Q8_BLOCK) * _Q8_BLOCK) + 2 * (wp // _Q8_BLOCK) for w in widths.values())
    return sum(widths.values()) * (4 if cache_type == "f32" else 2)


class _Stream:
    """Rows of one width for one layer."""

    def __init__(self, width: int, cache_type: str, xp: Any = np) -> None:
        self.width = width
        self.cache_type = cache_type
        self.xp = xp
        self.capacity = 0
        self._data: np.ndarray | None = None
        self._scale: np.ndarray | None = None

    def bytes_at(self, capacity: int) -> int:
        """What nbytes would be with room for `capacity` rows."""
        if self.cache_type == "q8_0":
            wp = -(-self.width // _Q8_BLOCK) * _Q8_BLOCK
            return capacity * (wp + 2 * (wp // _Q8_BLOCK))
        return capacity * self.width * (2 if self.cache_type == "f16" else 4)

    def ensure(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        if self.cache_type == "q8_0":
            wp = -(-self.width // _Q8_BLOCK) * _Q8_BLOCK
            data = self.xp.zeros((capacity, wp), np.int8)
            scale = self.xp.zeros((capacity, wp // _Q8_BLOCK), np.float16)
            if self._scale is not None:
                scale[: self.capacity] = self._scale[: self.capacity]
            self._scale = scale
        else:
            data = self.xp.zeros((capacity, self.width), np.float16 if self.cache_type == "f16" else np.float32)
        if self._data is not None:
            data[: self.capacity] = self._data[: self.capacity]
        self._data = data
        self.capacity = capacity

    def write(self, pos: int, rows: np.ndarray) -> None:
        assert self._data is not None
        if self.cache_type == "q8_0":
            assert self._scale is not None
            q, d = q8_0_quantize(rows)
            self._data[pos : pos + len(rows)] = q
            self._scale[pos : pos + len(rows)] = d
        else:
            self._data[pos : pos + len(rows)] = rows

    def read(self, n: int) -> np.ndarray:
        assert self._data is not None
        if self.cache_type == "q8_0":
            assert self._scale is not None
            return q8_0_dequantize(self._data[:n], self._scale[:n], self.width)
        if self.cache_type == "f32":
            return self._data[:n]
        return self._data[:n].astype(np.float32)

    def stored(self, n: int) -> np.ndarray | None:
        """The first n rows as stored (float16 or float32), or None where they are quantized."""
        assert self._data is not None
        return None if self.cache_type == "q8_0" else self._data[:n]

    @property
    def nbytes(self) -> int:
        return 0 if self._data is None else self._data.nbytes + (0 if self._scale is None else self._scale.nbytes)


class KVCache:
    """Caches for `n_layers` layers, each with the named streams of the given widths."""

    def __init__(self, n_layers: int, widths: dict[str, int], n_ctx: int, cache_type: str = "f16",
                 xp: Any = np) -> None:
        if cache_type not in CACHE_TYPES:
            raise IkctlError(f"cache type '{cache_type}' is not supported; use one of {', '.join(CACHE_TYPES)}")
        if n_ctx <= 0:
            raise IkctlError(f"context size {n_ctx} must be positive")
        self.n_ctx = n_ctx
        self.cache_type = cache_type
        self.layers = [{name: _Stream(w, cache_type, xp) for name, w in widths.items()} for _ in range(n_layers)]
        self.n_past = 0
        # the token ids of the cached positions, while every advance named them: what rebuilds the cache elsewhere
        # (failover); None once a pass advanced it without them (a worker's caches)
        self.tokens: list[int] | None = []

    def reserve(self, n_new: int, ahead: int = 0) -> int:
        """Make room for n_new more positions after `ahead` positions that passes still in flight reserved (their
        advance comes later); returns the first new position."""
        first = self.n_past + ahead
        end = first + n_new
        if end > self.n_ctx:
            raise IkctlError(
                f"context is full: {first} cached + {n_new} new tokens exceed the context size "
                f"{self.n_ctx}; raise -c/--ctx-size"
            )
        for layer in self.layers:
            for s in layer.values():
                s.ensure(self._grown(s.capacity, end))
        return first

    def _grown(self, capacity: int, end: int) -> int:
        """A stream's capacity once it holds `end` positions: doubled (at least 256) so that decoding token by
        token reallocates rarely, never past n_ctx."""
        return capacity if end <= capacity else min(self.n_ctx, max(end, 2 * capacity, 256))

    def nbytes_holding(self, end: int) -> int:
        """nbytes once positions [0, end) have room (end <= n_ctx): what a worker charges to its memory limit
        before it grows the cache."""
        end = min(end, self.n_ctx)
        return sum(s.bytes_at(self._grown(s.capacity, end)) for layer in self.layers for s in layer.values())

    def write(self, layer: int, name: str, pos: int, rows: np.ndarray) -> None:
        self.layers[layer][name].write(pos, rows)

    def read(self, layer: int, name: str, n: int) -> np.ndarray:
        """The first n rows as float32 [n, W]."""
        return self.layers[layer][name].read(n)

    def stored(self, layer: int, name: str, n: int) -> np.ndarray | None:
        """The first n rows as stored (float16 or float32 [n, W], no copy), or None for a q8_0 cache."""
        return self.layers[layer][name].stored(n)

    def advance(self, n: int, ids: np.ndarray | None = None) -> None:
        """Commit n more positions, holding the tokens `ids` (None: not known here)."""
        self.n_past += n
        if self.tokens is None:
            return
        if ids is None or len(ids) != n:
            self.tokens = None
        else:
            self.tokens.extend(np.asarray(ids).tolist())

    def clear(self) -> None:
        self.n_past = 0
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Forget positions n and later (llama.cpp's seq_rm from n); rows stay allocated."""
        if not 0 <= n <= self.n_past:
            raise IkctlError(f"cannot truncate a cache of {self.n_past} positions to {n}")
        self.n_past = n
        if self.tokens is not None:
            self.tokens = self.tokens[:n]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for layer in self.layers for s in layer.values())

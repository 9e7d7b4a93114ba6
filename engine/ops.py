"""Small elementwise ops shared by the architectures (float32 in, float32 out), and the array-module switch.

The model code runs on NumPy arrays (CPU) or CuPy arrays (engine.cuda): `array_module(a)` picks the namespace
from an array without importing CuPy on the CPU path.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def array_module(a: Any) -> Any:
    """numpy for host arrays, cupy for CuPy device arrays."""
    if type(a).__module__.startswith("cupy"):
        # cupy: optional, loaded only where a GPU is used
        import cupy

        return cupy
    return np


def to_host(a: Any) -> np.ndarray:
    """A NumPy array of a host or device array (a device-to-host copy for CuPy)."""
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    xp = array_module(x)
    x = xp.asarray(x, dtype=np.float32)
    ms = xp.mean(xp.square(x), axis=-1, keepdims=True)
    return (x / xp.sqrt(ms + np.float32(eps))) * weight


def silu(x: Any) -> Any:
    xp = array_module(x)
    return x / (np.float32(1.0) + xp.exp(-x))


def softmax(x: Any, axis: int = -1) -> Any:
    xp = array_module(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)

"""A NumPy-backed stand-in for CuPy, for CPU tests of the code paths that hold device arrays.

Like CuPy, its arrays refuse to become NumPy arrays implicitly (np.asarray, np.* functions and ufuncs raise
TypeError) and refuse NumPy arrays as operands, values or indices; `.get()` and `xp.asarray` are the only ways
across. So a model step that runs on it has every host/device crossing explicit, as it must be on a GPU. The
math is NumPy's, so results equal the CPU path's bit for bit.
"""

from __future__ import annotations

import contextlib
import operator
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class DeviceArrayError(TypeError):
    pass


def _dev(a: Any) -> Any:
    """A device result: NumPy arrays (and NumPy 0-d results) come back wrapped."""
    return ndarray(np.asarray(a)) if isinstance(a, np.ndarray | np.generic) else a


def _raw(a: Any, what: str = "operand") -> Any:
    """The NumPy array inside a device array; scalars pass; a NumPy array is refused (CuPy raises TypeError)."""
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, np.ndarray):
        raise DeviceArrayError(f"a NumPy array as {what} of a device array operation (use xp.asarray)")
    if isinstance(a, tuple):
        return tuple(_raw(x, what) for x in a)
    if isinstance(a, list):
        raise DeviceArrayError(f"a list as {what} (CuPy refuses sequences; use xp.asarray)")
    return a


class ndarray:  # CuPy's name
    __array_ufunc__ = None  # NumPy operators defer to ours; np ufuncs on a device array raise TypeError
    __module__ = "cupy"  # engine.ops.array_module recognises CuPy arrays by their module

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise DeviceArrayError("implicit conversion of a device array to NumPy (use .get())")

    def get(self) -> np.ndarray:
        return self._a.copy()

    # ---- attributes and methods ---------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: ndarray(self._a.T))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data))  # a device pointer: the address

    def __len__(self) -> int:
        return len(self._a)

    def reshape(self, *shape: Any) -> ndarray:
        return ndarray(self._a.reshape(*shape))

    def transpose(self, *axes: Any) -> ndarray:
        return ndarray(self._a.transpose(*axes))

    def astype(self, dtype: Any, copy: bool = True) -> ndarray:
        return ndarray(self._a.astype(dtype, copy=copy))

    def copy(self) -> ndarray:
        return ndarray(self._a.copy())

    def ravel(self) -> ndarray:
        return ndarray(self._a.ravel())

    def max(self, *args: Any, **kwargs: Any) -> Any:
        return _dev(self._a.max(*args, **kwargs))

    def sum(self, *args: Any, **kwargs: Any) -> Any:
        return _dev(self._a.sum(*args, **kwargs))

    def min(self, *args: Any, **kwargs: Any) -> Any:
        return _dev(self._a.min(*args, **kwargs))

    def argmax(self, *args: Any, **kwargs: Any) -> Any:
        return _dev(self._a.argmax(*args, **kwargs))

    def __getitem__(self, index: Any) -> Any:
        return _dev(self._a[_raw(index, "index")])

    def __setitem__(self, index: Any, value: Any) -> None:
        self._a[_raw(index, "index")] = _raw(value, "value")

    def __bool__(self) -> bool:
        raise DeviceArrayError("the truth value of a device array needs a host sync (use .get())")

    def __repr__(self) -> str:
        return f"device({self._a!r})"


def _binary(op: Callable[[Any, Any], Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    return (lambda self, other: _dev(op(self._a, _raw(other))),
            lambda self, other: _dev(op(_raw(other), self._a)))


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("matmul", operator.matmul), ("pow", operator.pow),
                   ("floordiv", operator.floordiv), ("mod", operator.mod)]:
    _fwd, _rev = _binary(_op)
    setattr(ndarray, f"__{_name}__", _fwd)
    setattr(ndarray, f"__r{_name}__", _rev)


def _inplace(op: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def apply(self: ndarray, other: Any) -> ndarray:
        op(self._a, _raw(other))
        return self

    return apply


for _name, _op in [("iadd", operator.iadd), ("isub", operator.isub), ("imul", operator.imul),
                   ("itruediv", operator.itruediv)]:
    setattr(ndarray, f"__{_name}__", _inplace(_op))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(ndarray, f"__{_name}__", _binary(_op)[0])
ndarray.__neg__ = lambda self: ndarray(-self._a)  # type: ignore[method-assign]
ndarray.__abs__ = lambda self: ndarray(abs(self._a))  # type: ignore[method-assign]
ndarray.__hash__ = None  # type: ignore[assignment]


# ---- the module --------------------------------------------------------------------------------------------------


def asarray(a: Any, dtype: Any = None) -> ndarray:
    """Host -> device (a copy, as a transfer is), or a device array as it is (cast when dtype differs)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray(np.array(a, dtype=dtype))


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    return ndarray(np.ascontiguousarray(_raw(asarray(a, dtype))))


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raw_args = [[_raw(x) for x in a] if isinstance(a, list) else _raw(a) for a in args]
        raw_kwargs = {k: _raw(v) for k, v in kwargs.items()}
        return _dev(fn(*raw_args, **raw_kwargs))

    return call


def _creation(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args, **kwargs: ndarray(fn(*args, **kwargs))


empty, zeros, ones, arange = (_creation(f) for f in (np.empty, np.zeros, np.ones, np.arange))
(empty_like, zeros_like, concatenate, broadcast_to, matmul, exp, mean, square, sqrt, where, repeat, clip, round,
 maximum, take_along_axis, stack, sort, argsort) = (
    _wrap(f) for f in (np.empty_like, np.zeros_like, np.concatenate, np.broadcast_to, np.matmul, np.exp, np.mean,
                       np.square, np.sqrt, np.where, np.repeat, np.clip, np.round, np.maximum, np.take_along_axis,
                       np.stack, np.sort, np.argsort))
max, sum, abs = _wrap(np.max), _wrap(np.sum), _wrap(np.abs)  # CuPy's names
float32, float16, int64, int8, inf = np.float32, np.float16, np.int64, np.int8, np.inf



class _Device:
    """cupy.cuda.Device: a context manager selecting a GPU (one here)."""

    current = 0

    def __init__(self, index: int = 0) -> None:
        if index != 0:
            raise RuntimeError(f"stand-in has one device, not {index}")
        self.id = index

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def use(self) -> None:
        pass


def RawModule(code: str, options: tuple[str, ...] = ()) -> Any:  # CuPy's name
    """Kernels exist only when a test has built the host emulation (tests/engine/cuda_emulator.py)."""
    from tests.engine.cuda_emulator import EmulatedModule

    return EmulatedModule(code, options)


cuda = types.SimpleNamespace(
    Device=_Device,
    device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        memGetInfo=lambda: (6 << 30, 8 << 30),
        getDeviceProperties=lambda i: {"name": b"Stand-in GPU", "major": 9, "minor": 0},
    ),
)
__version__ = "strict-stand-in"


@contextlib.contextmanager
def installed(monkeypatch: Any) -> Iterator[types.ModuleType]:
    """Make `import cupy` give this module for the duration (a real CuPy, if installed, is put back after)."""
    import sys

    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "cupy", module)
    yield module
